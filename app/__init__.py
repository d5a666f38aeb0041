"""Compactor's API process: HTTP routes, settings, persistence and storage. Never imports torch."""
