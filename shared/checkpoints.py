"""Where the poller stopped in each mailbox folder: (UIDVALIDITY, last UID).

A checkpoint moves only after the broker confirmed every message up to it, so
a crash repeats a little work (the router drops the duplicates) and never
skips mail.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.db import DbConnection


@dataclass(frozen=True)
class Checkpoint:
    folder: str
    uidvalidity: int
    last_uid: int


class CheckpointStore:
    def __init__(self, conn: DbConnection, channel_id: int):
        self.conn = conn
        self.channel_id = channel_id

    def get(self, folder: str) -> Checkpoint | None:
        row = self.conn.execute(
            "SELECT folder, uidvalidity, last_uid FROM mailbox_checkpoints "
            "WHERE channel_id = %s AND folder = %s",
            (self.channel_id, folder),
        ).fetchone()
        return Checkpoint(**row) if row else None

    def all(self) -> dict[str, Checkpoint]:
        rows = self.conn.execute(
            "SELECT folder, uidvalidity, last_uid FROM mailbox_checkpoints "
            "WHERE channel_id = %s",
            (self.channel_id,),
        ).fetchall()
        return {r["folder"]: Checkpoint(**r) for r in rows}

    def advance(self, checkpoint: Checkpoint) -> None:
        """Store the checkpoint; a lower UID under the same UIDVALIDITY is ignored."""
        self.conn.execute(
            """
            INSERT INTO mailbox_checkpoints (channel_id, folder, uidvalidity, last_uid)
            VALUES (%s, %s, %s, %s)
            ON CONFLICT (channel_id, folder) DO UPDATE
            SET uidvalidity = EXCLUDED.uidvalidity,
                last_uid = CASE
                    WHEN mailbox_checkpoints.uidvalidity = EXCLUDED.uidvalidity
                    THEN greatest(mailbox_checkpoints.last_uid, EXCLUDED.last_uid)
                    ELSE EXCLUDED.last_uid END,
                updated_at = now()
            """,
            (
                self.channel_id,
                checkpoint.folder,
                checkpoint.uidvalidity,
                checkpoint.last_uid,
            ),
        )
