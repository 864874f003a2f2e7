"""Messages per sender and channel in fixed time windows, shared by all routers.

Two auto-responders that answer each other send one channel mail after mail
from the same address. Each routed message is counted in PostgreSQL under
its channel, its sender's address (lower case) and the window its fetch
time falls in, all of a batch in one statement; a message whose count in its
window passes the limit is suspected of looping. Windows are fixed, aligned
to the Unix epoch, so a burst that straddles two windows is split between
them. Counting by fetch time keeps a backlog that the routers work off late
from looking like a burst.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

from shared.db import DbConnection
from shared.models import Address

MAX_ADDRESS = 320

_COUNT = """
INSERT INTO sender_rates AS r (channel_id, sender, window_start, messages)
SELECT m.channel_id, m.sender, m.window_start, count(*)
FROM unnest(%s::bigint[], %s::text[], %s::timestamptz[])
    AS m (channel_id, sender, window_start)
JOIN channels c ON c.id = m.channel_id
GROUP BY m.channel_id, m.sender, m.window_start
-- Rows are locked in one order by every router, so two never deadlock.
ORDER BY m.channel_id, m.sender, m.window_start
ON CONFLICT (channel_id, sender, window_start)
DO UPDATE SET messages = r.messages + excluded.messages
RETURNING channel_id, sender, window_start, messages
"""

Key = tuple[int, str, datetime]


@dataclass(frozen=True)
class Arrival:
    channel_id: int
    sender: str | None
    fetched_at: datetime


def sender_address(senders: list[Address]) -> str | None:
    """The first From address in lower case; None when it is not an address."""
    if not senders:
        return None

    address = senders[0].email.strip().lower()
    local, at, domain = address.rpartition("@")
    if not (local and at and domain) or len(address) > MAX_ADDRESS:
        return None
    if any(ch.isspace() for ch in address):
        return None
    return address


class SenderRates:
    def __init__(self, window_seconds: int) -> None:
        self.window_seconds = window_seconds
        self._pruned_at = float("-inf")

    def window_start(self, at: datetime) -> datetime:
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        seconds = int(at.timestamp()) // self.window_seconds * self.window_seconds
        return datetime.fromtimestamp(seconds, UTC)

    def count(self, db: DbConnection, arrivals: list[Arrival]) -> list[int | None]:
        """Each arrival's number among its sender's messages in its window.

        Messages counted before, by this router or any other, come first;
        within the batch, arrivals are numbered in order. None for an
        arrival without a sender address, or whose channel is gone.
        """
        keys: list[Key | None] = [
            (a.channel_id, a.sender, self.window_start(a.fetched_at))
            if a.sender
            else None
            for a in arrivals
        ]
        counted = [k for k in keys if k is not None]
        if not counted:
            return [None] * len(arrivals)

        rows = db.execute(
            _COUNT, [list(column) for column in zip(*counted, strict=True)]
        ).fetchall()
        totals = {
            (r["channel_id"], r["sender"], r["window_start"]): int(r["messages"])
            for r in rows
        }
        in_batch = Counter(counted)
        numbered: Counter[Key] = Counter()
        result: list[int | None] = []
        for key in keys:
            if key is None or key not in totals:
                result.append(None)
                continue
            numbered[key] += 1
            result.append(totals[key] - in_batch[key] + numbered[key])

        self._prune_now_and_then(db)
        return result

    def _prune_now_and_then(self, db: DbConnection) -> None:
        """Delete windows long over, at most once a window per router.

        Two windows back, so that a window still counting (a poller's clock
        a little behind) is never deleted.
        """
        now = time.monotonic()
        if now - self._pruned_at < self.window_seconds:
            return

        self._pruned_at = now
        db.execute(
            "DELETE FROM sender_rates "
            "WHERE window_start < now() - make_interval(secs => %s)",
            (2 * self.window_seconds,),
        )
