"""Campaigns, channels and filters as stored in PostgreSQL.

Every process reads the same rows, so a change made here (activating a
channel, adding a filter) reaches running workers without a restart. Every
front end (the CLI, the admin API and its console) changes them through this
class, so each rule is enforced in one place. The values it reads back are
in ``catalog_models``, and its filter methods in ``catalog_filters``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from pydantic import ValidationError

from shared.accounts import (
    check_host,
    parse_inbound,
    parse_outbound,
)
from shared.catalog_filters import Filters
from shared.catalog_models import (
    KEEP,
    Campaign,
    Channel,
    ChannelStatus,
    Filter,
    Keep,
    channel_from_row,
)
from shared.db import DbConnection
from shared.errors import NotFoundError, ValidationFailed
from shared.secrets import SecretBox

# Read back from here by every front end and worker.
__all__ = [
    "KEEP",
    "Campaign",
    "Catalog",
    "Channel",
    "ChannelStatus",
    "Filter",
    "Keep",
    "check_address",
]

CHANNEL_COLUMNS = """
    c.id, c.name, c.address, c.default_campaign_id, c.active, c.inbound,
    c.outbound, c.sync_all_folders, c.sync_recipient_only, c.last_validated_at,
    c.validation, c.last_poll_ok_at, c.last_poll_error, c.consecutive_failures,
    (SELECT count(*) FROM filters f WHERE f.channel_id = c.id) AS filter_count
