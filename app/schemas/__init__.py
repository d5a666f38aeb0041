"""Pydantic request/response schemas of the HTTP API (tables live in app.models)."""
