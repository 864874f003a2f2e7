"""What the catalog stores: campaigns, channels and filters, as read back.

``shared.catalog.Catalog`` changes them and enforces the rules; these are
the values every process reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum, StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.accounts import (
    GraphAccount,
    ImapAccount,
    Pop3Account,
    SmtpAccount,
    parse_inbound,
    parse_outbound,
)
from shared.models import MatchField


class Keep(Enum):
    """Marks an argument of an update that leaves the stored value as it is."""

    KEEP = "keep"


KEEP = Keep.KEEP


class ChannelStatus(StrEnum):
    ACTIVE = "active"  # validated, and not failing since
    INACTIVE = "inactive"  # never validated, validation failed, or polls fail


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

    @property
    def status(self) -> ChannelStatus:
        working = (
            self.consecutive_failures == 0
            and self.last_validated_at is not None
            and (self.validation or {}).get("ok") is True
        )
        return ChannelStatus.ACTIVE if working else ChannelStatus.INACTIVE

    @property
    def status_detail(self) -> str:
        """Why the channel has its status, with the last error when failing."""
        if self.consecutive_failures:
            return (
                f"polling failed {self.consecutive_failures} time(s) in a row: "
                f"{self.last_poll_error or 'no error recorded'}"
            )
        if self.last_validated_at is None:
            return "not validated yet"
        if self.status is ChannelStatus.INACTIVE:
            return f"validation failed: {validation_error(self.validation or {})}"
        if self.last_poll_ok_at is None:
            return "validated; not polled yet"
        return "validated and polling"


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


def validation_error(validation: Mapping[str, Any]) -> str:
    for key in ("error", "message", "detail"):
        if validation.get(key):
            return str(validation[key])
    return "no reason recorded"


def channel_from_row(row: dict[str, Any]) -> Channel:
    inbound = parse_inbound(row["inbound"]) if row["inbound"] else None
    outbound = parse_outbound(row["outbound"]) if row["outbound"] else None
    return Channel(**{**row, "inbound": inbound, "outbound": outbound})


def filter_from_row(row: dict[str, Any]) -> Filter:
    return Filter(**{k: v for k, v in row.items() if k != "created_at"})
