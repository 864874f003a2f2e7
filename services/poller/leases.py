"""Sharing the active channels among the running pollers, through PostgreSQL.

Each poller writes a heartbeat every loop and holds a lease on each channel it
polls. The channels are shared out evenly: a poller holding more than its
share (a new poller joined) gives the extra back, and one holding less takes
channels whose lease is free or expired (a poller left or died). A dead
poller's channels are therefore taken over within one lease period.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.db import DbConnection


@dataclass(frozen=True)
class Share:
    owned: list[int]
    due: list[int]
    pollers: int


class Leases:
    def __init__(self, conn: DbConnection, owner: str, lease_seconds: float):
        self.conn = conn
        self.owner = owner
        self.lease_seconds = lease_seconds

    def refresh(self, poll_interval: float, requested: set[int]) -> Share:
        """Heartbeat, balance the share, and say which owned channels are due."""
        params = {"me": self.owner, "lease": self.lease_seconds}
        self.conn.execute(
            """
            INSERT INTO pollers (owner) VALUES (%(me)s)
            ON CONFLICT (owner) DO UPDATE SET heartbeat_at = now()
            """,
            params,
        )
        self.conn.execute(
            "DELETE FROM pollers "
            "WHERE heartbeat_at < now() - make_interval(secs => %(lease)s * 2)",
            params,
        )
        counts = self.conn.execute(
            """
            SELECT
              (SELECT count(*) FROM pollers
               WHERE heartbeat_at >= now() - make_interval(secs => %(lease)s))
                AS pollers,
              (SELECT count(*) FROM channels WHERE active) AS channels
            """,
            params,
        ).fetchone()
        assert counts is not None
        pollers = max(int(counts["pollers"]), 1)
        share = math.ceil(int(counts["channels"]) / pollers)

        self.conn.execute(
            "UPDATE channels SET lease_owner = NULL, lease_expires_at = NULL "
            "WHERE lease_owner = %(me)s AND NOT active",
            params,
        )
        owned = self._renew()
        if len(owned) > share:
            self._give_back(owned[share:])
            owned = owned[:share]
        elif len(owned) < share:
            owned = sorted(owned + self._take(share - len(owned)))

        due = self._due(owned, poll_interval, requested)
        return Share(owned=owned, due=due, pollers=pollers)

    def release_all(self) -> None:
        self.conn.execute(
            "UPDATE channels SET lease_owner = NULL, lease_expires_at = NULL "
            "WHERE lease_owner = %s",
            (self.owner,),
        )
        self.conn.execute("DELETE FROM pollers WHERE owner = %s", (self.owner,))

    def _renew(self) -> list[int]:
        rows = self.conn.execute(
            """
            UPDATE channels
            SET lease_expires_at = now() + make_interval(secs => %(lease)s)
            WHERE lease_owner = %(me)s AND active
            RETURNING id
            """,
            {"me": self.owner, "lease": self.lease_seconds},
        ).fetchall()
        return sorted(r["id"] for r in rows)

    def _give_back(self, channel_ids: list[int]) -> None:
        self.conn.execute(
            "UPDATE channels SET lease_owner = NULL, lease_expires_at = NULL "
            "WHERE lease_owner = %s AND id = ANY(%s)",
            (self.owner, channel_ids),
        )

    def _take(self, count: int) -> list[int]:
        rows = self.conn.execute(
            """
            UPDATE channels
            SET lease_owner = %(me)s,
                lease_expires_at = now() + make_interval(secs => %(lease)s)
            WHERE id IN (
                SELECT id FROM channels
                WHERE active AND (lease_owner IS NULL OR lease_expires_at < now())
                ORDER BY last_poll_at NULLS FIRST, id
                LIMIT %(count)s
                FOR UPDATE SKIP LOCKED)
            RETURNING id
            """,
            {"me": self.owner, "lease": self.lease_seconds, "count": count},
        ).fetchall()
        return [r["id"] for r in rows]

    def _due(
        self, owned: list[int], poll_interval: float, requested: set[int]
    ) -> list[int]:
        if not owned:
            return []
        rows = self.conn.execute(
            """
            SELECT id FROM channels
            WHERE id = ANY(%(owned)s)
              AND (id = ANY(%(requested)s) OR last_poll_at IS NULL
                   OR last_poll_at + make_interval(secs => %(interval)s) <= now())
            ORDER BY id
            """,
            {"owned": owned, "requested": list(requested), "interval": poll_interval},
        ).fetchall()
        return [r["id"] for r in rows]
