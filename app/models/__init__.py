"""SQLAlchemy ORM tables (schemas for HTTP live in app.schemas)."""

from app.models.base import Base
from app.models.checkpoint import StepCheckpoint
from app.models.dataset import Dataset
from app.models.job import CompressionJob
from app.models.model import UploadedModel
from app.models.search import Search
from app.models.webhook import DeliveryStatus, WebhookDelivery, WebhookSecret

__all__ = [
    "Base",
    "CompressionJob",
    "Dataset",
    "DeliveryStatus",
    "Search",
    "StepCheckpoint",
    "UploadedModel",
    "WebhookDelivery",
    "WebhookSecret",
]
