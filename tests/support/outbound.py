"""Replies published as a campaign system would, and the statuses that come back."""

from __future__ import annotations

from shared import broker
from shared.broker import Outgoing, Publisher
from shared.models import DeliveryStatus, OutboundEmail
from shared.settings import Settings
from shared.topology import OUTBOUND_KEY, Topology
from tests.conftest import AMQP_URL
from tests.support.queues import drain


def publish_replies(settings: Settings, *emails: OutboundEmail) -> None:
    topology = Topology(prefix=settings.broker_prefix)
    connection = broker.connect(AMQP_URL, attempts=3)
    try:
        broker.declare(connection, topology.declare)
        Publisher(connection).publish_all(
            [
                Outgoing(
                    topology.outbound_exchange,
                    OUTBOUND_KEY,
                    email.to_json(),
                    email.idempotency_key,
                )
                for email in emails
            ]
        )
    finally:
        connection.release()


def statuses(settings: Settings, count: int) -> list[DeliveryStatus]:
    """The first ``count`` delivery statuses published, waiting up to 60 s."""
    queue = Topology(prefix=settings.broker_prefix).status_queue
    taken = drain(AMQP_URL, [queue], until=lambda t: len(t) >= count, timeout=60)
    return [DeliveryStatus.model_validate_json(m.body) for m in taken]
