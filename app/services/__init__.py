"""Business rules of the service: what may be stored, queued, canceled; no HTTP in here."""
