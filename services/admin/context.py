"""What each request of the admin API works with: a database connection
wrapped in a Catalog, and the principal its token or session cookie names.

Reading needs any valid token; changing the configuration needs an admin one.
A request signed in by the console's cookie must also carry the console's
header when it changes something, which a page of another site cannot send
(cross-site request forgery).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool

from services.admin.tokens import Principal, TokenStore
from shared.catalog import Catalog
from shared.db import DbConnection
from shared.secrets import SecretBox
from shared.settings import Settings

SESSION_COOKIE = "mailroom_session"
CONSOLE_HEADER = "X-Mailroom-Console"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="An API token from `mailroom token create NAME --role ROLE`.",
)
cookie_scheme = APIKeyCookie(
    name=SESSION_COOKIE,
    auto_error=False,
    description="The console's session, from POST /api/session.",
)


@dataclass
class AdminContext:
    settings: Settings
    pool: ConnectionPool[DbConnection]
    box: SecretBox


def _context(request: Request) -> AdminContext:
    context: AdminContext = request.app.state.admin
    return context


def connection(request: Request) -> Iterator[DbConnection]:
    with _context(request).pool.connection() as conn:
        yield conn


Connection = Annotated[DbConnection, Depends(connection)]


def catalog(request: Request, conn: Connection) -> Catalog:
    return Catalog(conn, _context(request).box)


def settings(request: Request) -> Settings:
    return _context(request).settings


def principal(
    request: Request,
    conn: Connection,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    session: Annotated[str | None, Depends(cookie_scheme)],
) -> Principal:
    store = TokenStore(conn)
    found: Principal | None = None
    if bearer is not None:
        found = store.authenticate(bearer.credentials)
    elif session:
        found = store.session(session)
        if found is not None and request.method not in SAFE_METHODS:
            if request.headers.get(CONSOLE_HEADER) != "1":
                raise HTTPException(
                    status.HTTP_403_FORBIDDEN,
                    f"changes made with the console's cookie need the "
                    f"{CONSOLE_HEADER}: 1 header; use the console or a token",
                )

    if found is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "sign in: send an API token as 'Authorization: Bearer TOKEN' (make "
            "one with `mailroom token create`), or sign in to the console again",
            headers={"WWW-Authenticate": "Bearer"},
        )
    request.state.principal = found
    return found


def admin(found: Annotated[Principal, Depends(principal)]) -> Principal:
    if not found.is_admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"token {found.name!r} is read-only; changing the configuration "
            "needs a token with the admin role",
        )
    return found


CatalogDep = Annotated[Catalog, Depends(catalog)]
SettingsDep = Annotated[Settings, Depends(settings)]
Reader = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]
