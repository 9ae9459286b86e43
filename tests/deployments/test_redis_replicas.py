"""An outcome's writes wait for a replica (Redis ``WAIT``) when the master has one, so that a
failover cannot lose the record of a run whose result the caller got (see _store/replicas).
The failover itself is in test_redis_flavours.py."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_taskengine._store.replicas import WAIT_TIMEOUT_MS, ReplicaAcks, replica_acks_setting
from celery_taskengine.errors import ConfigurationError
from tests.deployments.servers import Server, redis_process
from tests.deployments.workers import deployment_worker

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture
def master_and_replica(tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    with (
        redis_process(tmp_path / "master") as master,
        redis_process(
            tmp_path / "replica", "--replicaof", "127.0.0.1", str(master.port)
        ) as replica,
    ):
        client = master.client()
        for _ in range(200):  # the replica is in sync (WAIT counts no other)
            if client.info("replication").get("slave0", {}).get("state") == "online":
                break
            time.sleep(0.05)
        yield master, replica


def test_a_master_with_a_replica_waits_for_it_and_one_without_waits_for_nothing(
    master_and_replica: tuple[Server, Server], tmp_path: Path
) -> None:
    master, replica = master_and_replica
    assert ReplicaAcks(master.client(), 1).wait_command() == ("WAIT", 1, WAIT_TIMEOUT_MS)
    assert ReplicaAcks(replica.client(), 1).wait_command() is None  # WAIT is an error there
    assert ReplicaAcks(master.client(), 3).wait_command() == ("WAIT", 1, WAIT_TIMEOUT_MS)
    assert ReplicaAcks(master.client(), 0).wait_command() is None
    with redis_process(tmp_path / "alone") as alone:
        assert ReplicaAcks(alone.client(), 1).wait_command() is None


@pytest.mark.parametrize("denied", ["-info", "-wait"])
def test_a_user_not_allowed_to_ask_or_to_wait_waits_for_nothing_and_says_so(
    master_and_replica: tuple[Server, Server], caplog: pytest.LogCaptureFixture, denied: str
) -> None:
    master, _ = master_and_replica
    master.client().execute_command(
        "ACL", "SETUSER", "narrow", "reset", "on", ">pw", "~*", "&*", "+@all", denied
    )
    narrow = redis.Redis(host="127.0.0.1", port=master.port, username="narrow", password="pw")
    with caplog.at_level(logging.WARNING):
        acks = ReplicaAcks(narrow, 1)
        assert acks.wait_command() is None
        assert acks.wait_command() is None
    warnings = [r for r in caplog.records if "taskengine_replica_acks" in r.getMessage()]
    assert len(warnings) == 1  # said once, not per write


def test_the_setting_is_a_whole_number_of_replicas() -> None:
    assert replica_acks_setting({}) == 1
    assert replica_acks_setting({"taskengine_replica_acks": 0}) == 0
    for bad in (-1, "1", 1.5, True):
        with pytest.raises(ConfigurationError, match="taskengine_replica_acks"):
            replica_acks_setting({"taskengine_replica_acks": bad})


def test_a_worker_waits_for_the_replica_after_each_outcome(
    master_and_replica: tuple[Server, Server], redis_url: str
) -> None:
    master, _ = master_and_replica
    backend = f"redis://127.0.0.1:{master.port}/0"
    with deployment_worker(redis_url, backend, redis_url) as (_app, tasks, _proc):
        before = _waits(master)
        counter = f"r:{uuid.uuid4().hex}"
        values = [tasks.slow.delay(i, counter, 0).get(timeout=60) for i in range(5)]
        waits = _waits(master) - before
    assert values == [i + 1 for i in range(5)]
    assert waits >= 10  # the final record's and Celery's result's, per task


def _waits(server: Server) -> int:
    stats = server.client().info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


def test_a_server_without_info_waits_for_nothing(tmp_path: Path) -> None:
    with redis_process(tmp_path / "no-info", "--rename-command", "INFO", "") as server:
        acks = ReplicaAcks(server.client(), 1)
        assert acks.wait_command() is None
        assert acks.wait_command() is None
