"""The API without /metrics and the request middleware, for `service_observability.py` (uvicorn --factory)."""

from app.main import create_app


def bare_app():
    return create_app(observe=False)
