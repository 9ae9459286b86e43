"""Runnable examples: each module is a Celery app (``celery -A examples.<name> worker``) and,
run as ``python -m examples.<name>``, a producer that sends it work and prints what happened.

They read ``SHOP_BROKER_URL`` and ``SHOP_BACKEND_URL`` (default: a local Redis, databases 0
and 1), so one Redis serves them all, in docker compose as on a laptop.
"""
