"""A channel's filters: list, add, edit, reorder, delete, and try on a message."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool

from services.admin.channel_routes import check_campaign
from services.admin.context import Admin, CatalogDep, Reader, SettingsDep
from services.admin.dryrun import dry_run
from services.admin.schemas import (
    CampaignOut,
    DryRunOut,
    ErrorOut,
    FilterIn,
    FilterMoveIn,
    FilterOrderIn,
    FilterOut,
    FilterPatch,
)
from shared.catalog import Catalog, Filter
from shared.errors import NotFoundError
from shared.logs import get_logger

router = APIRouter(
    prefix="/api/channels/{channel_id}/filters",
    tags=["filters"],
    responses={
        401: {"model": ErrorOut, "description": "No valid token or session."},
        403: {"model": ErrorOut, "description": "A read-only token tried a change."},
        404: {"model": ErrorOut, "description": "No such channel or filter."},
        422: {"model": ErrorOut, "description": "Input breaking a rule."},
    },
)
log = get_logger(__name__)

EML_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The message as sent over the wire (an .eml file).",
        "content": {
            "message/rfc822": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}
            },
        },
    }
}


def _listing(catalog: Catalog, filters: list[Filter]) -> list[FilterOut]:
    campaigns = {c.id: c for c in catalog.campaigns()}
    return [FilterOut.of(f, campaigns) for f in filters]


def _own_filter(catalog: Catalog, channel_id: int, filter_id: int) -> Filter:
    item = catalog.filter(filter_id)
    if item.channel_id != channel_id:
        raise NotFoundError(f"channel {channel_id} has no filter {filter_id}")
    return item


@router.get("", response_model=list[FilterOut])
def list_filters(channel_id: int, _: Reader, catalog: CatalogDep) -> list[FilterOut]:
    """The channel's filters in the order they are tried."""
    return _listing(catalog, catalog.filters(channel_id))


@router.post("", response_model=FilterOut, status_code=status.HTTP_201_CREATED)
def add_filter(
    channel_id: int, body: FilterIn, who: Admin, catalog: CatalogDep
) -> FilterOut:
    """Append a filter; it is tried after the existing ones."""
    check_campaign(catalog, body.campaign_id, "campaign_id")
    created = catalog.add_filter(
        channel_id, body.field, body.value, body.campaign_id, body.operator, body.stop
    )
    log.info("filter added", channel_id=channel_id, filter_id=created.id, by=who.name)
    return _listing(catalog, [created])[0]


@router.put("/order", response_model=list[FilterOut])
def reorder_filters(
    channel_id: int, body: FilterOrderIn, who: Admin, catalog: CatalogDep
) -> list[FilterOut]:
    """Set the order of all the channel's filters at once."""
    ordered = catalog.reorder_filters(channel_id, body.filter_ids)
    log.info("filters reordered", channel_id=channel_id, by=who.name)
    return _listing(catalog, ordered)


@router.post(
    "/dry-run",
    response_model=DryRunOut,
    openapi_extra=EML_BODY,
)
async def try_filters(
    channel_id: int,
    request: Request,
    _: Reader,
    catalog: CatalogDep,
    settings: SettingsDep,
) -> DryRunOut:
    """Which filter would take this message, on what text, and to which
    campaign; nothing is routed or stored."""
    raw = await _read_limited(request, settings.max_message_bytes)
    return await run_in_threadpool(_dry_run, catalog, channel_id, raw, settings)


def _dry_run(catalog: Catalog, channel_id: int, raw: bytes, settings: Any) -> DryRunOut:
    channel = catalog.channel(channel_id)
    filters = catalog.filters(channel_id)
    outcome = dry_run(
        channel, filters, raw, attachment_limit=settings.attachment_limit_bytes
    )
    campaigns = {c.id: c for c in catalog.campaigns()}
    campaign = campaigns.get(outcome.campaign_id or 0)
    return DryRunOut(
        campaign=CampaignOut.of(campaign) if campaign else None,
        filter=FilterOut.of(outcome.filter, campaigns) if outcome.filter else None,
        matched_text=outcome.matched_text,
        reason=outcome.decision.reason,
        sender=outcome.parsed.sender_text,
        subject=outcome.parsed.headers.subject,
        defects=outcome.parsed.defects,
    )


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)

    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> HTTPException:
    return HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        f"the message is over {limit} bytes (MAILROOM_MAX_MESSAGE_BYTES), the "
        "largest the poller takes; try a smaller one",
    )


@router.patch("/{filter_id}", response_model=FilterOut)
def edit_filter(
    channel_id: int, filter_id: int, body: FilterPatch, who: Admin, catalog: CatalogDep
) -> FilterOut:
    """Change the fields given."""
    _own_filter(catalog, channel_id, filter_id)
    changes: dict[str, Any] = {
        name: getattr(body, name)
        for name in ("field", "operator", "value", "stop")
        if name in body.model_fields_set and getattr(body, name) is not None
    }
    if body.campaign_id is not None:
        check_campaign(catalog, body.campaign_id, "campaign_id")
        changes["campaign"] = body.campaign_id

    changed = catalog.update_filter(filter_id, **changes)
    log.info("filter changed", channel_id=channel_id, filter_id=filter_id, by=who.name)
    return _listing(catalog, [changed])[0]


@router.post("/{filter_id}/move", response_model=list[FilterOut])
def move_filter(
    channel_id: int,
    filter_id: int,
    body: FilterMoveIn,
    who: Admin,
    catalog: CatalogDep,
) -> list[FilterOut]:
    """Move one filter to a new place; returns the whole list."""
    _own_filter(catalog, channel_id, filter_id)
    ordered = catalog.move_filter(filter_id, body.position)
    log.info("filter moved", channel_id=channel_id, filter_id=filter_id, by=who.name)
    return _listing(catalog, ordered)


@router.delete("/{filter_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_filter(
    channel_id: int, filter_id: int, who: Admin, catalog: CatalogDep
) -> None:
    _own_filter(catalog, channel_id, filter_id)
    catalog.delete_filter(filter_id)
    log.info("filter deleted", channel_id=channel_id, filter_id=filter_id, by=who.name)
