"""Dependencies that routes declare in their signatures: the session, the tenant, the store."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app import logs
from app.db import read_only_session, unit_of_work
from app.errors import Unauthorized
from app.settings import Settings, get_settings
from app.storage import BlobStore, get_blob_store


def get_session() -> Iterator[Session]:
    """One transaction per request: commit when the handler returns, roll back if it raises."""
    with unit_of_work() as session:
        yield session


async def get_read_session() -> AsyncIterator[Session]:
    """For handlers that only read: no transaction to open or commit.

    async on purpose: opening and closing an autocommit session does no I/O (queries run in the
    handler's thread), so it need not cost two thread-pool hops per request.
    """
    with read_only_session() as session:
        yield session


async def settings_dependency() -> Settings:
    # async: a plain lookup should not cost a thread-pool hop on every request.
    return get_settings()


async def store_dependency() -> BlobStore:
    return get_blob_store()


_bearer = HTTPBearer(
    auto_error=False, description="An API key (COMPACTOR_API_KEYS); needed only when keys are configured."
)


async def get_tenant(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None) -> str:
    """The caller's tenant from `Authorization: Bearer <key>`; 'default' when no keys are configured."""
    settings = get_settings()
    if not settings.api_keys:
        logs.tenant.set("default")
        return "default"
    if credentials is not None and credentials.credentials:
        for entry in settings.api_keys:
            tenant, sep, key = entry.rpartition(":")
            if hmac.compare_digest(key, credentials.credentials):
                logs.tenant.set(tenant if sep else "default")  # on this request's log lines
                return tenant if sep else "default"
    raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'")


# scope="function": the session commits when the handler returns, before the response is sent,
# so a client that reads right after a 201/202 always finds what it created.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
ReadSessionDep = Annotated[Session, Depends(get_read_session, scope="function")]
TenantDep = Annotated[str, Depends(get_tenant)]
StoreDep = Annotated[BlobStore, Depends(store_dependency)]
SettingsDep = Annotated[Settings, Depends(settings_dependency)]
LimitQuery = Annotated[int, Query(ge=1, le=500, description="Page size.")]
CursorQuery = Annotated[str | None, Query(description="The next_cursor of the previous page.")]
