"""Claim-check storage: bytes too large for a broker message, kept in PostgreSQL.

Blobs are addressed by their SHA-256, so storing the same bytes twice (a
redelivered message, a crash before the checkpoint moved) costs nothing.
"""

from __future__ import annotations

from shared.db import DbConnection
from shared.errors import MessageRejected
from shared.models import Payload


def put(conn: DbConnection, data: bytes, *, inline_max: int) -> Payload:
    """Return a payload carrying the bytes inline, or stored when they are large."""
    if len(data) <= inline_max:
        return Payload.of(data)
    payload = Payload.of(data, inline=False)
    # %b sends the bytes as they are; as text psycopg would write them out
    # in hex, twice their size, and copy them again on the way.
    conn.execute(
        "INSERT INTO blobs (sha256, size, data) VALUES (%s, %s, %b) "
        "ON CONFLICT (sha256) DO NOTHING",
        (payload.sha256, payload.size, data),
    )
    return payload


def get(conn: DbConnection, payload: Payload) -> bytes:
    """The payload's bytes, fetched from the store when it is a claim check."""
    if payload.data is not None:
        return payload.data
    # A binary result comes as the bytes themselves, not as hex text twice
    # their size that is then decoded.
    row = conn.execute(
        "SELECT data FROM blobs WHERE sha256 = %s", (payload.sha256,), binary=True
    ).fetchone()
    if row is None:
        raise MessageRejected(
            f"claim check {payload.sha256[:12]} names no stored blob; the blob "
            "store was cleaned before the message was handled"
        )
    return bytes(row["data"])
