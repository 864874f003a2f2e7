"""Bodies the admin API accepts and returns, as its OpenAPI document shows them.

Secrets are accepted on write as ``SecretStr`` (so no repr shows them) and
never returned: a response only says which ones are stored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from shared.accounts import InboundAccount, OutboundAccount
from shared.catalog import Campaign, Channel, ChannelStatus, Filter
from shared.models import MatchField

SECRET_NAMES = (
    "inbound_password",
    "outbound_password",
    "client_secret",
    "refresh_token",
    "inbound_access_token",
    "outbound_access_token",
)
Operator = Literal["contains", "not_contains", "regex"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorItem(BaseModel):
    field: str = Field(description="Dotted path of the input at fault.")
    message: str


class ErrorOut(BaseModel):
    detail: str = Field(description="What went wrong and what to do, in one line.")
    field: str | None = Field(None, description="The first input at fault.")
    errors: list[ErrorItem] = Field(default_factory=list)


# Access


class SessionIn(_Body):
    token: SecretStr = Field(description="An API token from `mailroom token create`.")


class WhoAmI(BaseModel):
    name: str = Field(description="Name of the token in use.")
    role: Literal["read-only", "admin"]


# Campaigns


class CampaignIn(_Body):
    key: str = Field(
        description="Lower-case letters, digits, '-' and '_'; names its queue."
    )
    name: str = Field("", description="Display name; the key when empty.")


class CampaignOut(BaseModel):
    id: int
    key: str
    name: str

    @classmethod
    def of(cls, campaign: Campaign) -> CampaignOut:
        return cls(id=campaign.id, key=campaign.key, name=campaign.name)


# Channels


class SecretsIn(_Body):
    """Write-only secrets; omit one (or send null) to keep it, "" to remove it."""

    inbound_password: SecretStr | None = Field(None, description="IMAP or POP3.")
    outbound_password: SecretStr | None = Field(None, description="SMTP.")
    client_secret: SecretStr | None = Field(
        None, description="Exchange Online (Graph) application secret."
    )
    refresh_token: SecretStr | None = Field(
        None, description="Exchange Online delegated sign-in."
    )
    inbound_access_token: SecretStr | None = Field(
        None,
        description="IMAP XOAUTH2 with oauth2.provider 'token': the current token.",
    )
    outbound_access_token: SecretStr | None = Field(
        None,
        description="SMTP XOAUTH2 with oauth2.provider 'token': the current token.",
    )

    def changes(self) -> dict[str, str | None]:
        return {
            name: value.get_secret_value() if value is not None else None
            for name in self.model_fields_set
            if (value := getattr(self, name)) is not None
        }


class ChannelIn(_Body):
    name: str = Field(description="Unique name of the channel.")
    address: str = Field("", description="The channel's email address.")
    default_campaign_id: int | None = Field(
        None, description="Campaign that mail no filter matches goes to."
    )
    active: bool = Field(
        False, description="Poll it now; needs a default campaign and inbound."
    )
    inbound: InboundAccount | None = Field(None, description="Mailbox polled.")
    outbound: OutboundAccount | None = Field(None, description="Replies leave here.")
    sync_all_folders: bool = Field(False, description="IMAP: poll every folder.")
    sync_recipient_only: bool = Field(
        False, description="Only mail addressed to the channel's address."
    )
    secrets: SecretsIn = Field(default_factory=SecretsIn)


class ChannelPatch(_Body):
    """Fields to change; the ones left out keep their value."""

    name: str | None = None
    address: str | None = None
    default_campaign_id: int | None = Field(None, description="null removes it.")
    inbound: InboundAccount | None = Field(None, description="null removes it.")
    outbound: OutboundAccount | None = Field(None, description="null removes it.")
    sync_all_folders: bool | None = None
    sync_recipient_only: bool | None = None
    active: bool | None = Field(
        None, description="Enable or disable, after (or before) the other changes."
    )
    secrets: SecretsIn | None = None


class ActiveIn(_Body):
    active: bool


class SecretsSet(BaseModel):
    """Which secrets are stored; their values are never returned."""

    inbound_password_set: bool = False
    outbound_password_set: bool = False
    client_secret_set: bool = False
    refresh_token_set: bool = False
    inbound_access_token_set: bool = False
    outbound_access_token_set: bool = False

    @classmethod
    def of(cls, stored: set[str]) -> SecretsSet:
        return cls(**{f"{name}_set": name in stored for name in SECRET_NAMES})


class ChannelSummary(BaseModel):
    id: int
    name: str
    address: str
    active: bool = Field(description="Enabled: pollers poll it.")
    default_campaign_id: int | None
    default_campaign: CampaignOut | None
    filter_count: int
    status: ChannelStatus = Field(
        description="active: validated and not failing; inactive otherwise."
    )
    status_detail: str = Field(description="Why, with the last error when failing.")
    inbound_type: str | None
    outbound_type: str | None
    last_validated_at: datetime | None
    last_poll_ok_at: datetime | None
    last_poll_error: str | None
    consecutive_failures: int

    @classmethod
    def fields_of(
        cls, channel: Channel, campaigns: dict[int, Campaign]
    ) -> dict[str, Any]:
        default = campaigns.get(channel.default_campaign_id or 0)
        return {
            "id": channel.id,
            "name": channel.name,
            "address": channel.address,
            "active": channel.active,
            "default_campaign_id": channel.default_campaign_id,
            "default_campaign": CampaignOut.of(default) if default else None,
            "filter_count": channel.filter_count,
            "status": channel.status,
            "status_detail": channel.status_detail,
            "inbound_type": channel.inbound.type if channel.inbound else None,
            "outbound_type": channel.outbound.type if channel.outbound else None,
            "last_validated_at": channel.last_validated_at,
            "last_poll_ok_at": channel.last_poll_ok_at,
            "last_poll_error": channel.last_poll_error,
            "consecutive_failures": channel.consecutive_failures,
        }


class ChannelOut(ChannelSummary):
    inbound: InboundAccount | None
    outbound: OutboundAccount | None
    sync_all_folders: bool
    sync_recipient_only: bool
    validation: dict[str, Any] | None = Field(
        description="What the last validation found."
    )
    secrets: SecretsSet


# Filters


class FilterIn(_Body):
    field: MatchField
    operator: Operator = "contains"
    value: str = Field(description="Keyword, or a regular expression for regex.")
    campaign_id: int
    stop: bool = Field(True, description="Stop at this filter when it matches.")


class FilterPatch(_Body):
    field: MatchField | None = None
    operator: Operator | None = None
    value: str | None = None
    campaign_id: int | None = None
    stop: bool | None = None


class FilterOrderIn(_Body):
    filter_ids: list[int] = Field(description="Every filter of the channel, once.")


class FilterMoveIn(_Body):
    position: int = Field(ge=1, description="New place in the list, from 1.")


class FilterOut(BaseModel):
    id: int
    channel_id: int
    position: int
    field: MatchField
    operator: Operator
    value: str
    campaign_id: int
    campaign: CampaignOut | None
    stop: bool

    @classmethod
    def of(cls, item: Filter, campaigns: dict[int, Campaign]) -> FilterOut:
        campaign = campaigns.get(item.campaign_id)
        return cls(
            **item.model_dump(),
            campaign=CampaignOut.of(campaign) if campaign else None,
        )


class DryRunOut(BaseModel):
    campaign: CampaignOut | None = Field(
        description="Where the message would go; null without a default campaign."
    )
    filter: FilterOut | None = Field(description="The deciding filter, if any.")
    matched_text: str | None = Field(
        description="The part of the field the filter matched on, shortened."
    )
    reason: str = Field(description="The router's explanation of its choice.")
    sender: str
    subject: str
    defects: list[str] = Field(description="What the parser found broken.")
