"""The FastAPI application: routers, error handlers, and schema migration on start."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import observability
from app.api.guards import RequestGuard
from app.api.openapi import contract_openapi
from app.api.routes import datasets, health, jobs, models, searches, webhooks, workers
from app.errors import install_error_handlers
from app.settings import get_settings

log = logging.getLogger(__name__)


@asynccontextmanager
async def _lifespan(_: FastAPI):
    settings = get_settings()
    if settings.auto_migrate:
        from app.migrate import upgrade

        upgrade()
    yield


def create_app(observe: bool = True) -> FastAPI:
    """The application; `observe=False` leaves out /metrics and the request middleware (for the
    benchmark that measures what they cost)."""
    app = FastAPI(
        title="Compactor",
        version="1.0.0",
        summary="Makes trained PyTorch (TorchScript) models smaller and faster, and proves it.",
        lifespan=_lifespan,
        openapi_tags=[
            {"name": "models", "description": "Uploaded TorchScript models."},
            {"name": "datasets", "description": "Calibration, training and evaluation data."},
            {"name": "jobs", "description": "Compression pipelines, reports and artifacts."},
            {"name": "searches", "description": "Accuracy-aware searches: limits in, the recipe and its front out."},
            {"name": "webhooks", "description": "The secret webhooks are signed with."},
            {"name": "service", "description": "Health probes."},
        ],
    )
    install_error_handlers(app)
    app.add_middleware(RequestGuard, header_limit=get_settings().max_request_header_bytes)
    if observe:
        observability.install(app)
    for module in (models, datasets, jobs, searches, webhooks, workers, health):
        app.include_router(module.router)
    app.openapi = lambda: contract_openapi(app)
    return app


app = create_app()
