"""Where the poller stopped in each Graph folder: the link that continues it.

A link moves only after the broker confirmed every message of the page before
it, so a crash repeats a page (the router drops the duplicates) and never
skips mail.
"""

from __future__ import annotations

from shared.db import DbConnection


class DeltaLinkStore:
    def __init__(self, conn: DbConnection, channel_id: int):
        self.conn = conn
        self.channel_id = channel_id

    def get(self, folder_id: str) -> str | None:
        row = self.conn.execute(
            "SELECT delta_link FROM graph_delta_links "
            "WHERE channel_id = %s AND folder_id = %s",
            (self.channel_id, folder_id),
        ).fetchone()
        return str(row["delta_link"]) if row else None

    def put(self, folder_id: str, delta_link: str) -> None:
        self.conn.execute(
            """
            INSERT INTO graph_delta_links (channel_id, folder_id, delta_link)
            VALUES (%s, %s, %s)
            ON CONFLICT (channel_id, folder_id) DO UPDATE
            SET delta_link = EXCLUDED.delta_link, updated_at = now()
            """,
            (self.channel_id, folder_id, delta_link),
        )
