"""Campaigns, channels and filters as stored in PostgreSQL.

Every process reads the same rows, so a change made here (activating a
channel, adding a filter) reaches running workers without a restart.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.accounts import (
    GraphAccount,
    ImapAccount,
    Pop3Account,
    SmtpAccount,
    parse_inbound,
    parse_outbound,
)
from shared.db import DbConnection
from shared.errors import NotFoundError, ValidationFailed
from shared.models import MatchField
from shared.secrets import SecretBox

CHANNEL_COLUMNS = """
    c.id, c.name, c.address, c.default_campaign_id, c.active, c.inbound,
    c.outbound, c.sync_all_folders, c.sync_recipient_only, c.last_validated_at,
    c.validation, c.last_poll_ok_at, c.last_poll_error, c.consecutive_failures,
    (SELECT count(*) FROM filters f WHERE f.channel_id = c.id) AS filter_count
"""


class Campaign(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    key: str
    name: str


class Channel(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    name: str
    address: str
    default_campaign_id: int | None
    active: bool
    inbound: ImapAccount | Pop3Account | GraphAccount | None
    outbound: SmtpAccount | GraphAccount | None
    sync_all_folders: bool = False
    sync_recipient_only: bool = False
    filter_count: int = 0
    last_validated_at: Any = None
    validation: dict[str, Any] | None = None
    last_poll_ok_at: Any = None
    last_poll_error: str | None = None
    consecutive_failures: int = 0


class Filter(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    channel_id: int
    position: int
    field: MatchField
    operator: str = Field(pattern=r"^(contains|not_contains|regex)$")
    value: str
    campaign_id: int
    stop: bool = True


def _channel(row: dict[str, Any]) -> Channel:
    inbound = parse_inbound(row["inbound"]) if row["inbound"] else None
    outbound = parse_outbound(row["outbound"]) if row["outbound"] else None
    return Channel(**{**row, "inbound": inbound, "outbound": outbound})


def _filter(row: dict[str, Any]) -> Filter:
    return Filter(**{k: v for k, v in row.items() if k != "created_at"})


def _account_json(
    field: str, data: dict[str, Any] | None, parse: Any
) -> dict[str, Any]:
    if not data:
        return {}
    try:
        return dict(parse(data).model_dump(mode="json"))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "type"
        raise ValidationFailed(f"{field}.{where}", first["msg"]) from exc


class Catalog:
    """Reads and changes the configuration, enforcing the rules on the way in."""

    def __init__(self, conn: DbConnection, box: SecretBox | None = None):
        self.conn = conn
        self.box = box or SecretBox(None)

    # Campaigns

    def add_campaign(self, key: str, name: str) -> Campaign:
        try:
            row = self.conn.execute(
                "INSERT INTO campaigns (key, name) VALUES (%s, %s) RETURNING *",
                (key, name),
            ).fetchone()
        except psycopg.errors.UniqueViolation as exc:
            raise ValidationFailed("key", f"campaign {key!r} exists") from exc
        except psycopg.errors.CheckViolation as exc:
            raise ValidationFailed(
                "key",
                "use lower-case letters, digits, '-' and '_' (up to 63), "
                "starting with a letter or digit",
            ) from exc
        assert row is not None
        return Campaign(**row)

    def campaigns(self) -> list[Campaign]:
        rows = self.conn.execute("SELECT * FROM campaigns ORDER BY key").fetchall()
        return [Campaign(**r) for r in rows]

    def campaign(self, ref: int | str) -> Campaign:
        column = "id" if isinstance(ref, int) else "key"
        row = self.conn.execute(
            f"SELECT * FROM campaigns WHERE {column} = %s",  # noqa: S608
            (ref,),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no campaign {ref!r}; list them with `campaign list`")
        return Campaign(**row)

    # Channels

    def add_channel(
        self,
        name: str,
        address: str = "",
        default_campaign: int | str | None = None,
        inbound: dict[str, Any] | None = None,
        outbound: dict[str, Any] | None = None,
        secrets: dict[str, str] | None = None,
        sync_all_folders: bool = False,
        sync_recipient_only: bool = False,
    ) -> Channel:
        if not name.strip():
            raise ValidationFailed("name", "a channel needs a name")
        campaign_id = (
            self.campaign(default_campaign).id if default_campaign is not None else None
        )
        try:
            row = self.conn.execute(
                """
                INSERT INTO channels (name, address, default_campaign_id, inbound,
                    inbound_type, outbound, outbound_type, secrets,
                    sync_all_folders, sync_recipient_only)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                RETURNING id
                """,
                (
                    name.strip(),
                    address.strip(),
                    campaign_id,
                    Jsonb(in_json := _account_json("inbound", inbound, parse_inbound)),
                    in_json.get("type"),
                    Jsonb(
                        out_json := _account_json("outbound", outbound, parse_outbound)
                    ),
                    out_json.get("type"),
                    self.box.seal(secrets or {}),
                    sync_all_folders,
                    sync_recipient_only,
                ),
            ).fetchone()
        except psycopg.errors.UniqueViolation as exc:
            raise ValidationFailed("name", f"a channel named {name!r} exists") from exc
        assert row is not None
        return self.channel(row["id"])

    def channel(self, ref: int | str) -> Channel:
        column = "c.id" if isinstance(ref, int) else "c.name"
        row = self.conn.execute(
            f"SELECT {CHANNEL_COLUMNS} FROM channels c WHERE {column} = %s",  # noqa: S608
            (ref,),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no channel {ref!r}; list them with `channel list`")
        return _channel(row)

    def channels(self, *, active_only: bool = False) -> list[Channel]:
        where = "WHERE c.active" if active_only else ""
        rows = self.conn.execute(
            f"SELECT {CHANNEL_COLUMNS} FROM channels c {where} ORDER BY c.id"  # noqa: S608
        ).fetchall()
        return [_channel(r) for r in rows]

    def secrets(self, channel_id: int) -> dict[str, str]:
        row = self.conn.execute(
            "SELECT secrets FROM channels WHERE id = %s", (channel_id,)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no channel {channel_id}")
        return self.box.open(row["secrets"])

    def set_active(self, ref: int | str, active: bool) -> Channel:
        channel = self.channel(ref)
        if active and channel.default_campaign_id is None:
            raise ValidationFailed(
                "default_campaign",
                f"channel {channel.name!r} has no default campaign; set one with "
                "`channel set-default-campaign` before activating it",
            )
        if active and channel.inbound is None:
            raise ValidationFailed(
                "inbound",
                f"channel {channel.name!r} has no inbound account to poll",
            )
        self.conn.execute(
            "UPDATE channels SET active = %s, updated_at = now() WHERE id = %s",
            (active, channel.id),
        )
        return self.channel(channel.id)

    def set_default_campaign(self, ref: int | str, campaign: int | str) -> Channel:
        channel = self.channel(ref)
        self.conn.execute(
            "UPDATE channels SET default_campaign_id = %s, updated_at = now() "
            "WHERE id = %s",
            (self.campaign(campaign).id, channel.id),
        )
        return self.channel(channel.id)

    def delete_channel(self, ref: int | str) -> None:
        channel = self.channel(ref)
        self.conn.execute("DELETE FROM channels WHERE id = %s", (channel.id,))

    # Filters

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
        try:
            match_field = MatchField(field)
        except ValueError as exc:
            raise ValidationFailed("field", "use sender, subject or body") from exc
        if operator not in ("contains", "not_contains", "regex"):
            raise ValidationFailed("operator", "use contains, not_contains or regex")
        if not value:
            raise ValidationFailed("value", "a filter needs a keyword or pattern")
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
        return _filter(row)

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
        return [_filter(r) for r in rows]

    def delete_filter(self, filter_id: int) -> None:
        deleted = self.conn.execute(
            "DELETE FROM filters WHERE id = %s RETURNING id", (filter_id,)
        ).fetchone()
        if deleted is None:
            raise NotFoundError(f"no filter {filter_id}")
