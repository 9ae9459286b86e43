"""Flower settings for the compose demo: show the engine's fields (engine_state, run_count)."""

from celery_taskengine.flower import show_engine_fields

show_engine_fields()
