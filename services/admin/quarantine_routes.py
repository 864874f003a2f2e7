"""The quarantine: messages kept because they could not be processed.

Operators list and inspect them, and replay one once its cause is fixed; the
same operations as `mailroom quarantine`.
"""

from __future__ import annotations

import base64

from fastapi import APIRouter

from services.admin.context import Admin, Connection, Reader, SettingsDep
from shared import quarantine
from shared.logs import get_logger
from shared.quarantine import QuarantinedMessage

router = APIRouter(prefix="/api/quarantine", tags=["quarantine"])
log = get_logger(__name__)


class QuarantinedBodyOut(QuarantinedMessage):
    body_base64: str


@router.get("", response_model=list[QuarantinedMessage])
def list_quarantine(
    _: Reader, conn: Connection, include_replayed: bool = False, limit: int = 100
) -> list[QuarantinedMessage]:
    """Newest first; replayed entries only when asked for."""
    entries = quarantine.list_open(
        conn, include_replayed=include_replayed, limit=max(1, min(limit, 1000))
    )
    return entries


@router.get("/{entry_id}", response_model=QuarantinedBodyOut)
def show_quarantined(entry_id: int, _: Reader, conn: Connection) -> QuarantinedBodyOut:
    """One entry with the message body exactly as it was received."""
    entry, body = quarantine.get(conn, entry_id)
    return QuarantinedBodyOut(
        **entry.model_dump(), body_base64=base64.b64encode(body).decode()
    )


@router.post("/{entry_id}/replay", response_model=QuarantinedMessage)
def replay_quarantined(
    entry_id: int, who: Admin, conn: Connection, settings: SettingsDep
) -> QuarantinedMessage:
    """Publish the entry again to the queue it came from."""
    entry = quarantine.replay(conn, settings.amqp_url.get_secret_value(), entry_id)
    log.info("quarantine replayed", entry_id=entry_id, queue=entry.queue, by=who.name)
    return entry
