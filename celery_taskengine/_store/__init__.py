"""The store layer: everything that talks to Redis (or keeps records in memory).

The engine and the Celery bridge ask a store for operations (read or write a cached record,
take a lock, save or load a run, ...); only modules in this package know keys, clients and
encodings. ``selection.store_for_app`` picks an app's store.
"""
