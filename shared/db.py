"""PostgreSQL access: connections, and the schema migrations every process runs."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row
from yoyo import get_backend, read_migrations

from shared.errors import DatabaseUnavailable

MIGRATIONS = Path(__file__).with_name("migrations")

DbConnection = psycopg.Connection[DictRow]


def connect(url: str, *, autocommit: bool = True) -> DbConnection:
    """Open a connection whose rows are dicts."""
    try:
        return psycopg.connect(url, autocommit=autocommit, row_factory=dict_row)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {_safe(url)}: {exc}. "
            "Check MAILROOM_DATABASE_URL and that the server is running."
        ) from exc


def create_database_if_missing(url: str) -> bool:
    """Create the database the URL names when absent; True if it was created."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    maintenance = urlunsplit(parts._replace(path="/postgres"))
    with connect(maintenance) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if exists:
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return True


def migrate(url: str) -> int:
    """Apply pending migrations under yoyo's lock; returns how many ran."""
    backend = get_backend(_yoyo_url(url))
    migrations = read_migrations(str(MIGRATIONS))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return len(pending)


def _yoyo_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    if scheme in ("postgres", "postgresql"):
        scheme = "postgresql+psycopg"
    return f"{scheme}://{rest}"


def _safe(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":[redacted]@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
