"""A channel's filters: added, read, changed, reordered and deleted in order.

Part of ``shared.catalog.Catalog``; the rules for a filter are checked here
before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence

import regex

from shared.catalog_models import KEEP, Campaign, Channel, Filter, Keep, filter_from_row
from shared.db import DbConnection
from shared.errors import NotFoundError, ValidationFailed
from shared.models import MatchField

OPERATORS = ("contains", "not_contains", "regex")


def _filter_rule(field: str, operator: str, value: str) -> MatchField:
    try:
        match_field = MatchField(field)
    except ValueError as exc:
        raise ValidationFailed("field", "use sender, subject or body") from exc
    if operator not in OPERATORS:
        raise ValidationFailed("operator", "use contains, not_contains or regex")
    if not value:
        raise ValidationFailed("value", "a filter needs a keyword or pattern")
    if operator == "regex":
        try:
            regex.compile(value, regex.IGNORECASE)
        except (regex.error, ValueError, OverflowError, RecursionError) as exc:
            raise ValidationFailed(
                "value", f"not a valid regular expression ({exc}); correct it"
            ) from exc
    return match_field


class Filters:
    """The filter methods of the catalog; ``Catalog`` provides the rest."""

    conn: DbConnection

    def channel(self, ref: int | str) -> Channel:
        raise NotImplementedError

    def campaign(self, ref: int | str) -> Campaign:
        raise NotImplementedError

    def add_filter(
        self,
        channel: int | str,
        field: str,
        value: str,
        campaign: int | str,
        operator: str = "contains",
        stop: bool = True,
    ) -> Filter:
        channel_id = self.channel(channel).id
        match_field = _filter_rule(field, operator, value)
        campaign_id = self.campaign(campaign).id
        row = self.conn.execute(
            """
            INSERT INTO filters (channel_id, position, field, operator, value,
                                 campaign_id, stop)
            SELECT %s, coalesce(max(position), 0) + 1, %s, %s, %s, %s, %s
            FROM filters WHERE channel_id = %s
            RETURNING *
            """,
            (channel_id, match_field, operator, value, campaign_id, stop, channel_id),
        ).fetchone()
        assert row is not None
        return filter_from_row(row)

    def filters(self, channel: int | str | None = None) -> list[Filter]:
        if channel is None:
            rows = self.conn.execute(
                "SELECT * FROM filters ORDER BY channel_id, position"
            ).fetchall()
        else:
            rows = self.conn.execute(
                "SELECT * FROM filters WHERE channel_id = %s ORDER BY position",
                (self.channel(channel).id,),
            ).fetchall()
        return [filter_from_row(r) for r in rows]

    def filter(self, filter_id: int) -> Filter:
        row = self.conn.execute(
            "SELECT * FROM filters WHERE id = %s", (filter_id,)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no filter {filter_id}; list them with `filter list`")
        return filter_from_row(row)

    def update_filter(
        self,
        filter_id: int,
        *,
        field: str | Keep = KEEP,
        operator: str | Keep = KEEP,
        value: str | Keep = KEEP,
        campaign: int | str | Keep = KEEP,
        stop: bool | Keep = KEEP,
    ) -> Filter:
        current = self.filter(filter_id)
        match_field = _filter_rule(
            current.field if isinstance(field, Keep) else field,
            current.operator if isinstance(operator, Keep) else operator,
            current.value if isinstance(value, Keep) else value,
        )
        campaign_id = (
            current.campaign_id
            if isinstance(campaign, Keep)
            else self.campaign(campaign).id
        )
        row = self.conn.execute(
            """
            UPDATE filters SET field = %s, operator = %s, value = %s,
                campaign_id = %s, stop = %s
            WHERE id = %s RETURNING *
            """,
            (
                match_field,
                current.operator if isinstance(operator, Keep) else operator,
                current.value if isinstance(value, Keep) else value,
                campaign_id,
                current.stop if isinstance(stop, Keep) else stop,
                filter_id,
            ),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no filter {filter_id}; it was deleted meanwhile")
        return filter_from_row(row)

    def reorder_filters(
        self, channel: int | str, filter_ids: Sequence[int]
    ) -> list[Filter]:
        """Put the channel's filters in the order given, which must name each once."""
        channel_id = self.channel(channel).id
        with self.conn.transaction():
            rows = self.conn.execute(
                "SELECT id FROM filters WHERE channel_id = %s ORDER BY position "
                "FOR UPDATE",
                (channel_id,),
            ).fetchall()
            existing = [r["id"] for r in rows]
            if sorted(existing) != sorted(filter_ids):
                raise ValidationFailed(
                    "filter_ids",
                    f"name each of the channel's filters once, in the new order; "
                    f"its filters are {existing}",
                )
            self._renumber(list(filter_ids))
        return self.filters(channel_id)

    def move_filter(self, filter_id: int, position: int) -> list[Filter]:
        """Move a filter to ``position`` (from 1) of its channel's list."""
        item = self.filter(filter_id)
        with self.conn.transaction():
            rows = self.conn.execute(
                "SELECT id FROM filters WHERE channel_id = %s ORDER BY position "
                "FOR UPDATE",
                (item.channel_id,),
            ).fetchall()
            order = [r["id"] for r in rows if r["id"] != filter_id]
            if not 1 <= position <= len(order) + 1:
                raise ValidationFailed(
                    "position", f"use a position from 1 to {len(order) + 1}"
                )
            order.insert(position - 1, filter_id)
            self._renumber(order)
        return self.filters(item.channel_id)

    def _renumber(self, ordered_ids: list[int]) -> None:
        # The unique (channel, position) constraint is checked at commit, so
        # positions may collide while the rows are rewritten one by one.
        self.conn.execute(
            """
            UPDATE filters SET position = o.position
            FROM unnest(%s::bigint[]) WITH ORDINALITY AS o(id, position)
            WHERE filters.id = o.id
            """,
            (ordered_ids,),
        )

    def delete_filter(self, filter_id: int) -> None:
        with self.conn.transaction():
            deleted = self.conn.execute(
                "DELETE FROM filters WHERE id = %s RETURNING channel_id", (filter_id,)
            ).fetchone()
            if deleted is None:
                raise NotFoundError(f"no filter {filter_id}")
            rest = self.conn.execute(
                "SELECT id FROM filters WHERE channel_id = %s ORDER BY position",
                (deleted["channel_id"],),
            ).fetchall()
            self._renumber([r["id"] for r in rest])
