"""Compactor's worker: the Celery app, its thin tasks, and the pure-torch compression engines."""
