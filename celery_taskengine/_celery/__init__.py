"""The Celery side: the task class, the producer, a worker's delivery, claims use, revokes,
streams, events and Celery's idioms. Talks to stores only through ``_store``'s protocol."""
