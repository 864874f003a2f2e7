"""Channels: list and search, create, view, edit, enable, validate, delete."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, status

from services.admin import validation
from services.admin.context import Admin, CatalogDep, Reader, SettingsDep
from services.admin.schemas import (
    ActiveIn,
    ChannelIn,
    ChannelOut,
    ChannelPatch,
    ChannelSummary,
    ErrorOut,
    SecretsSet,
)
from shared.catalog import Catalog, Channel, ChannelStatus
from shared.errors import ValidationFailed
from shared.logs import get_logger

router = APIRouter(
    prefix="/api/channels",
    tags=["channels"],
    responses={
        401: {"model": ErrorOut, "description": "No valid token or session."},
        403: {"model": ErrorOut, "description": "A read-only token tried a change."},
        422: {"model": ErrorOut, "description": "Input breaking a rule."},
    },
)
log = get_logger(__name__)


def check_campaign(catalog: Catalog, campaign_id: int | None, field: str) -> None:
    """Refuse a campaign id that does not exist, naming the input."""
    if campaign_id is None:
        return
    if all(c.id != campaign_id for c in catalog.campaigns()):
        raise ValidationFailed(
            field, f"no campaign has id {campaign_id}; pick one from GET /api/campaigns"
        )


def channel_out(catalog: Catalog, channel: Channel) -> ChannelOut:
    campaigns = {c.id: c for c in catalog.campaigns()}
    return ChannelOut(
        **ChannelSummary.fields_of(channel, campaigns),
        inbound=channel.inbound,
        outbound=channel.outbound,
        sync_all_folders=channel.sync_all_folders,
        sync_recipient_only=channel.sync_recipient_only,
        validation=channel.validation,
        secrets=SecretsSet.of(set(catalog.secrets(channel.id))),
    )


@router.get("", response_model=list[ChannelSummary])
def search_channels(
    _: Reader,
    catalog: CatalogDep,
    q: Annotated[str, Query(description="Quick search: any part of the name.")] = "",
    name: Annotated[str, Query(description="Any part of the name.")] = "",
    address: Annotated[str, Query(description="Any part of the address.")] = "",
    default_campaign_id: Annotated[
        int | None, Query(description="Channels whose default campaign this is.")
    ] = None,
    status_: Annotated[
        Literal["all", "active", "inactive"],
        Query(alias="status", description="active: validated and working."),
    ] = "all",
) -> list[ChannelSummary]:
    """Channels matching every criterion given, by name."""
    check_campaign(catalog, default_campaign_id, "default_campaign_id")
    found = catalog.search_channels(
        text=q,
        name=name,
        address=address,
        default_campaign=default_campaign_id,
        status=None if status_ == "all" else ChannelStatus(status_),
    )
    campaigns = {c.id: c for c in catalog.campaigns()}
    return [ChannelSummary(**ChannelSummary.fields_of(c, campaigns)) for c in found]


@router.post("", response_model=ChannelOut, status_code=status.HTTP_201_CREATED)
def add_channel(body: ChannelIn, who: Admin, catalog: CatalogDep) -> ChannelOut:
    """Add a channel; with ``active`` it is polled at once (all or nothing)."""
    check_campaign(catalog, body.default_campaign_id, "default_campaign_id")
    with catalog.conn.transaction():
        created = catalog.add_channel(
            body.name,
            address=body.address,
            default_campaign=body.default_campaign_id,
            inbound=_account(body.inbound),
            outbound=_account(body.outbound),
            secrets={k: v for k, v in body.secrets.changes().items() if v},
            sync_all_folders=body.sync_all_folders,
            sync_recipient_only=body.sync_recipient_only,
        )
        if body.active:
            created = catalog.set_active(created.id, True)

    log.info("channel added", channel_id=created.id, by=who.name)
    return channel_out(catalog, created)


@router.get("/{channel_id}", response_model=ChannelOut)
def get_channel(channel_id: int, _: Reader, catalog: CatalogDep) -> ChannelOut:
    """Everything about a channel; secrets only as whether they are set."""
    return channel_out(catalog, catalog.channel(channel_id))


@router.patch("/{channel_id}", response_model=ChannelOut)
def edit_channel(
    channel_id: int, body: ChannelPatch, who: Admin, catalog: CatalogDep
) -> ChannelOut:
    """Change the fields given; a change of account or secret needs a new
    validation."""
    given = body.model_fields_set
    changes: dict[str, Any] = {}
    for field in ("name", "address"):
        if field in given:
            changes[field] = getattr(body, field) or ""
    for field in ("sync_all_folders", "sync_recipient_only"):
        if field in given and getattr(body, field) is not None:
            changes[field] = getattr(body, field)
    if "default_campaign_id" in given:
        check_campaign(catalog, body.default_campaign_id, "default_campaign_id")
        changes["default_campaign"] = body.default_campaign_id
    if "inbound" in given:
        changes["inbound"] = _account(body.inbound)
    if "outbound" in given:
        changes["outbound"] = _account(body.outbound)
    if body.secrets is not None:
        changes["secrets"] = body.secrets.changes()

    with catalog.conn.transaction():
        # Deactivate first and activate last, so one request may both stop a
        # channel and remove what activation needs, or supply it and start.
        if body.active is False:
            catalog.set_active(channel_id, False)
        changed = catalog.update_channel(channel_id, **changes)
        if body.active:
            changed = catalog.set_active(channel_id, True)

    log.info(
        "channel changed", channel_id=channel_id, fields=sorted(given), by=who.name
    )
    return channel_out(catalog, changed)


@router.put("/{channel_id}/active", response_model=ChannelOut)
def set_active(
    channel_id: int, body: ActiveIn, who: Admin, catalog: CatalogDep
) -> ChannelOut:
    """Enable or disable polling; enabling needs a default campaign."""
    changed = catalog.set_active(channel_id, body.active)
    event = "channel enabled" if body.active else "channel disabled"
    log.info(event, channel_id=channel_id, by=who.name)
    return channel_out(catalog, changed)


@router.delete("/{channel_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_channel(channel_id: int, who: Admin, catalog: CatalogDep) -> None:
    """Delete the channel with its filters and checkpoints, permanently."""
    catalog.delete_channel(channel_id)
    log.info("channel deleted", channel_id=channel_id, by=who.name)


@router.post("/{channel_id}/validate", response_model=ChannelOut)
def validate_channel(
    channel_id: int, who: Admin, catalog: CatalogDep, settings: SettingsDep
) -> ChannelOut:
    """Try the channel's servers and credentials now (within 60 s) and keep
    the outcome, which sets the channel's status."""
    channel = catalog.channel(channel_id)
    report = validation.validate_channel(channel, catalog.secrets(channel.id), settings)
    stored = validation.record_validation(
        catalog.conn, channel.id, report, box=catalog.box
    )
    log.info(
        "channel validated",
        channel_id=channel.id,
        status=stored.status.value,
        by=who.name,
    )
    return channel_out(catalog, stored)


def _account(account: Any) -> dict[str, Any] | None:
    return account.model_dump(mode="json") if account is not None else None
