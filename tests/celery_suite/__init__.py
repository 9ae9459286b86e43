"""Celery's own integration tests for tasks and canvas, run with engine tasks (see harness.py)."""