"""

# The same rule as Channel.status, for searching by status in SQL.
WORKING_SQL = """(
    c.consecutive_failures = 0 AND c.last_validated_at IS NOT NULL
    AND coalesce(c.validation ->> 'ok', 'false') = 'true'
)"""

ADDRESS = re.compile(r"^[^@\s<>()\[\],;:\"\\]+@([^@\s]+)$")


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
        message = first["msg"].removeprefix("Value error, ")
        raise ValidationFailed(f"{field}.{where}", message) from exc


def _name(name: str) -> str:
    if not name.strip():
        raise ValidationFailed("name", "a channel needs a name")
    return name.strip()


def check_address(address: str) -> str:
    """The address without padding; empty is allowed, malformed is not."""
    address = address.strip()
    if not address:
        return address
    match = ADDRESS.match(address)
    if match:
        try:
            check_host(match.group(1))
            return address
        except ValueError:
            pass
    raise ValidationFailed(
        "address", f"{address!r} is not an email address like support@example.com"
    )


def _check_recipient_rule(address: str, sync_recipient_only: bool) -> None:
    if sync_recipient_only and not address:
        raise ValidationFailed(
            "address",
            "syncing only mail addressed to the channel needs the channel's address",
        )


def _like(text: str) -> str:
    """A LIKE pattern matching ``text`` anywhere, its wildcards taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class Catalog(Filters):
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
        name = _name(name)
        address = check_address(address)
        _check_recipient_rule(address, sync_recipient_only)
        campaign_id = (
            self.campaign(default_campaign).id if default_campaign is not None else None
        )
        in_json = _account_json("inbound", inbound, parse_inbound)
        out_json = _account_json("outbound", outbound, parse_outbound)
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
                    name,
                    address,
                    campaign_id,
                    Jsonb(in_json),
                    in_json.get("type"),
                    Jsonb(out_json),
                    out_json.get("type"),
                    self.box.seal({k: v for k, v in (secrets or {}).items() if v}),
                    sync_all_folders,
                    sync_recipient_only,
                ),
            ).fetchone()
        except psycopg.errors.UniqueViolation as exc:
            raise ValidationFailed("name", f"a channel named {name!r} exists") from exc
        assert row is not None
        return self.channel(row["id"])

    def update_channel(
        self,
        ref: int | str,
        *,
        name: str | Keep = KEEP,
        address: str | Keep = KEEP,
        default_campaign: int | str | Keep | None = KEEP,
        inbound: dict[str, Any] | Keep | None = KEEP,
        outbound: dict[str, Any] | Keep | None = KEEP,
        secrets: Mapping[str, str | None] | None = None,
        sync_all_folders: bool | Keep = KEEP,
        sync_recipient_only: bool | Keep = KEEP,
    ) -> Channel:
        """Change the given settings; secrets map to a new value, or to None
        or "" to remove one.

        A change of account or secret clears the last validation, which was
        about the old settings.
        """
        with self.conn.transaction():
            current = self._locked_channel(ref)
            values: dict[str, Any] = {}
            if not isinstance(name, Keep):
                values["name"] = _name(name)
            if not isinstance(address, Keep):
                values["address"] = check_address(address)
            if not isinstance(sync_all_folders, Keep):
                values["sync_all_folders"] = sync_all_folders
            if not isinstance(sync_recipient_only, Keep):
                values["sync_recipient_only"] = sync_recipient_only
            _check_recipient_rule(
                values.get("address", current.address),
                values.get("sync_recipient_only", current.sync_recipient_only),
            )

            if not isinstance(default_campaign, Keep):
                values["default_campaign_id"] = (
                    None
                    if default_campaign is None
                    else self.campaign(default_campaign).id
                )
                if current.active and default_campaign is None:
                    raise ValidationFailed(
                        "default_campaign",
                        f"channel {current.name!r} is active and needs its default "
                        "campaign; deactivate it first",
                    )

            if not isinstance(inbound, Keep):
                in_json = _account_json("inbound", inbound, parse_inbound)
                values["inbound"] = Jsonb(in_json)
                values["inbound_type"] = in_json.get("type")
                if current.active and not in_json:
                    raise ValidationFailed(
                        "inbound",
                        f"channel {current.name!r} is active and needs its inbound "
                        "account; deactivate it first",
                    )
            if not isinstance(outbound, Keep):
                out_json = _account_json("outbound", outbound, parse_outbound)
                values["outbound"] = Jsonb(out_json)
                values["outbound_type"] = out_json.get("type")

            if secrets:
                stored = self.secrets(current.id)
                for key, value in secrets.items():
                    if value:
                        stored[key] = value
                    else:
                        stored.pop(key, None)
                values["secrets"] = self.box.seal(stored)

            if {"inbound", "outbound", "secrets"} & values.keys():
                values["last_validated_at"] = None
                values["validation"] = None
            if values:
                self._update_channel_row(current, values)
        return self.channel(current.id)

    def _locked_channel(self, ref: int | str) -> Channel:
        channel = self.channel(ref)
        self.conn.execute(
            "SELECT id FROM channels WHERE id = %s FOR UPDATE", (channel.id,)
        )
        return self.channel(channel.id)

    def _update_channel_row(self, current: Channel, values: dict[str, Any]) -> None:
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder(k))
            for k in values
        )
        statement = sql.SQL(
            "UPDATE channels SET {}, updated_at = now() WHERE id = {}"
        ).format(assignments, sql.Placeholder("id"))
        try:
            self.conn.execute(statement, {**values, "id": current.id})
        except psycopg.errors.UniqueViolation as exc:
            raise ValidationFailed(
                "name", f"a channel named {values.get('name')!r} exists"
            ) from exc

    def channel(self, ref: int | str) -> Channel:
        column = "c.id" if isinstance(ref, int) else "c.name"
        row = self.conn.execute(
            f"SELECT {CHANNEL_COLUMNS} FROM channels c WHERE {column} = %s",  # noqa: S608
            (ref,),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no channel {ref!r}; list them with `channel list`")
        return channel_from_row(row)

    def channels(self, *, active_only: bool = False) -> list[Channel]:
        where = "WHERE c.active" if active_only else ""
        rows = self.conn.execute(
            f"SELECT {CHANNEL_COLUMNS} FROM channels c {where} ORDER BY c.id"  # noqa: S608
        ).fetchall()
        return [channel_from_row(r) for r in rows]

    def search_channels(
        self,
        *,
        text: str = "",
        name: str = "",
        address: str = "",
        default_campaign: int | str | None = None,
        status: ChannelStatus | None = None,
    ) -> list[Channel]:
        """Channels matching every criterion given, ordered by name.

        ``text`` and ``name`` match any part of the name, ``address`` any part
        of the address, all ignoring case. ``default_campaign`` finds the
        channels whose default it is, not those reaching it through a filter.
        """
        conditions: list[sql.Composable] = [sql.SQL("true")]
        params: list[Any] = []
        for column, value in (("name", text), ("name", name), ("address", address)):
            if value.strip():
                conditions.append(
                    sql.SQL("c.{} ILIKE %s ESCAPE '\\'").format(sql.Identifier(column))
                )
                params.append(_like(value.strip()))
        if default_campaign is not None:
            conditions.append(sql.SQL("c.default_campaign_id = %s"))
            params.append(self.campaign(default_campaign).id)
        if status is ChannelStatus.ACTIVE:
            conditions.append(sql.SQL(WORKING_SQL))
        elif status is ChannelStatus.INACTIVE:
            conditions.append(sql.SQL(f"NOT {WORKING_SQL}"))

        statement = sql.SQL(
            "SELECT {} FROM channels c WHERE {} ORDER BY lower(c.name), c.id"
        ).format(sql.SQL(CHANNEL_COLUMNS), sql.SQL(" AND ").join(conditions))
        rows = self.conn.execute(statement, params).fetchall()
        return [channel_from_row(r) for r in rows]

    def secrets(self, channel_id: int) -> dict[str, str]:
        row = self.conn.execute(
            "SELECT secrets FROM channels WHERE id = %s", (channel_id,)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no channel {channel_id}")
        return self.box.open(row["secrets"])

    def keep_rotated_secrets(
        self, channel_id: int, before: Mapping[str, str], after: Mapping[str, str]
    ) -> None:
        """Store the secrets a sign-in rotated (a new refresh token).

        Only the values that changed from ``before`` are written, and only
        where nobody stored another value meanwhile, so a poller and a sender
        renewing at once, or an administrator authorising again, are not
        overwritten.
        """
        changed = {k: v for k, v in after.items() if before.get(k) != v}
        if not changed:
            return
        with self.conn.transaction():
            row = self.conn.execute(
                "SELECT secrets FROM channels WHERE id = %s FOR UPDATE", (channel_id,)
            ).fetchone()
            if row is None:
                return
            stored = self.box.open(row["secrets"])
            for key, value in changed.items():
                if stored.get(key) == before.get(key):
                    stored[key] = value
            self.conn.execute(
                "UPDATE channels SET secrets = %s WHERE id = %s",
                (self.box.seal(stored), channel_id),
            )

    def set_active(self, ref: int | str, active: bool) -> Channel:
        channel = self.channel(ref)
        if active and channel.default_campaign_id is None:
            raise ValidationFailed(
                "default_campaign",
                f"channel {channel.name!r} has no default campaign; choose one "
                "(`channel set-default-campaign` or the console's Default "
                "campaign) before activating it",
            )
        if active and channel.inbound is None:
            raise ValidationFailed(
                "inbound",
                f"channel {channel.name!r} has no inbound account to poll",
            )
        try:
            self.conn.execute(
                "UPDATE channels SET active = %s, updated_at = now() WHERE id = %s",
                (active, channel.id),
            )
        except psycopg.errors.CheckViolation as exc:
            raise ValidationFailed(
                "default_campaign",
                f"channel {channel.name!r} lost its default campaign meanwhile; "
                "choose one before activating it",
            ) from exc
        return self.channel(channel.id)

    def set_default_campaign(self, ref: int | str, campaign: int | str) -> Channel:
        channel = self.channel(ref)
        self.conn.execute(
            "UPDATE channels SET default_campaign_id = %s, updated_at = now() "
            "WHERE id = %s",
            (self.campaign(campaign).id, channel.id),
        )
        return self.channel(channel.id)

    def record_validation(self, ref: int | str, result: Mapping[str, Any]) -> Channel:
        """Keep the outcome of a validation; ``result["ok"]`` says if it passed.

        The result must hold no secret: it is shown to every administrator.
        """
        channel = self.channel(ref)
        self.conn.execute(
            "UPDATE channels SET last_validated_at = now(), validation = %s "
            "WHERE id = %s",
            (Jsonb(dict(result)), channel.id),
        )
        return self.channel(channel.id)

    def delete_channel(self, ref: int | str) -> None:
        channel = self.channel(ref)
        self.conn.execute("DELETE FROM channels WHERE id = %s", (channel.id,))
