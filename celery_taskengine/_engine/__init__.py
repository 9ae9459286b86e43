"""The engine: options, the pure run state machine (steps), its sync and async drivers,
timeouts and run scope. Imports no celery, kombu or redis (tests/test_layers.py)."""
