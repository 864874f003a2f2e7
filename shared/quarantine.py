"""Messages that could not be processed, kept in PostgreSQL with their reason.

Nothing is dropped: the original broker body is stored as received, so an
operator can inspect it and, once the cause is fixed, replay it to the queue
it came from.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from shared import broker
from shared.broker import Outgoing, Publisher
from shared.db import DbConnection
from shared.errors import NotFoundError, ValidationFailed
from shared.metrics import QUARANTINED, Stage


class QuarantinedMessage(BaseModel):
    id: int
    stage: Stage
    channel_id: int | None
    reason: str
    detail: str
    queue: str
    created_at: datetime
    replayed_at: datetime | None
    size: int


def put(
    conn: DbConnection,
    *,
    stage: Stage,
    reason: str,
    body: bytes,
    queue: str,
    channel_id: int | None = None,
    detail: str = "",
    raw_sha256: str | None = None,
) -> int:
    row = conn.execute(
        """
        INSERT INTO quarantine (stage, channel_id, reason, detail, queue, body,
                                raw_sha256)
        VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id
        """,
        (stage, channel_id, reason, detail, queue, body, raw_sha256),
    ).fetchone()
    assert row is not None
    QUARANTINED.labels(stage=stage).inc()
    return int(row["id"])


_COLUMNS = (
    "id, stage, channel_id, reason, detail, queue, created_at, replayed_at, "
    "length(body) AS size"
)


def list_open(
    conn: DbConnection, *, include_replayed: bool = False, limit: int = 100
) -> list[QuarantinedMessage]:
    where = "" if include_replayed else "WHERE replayed_at IS NULL"
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM quarantine {where} ORDER BY id DESC LIMIT %s",  # noqa: S608
        (limit,),
    ).fetchall()
    return [QuarantinedMessage(**r) for r in rows]


def get(conn: DbConnection, entry_id: int) -> tuple[QuarantinedMessage, bytes]:
    row = conn.execute(
        f"SELECT {_COLUMNS}, body FROM quarantine WHERE id = %s",  # noqa: S608
        (entry_id,),
    ).fetchone()
    if row is None:
        raise NotFoundError(f"no quarantined message {entry_id}")
    body = bytes(row.pop("body"))
    return QuarantinedMessage(**row), body


def mark_replayed(conn: DbConnection, entry_id: int) -> None:
    conn.execute("UPDATE quarantine SET replayed_at = now() WHERE id = %s", (entry_id,))


def count_open(conn: DbConnection) -> int:
    row: dict[str, Any] | None = conn.execute(
        "SELECT count(*) AS n FROM quarantine WHERE replayed_at IS NULL"
    ).fetchone()
    return int(row["n"]) if row else 0


def replay(conn: DbConnection, amqp_url: str, entry_id: int) -> QuarantinedMessage:
    """Publish an entry again to the queue it came from, and mark it replayed."""
    entry, body = get(conn, entry_id)
    if not entry.queue:
        raise ValidationFailed(
            "entry_id",
            f"entry {entry_id} was never published ({entry.reason}); it cannot "
            "be replayed",
        )
    connection = broker.connect(amqp_url, attempts=3)
    try:
        Publisher(connection).publish_all(
            [Outgoing("", entry.queue, body, f"replay-{entry_id}")]
        )
    finally:
        connection.release()
    mark_replayed(conn, entry_id)
    return entry
