"""Campaigns: listed for the console's choices, and added as the CLI adds them."""

from __future__ import annotations

from fastapi import APIRouter, status

from services.admin.context import Admin, CatalogDep, Reader, SettingsDep
from services.admin.schemas import CampaignIn, CampaignOut, ErrorOut
from shared import broker
from shared.errors import BrokerError
from shared.logs import get_logger
from shared.settings import Settings
from shared.topology import Topology

router = APIRouter(prefix="/api/campaigns", tags=["campaigns"])
DECLARE_ERRORS: tuple[type[BaseException], ...] = (
    BrokerError,
    *broker.CONNECTION_ERRORS,
)
log = get_logger(__name__)


@router.get("", response_model=list[CampaignOut])
def list_campaigns(_: Reader, catalog: CatalogDep) -> list[CampaignOut]:
    """Every campaign, by key."""
    return [CampaignOut.of(c) for c in catalog.campaigns()]


@router.post(
    "",
    response_model=CampaignOut,
    status_code=status.HTTP_201_CREATED,
    responses={422: {"model": ErrorOut}},
)
def add_campaign(
    body: CampaignIn, _: Admin, catalog: CatalogDep, settings: SettingsDep
) -> CampaignOut:
    """Add a campaign and declare its queue, so campaign systems can subscribe."""
    created = catalog.add_campaign(body.key.strip(), body.name.strip() or body.key)
    _declare_queue(settings, created.key)
    log.info("campaign added", campaign_id=created.id, campaign_key=created.key)
    return CampaignOut.of(created)


def _declare_queue(settings: Settings, key: str) -> None:
    topology = Topology(
        prefix=settings.broker_prefix,
        queue_type=settings.queue_type,
        delivery_limit=settings.delivery_limit,
    )
    try:
        connection = broker.connect(settings.amqp_url.get_secret_value(), attempts=2)
        try:
            broker.declare(connection, lambda ch: topology.declare_campaign(ch, key))
        finally:
            connection.release()
    except DECLARE_ERRORS as exc:
        # The router declares the queue before it routes the first message
        # there, so only subscribing ahead of time has to wait for RabbitMQ.
        log.warning(
            "campaign queue not declared; the router declares it on first use",
            campaign_key=key,
            error=f"{type(exc).__name__}: {exc}",
        )
