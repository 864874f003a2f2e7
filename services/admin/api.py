"""The workspace administrators' HTTP API, and the web console that uses it.

Routes live under /api (see /openapi.json); the console is served at / from
``static/``. Every rule is enforced by ``shared.catalog``, the code the CLI
uses, so the API and the CLI agree. Each request is logged as one line with
the token's name, never the token.

The interactive docs pages are off: they load their scripts from a CDN,
which a closed network cannot reach and which the console's content
security policy would refuse anyway.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
from fastapi import FastAPI, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from services.admin import (
    authorise_routes,
    campaign_routes,
    channel_routes,
    filter_routes,
    quarantine_routes,
    session_routes,
)
from services.admin.context import AdminContext
from shared.errors import (
    BrokerError,
    ConfigurationError,
    MessageRejected,
    NotFoundError,
    ValidationFailed,
)
from shared.logs import get_logger
from shared.secrets import SecretBox
from shared.settings import Settings

STATIC = Path(__file__).with_name("static")
ACCOUNT_TAGS = frozenset({"imap", "pop3", "graph", "smtp"})
# The catalog's names of some inputs, and what the API calls them.
API_FIELDS = {"default_campaign": "default_campaign_id"}
POOL_TIMEOUT_SECONDS = 10.0
# A database that does not answer fails a request in seconds, with a message,
# rather than leaving it hanging on the operating system's TCP retries.
CONNECT_TIMEOUT_SECONDS = 5
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

log = get_logger(__name__)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool: ConnectionPool[Any] = ConnectionPool(
            settings.database_url.get_secret_value(),
            min_size=2,
            max_size=8,
            timeout=POOL_TIMEOUT_SECONDS,
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            },
            open=False,
        )
        pool.open(wait=False)
        app.state.admin = AdminContext(settings, pool, SecretBox(settings.secret_keys))
        log.info("admin API started")
        try:
            yield
        finally:
            pool.close()
            log.info("admin API stopped")

    app = FastAPI(
        title="Mailroom admin API",
        version="1",
        description=(
            "Channels, their filters and campaigns of a Mailroom workspace. "
            "Send an API token as `Authorization: Bearer TOKEN`; read-only "
            "tokens may read and try filters, admin tokens may also change."
        ),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    for module in (
        session_routes,
        campaign_routes,
        channel_routes,
        authorise_routes,
        filter_routes,
        quarantine_routes,
    ):
        app.include_router(module.router)
    _add_error_handlers(app)
    app.middleware("http")(_log_and_protect)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def console() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    _add_health_routes(app)
    return app


def _add_health_routes(app: FastAPI) -> None:
    """The same /livez, /readyz and /metrics every worker serves."""

    @app.get("/livez", include_in_schema=False)
    def livez() -> PlainTextResponse:
        return PlainTextResponse("ok\n")

    @app.get("/readyz", include_in_schema=False)
    def readyz(request: Request) -> PlainTextResponse:
        admin: AdminContext = request.app.state.admin
        try:
            with admin.pool.connection(timeout=2) as conn:
                conn.execute("SELECT 1")
        except (psycopg.Error, PoolTimeout):
            return PlainTextResponse("not ready\n", status_code=503)
        return PlainTextResponse("ready\n")

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _log_and_protect(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    started = time.monotonic()
    response = await call_next(request)
    response.headers.update(SECURITY_HEADERS)

    principal = getattr(request.state, "principal", None)
    log.info(
        "request",
        method=request.method,
        path=request.url.path,
        status=response.status_code,
        by=principal.name if principal else None,
        seconds=round(time.monotonic() - started, 4),
    )
    return response


def _error(
    code: int, detail: str, field: str | None = None, items: Sequence[Any] = ()
) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail, "field": field, "errors": list(items)}
    return JSONResponse(body, status_code=code)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ValidationFailed)
    def _invalid(_: Request, exc: ValidationFailed) -> JSONResponse:
        field = API_FIELDS.get(exc.field, exc.field)
        item = {"field": field, "message": exc.message}
        return _error(422, f"{field}: {exc.message}", field, [item])

    @app.exception_handler(RequestValidationError)
    def _malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        # The input is left out on purpose: it may hold a password.
        items = [
            {"field": _field(e["loc"]), "message": _message(e)} for e in exc.errors()
        ]
        first = items[0] if items else {"field": "body", "message": "is malformed"}
        detail = f"{first['field']}: {first['message']}"
        return _error(422, detail, first["field"], items)

    @app.exception_handler(NotFoundError)
    def _missing(_: Request, exc: NotFoundError) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(MessageRejected)
    def _not_mail(_: Request, exc: MessageRejected) -> JSONResponse:
        detail = f"message: {exc}; upload the raw .eml file"
        return _error(422, detail, "message", [{"field": "message", "message": detail}])

    @app.exception_handler(ConfigurationError)
    def _misconfigured(_: Request, exc: ConfigurationError) -> JSONResponse:
        log.error("configuration problem", error=str(exc))
        return _error(503, str(exc))

    @app.exception_handler(BrokerError)
    def _no_broker(_: Request, exc: BrokerError) -> JSONResponse:
        log.error("broker unreachable", error=str(exc))
        return _error(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc))

    @app.exception_handler(PoolTimeout)
    @app.exception_handler(psycopg.OperationalError)
    def _no_database(_: Request, exc: Exception) -> JSONResponse:
        log.error("database unreachable", error=f"{type(exc).__name__}: {exc}")
        return _error(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "the database is unreachable; check MAILROOM_DATABASE_URL and that "
            "PostgreSQL is running, then try again",
        )

    @app.exception_handler(psycopg.errors.UndefinedTable)
    def _old_schema(_: Request, exc: Exception) -> JSONResponse:
        log.error("database schema out of date", error=str(exc))
        return _error(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "the database schema is out of date; run `mailroom migrate`",
        )


def _field(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    kept = [
        p
        for i, p in enumerate(parts)
        if not (i and parts[i - 1] in ("inbound", "outbound") and p in ACCOUNT_TAGS)
    ]
    return ".".join(kept) or "body"


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "union_tag_not_found":
        return 'say which kind of account with "type" (imap, pop3, graph or smtp)'
    if error["type"] == "extra_forbidden":
        return "is not a setting this takes; remove it"
    if error["type"] == "missing":
        return "is required"
    return str(error["msg"]).removeprefix("Value error, ")
