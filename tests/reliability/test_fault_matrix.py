"""The fault matrix: every worker pool x task kind x Redis fault, run for real (issue 11).

Each cell sends a small batch of engine runs through a real ``celery worker`` with the cell's
pool, breaks the result backend mid-batch in the cell's way, heals it, and checks every run
(see :mod:`tests.reliability.matrix`): runs lost 0, run records disagreeing with Celery's
result 0, bodies executed twice 0, every loss that cannot be prevented reported in the worker's
log with its run id.

The full product is 4 pools x 3 kinds x 5 faults = 60 cells (``make fault-matrix``, or
``FAULT_MATRIX=full``); by default a covering slice of 12 runs: every pool with every kind
once, each fault two or three times, every pool and every kind meeting several faults.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from tests.reliability.faults import FAULTS
from tests.reliability.matrix import KINDS, POOLS, Cell, run_cell

pytestmark = pytest.mark.timeout(240)

FAULT_NAMES = tuple(FAULTS)
#: The slice: cell i takes the i-th pool, kind and fault round-robin. 4 and 3 are coprime, so
#: 12 cells hold every (pool, kind) pair; the 5 faults go round them.
SLICE = [
    Cell(POOLS[i % len(POOLS)], KINDS[i % len(KINDS)], FAULT_NAMES[i % len(FAULT_NAMES)])
    for i in range(len(POOLS) * len(KINDS))
]


def _param(cell: Cell, *, slow: bool = False) -> object:
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(cell, id=cell.id, marks=marks)


def cells() -> list[object]:
    """The slice, or with ``FAULT_MATRIX=full`` every cell (those off the slice marked slow)."""
    mode = os.environ.get("FAULT_MATRIX", "slice")
    if mode not in ("slice", "full"):
        raise ValueError(f"FAULT_MATRIX must be 'slice' or 'full', not {mode!r}")
    if mode == "slice":
        return [_param(cell) for cell in SLICE]
    return [
        _param(cell, slow=cell not in SLICE)
        for cell in itertools.starmap(Cell, itertools.product(POOLS, KINDS, FAULT_NAMES))
    ]


def test_the_slice_covers_every_pool_kind_pair_and_every_fault() -> None:
    assert {(c.pool, c.kind) for c in SLICE} == set(itertools.product(POOLS, KINDS))
    assert {c.fault for c in SLICE} == set(FAULT_NAMES)


@pytest.mark.parametrize("cell", cells())
def test_a_batch_through_a_redis_fault_loses_no_run_disagrees_nowhere_and_runs_no_body_twice(
    cell: Cell, tmp_path: Path
) -> None:
    # Given a worker with the cell's pool, running a batch of the cell's kind of task,
    # When the backend fails mid-batch in the cell's way and is healed,
    outcome = run_cell(cell, tmp_path)
    print(f"\n{outcome.summary()}")

    # Then every run ended, agrees with Celery, ran once, and any loss was reported.
    if outcome.problems():
        pytest.fail(outcome.report(), pytrace=False)
