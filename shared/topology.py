"""Names and declarations of every RabbitMQ exchange and queue.

Declaring is idempotent, so every process declares what it uses at start.
Each work queue dead-letters into ``<prefix>.dead`` with its own name as the
routing key, into a queue named ``<queue>.dead``: a message rejected without
requeue, or over the delivery limit of a quorum queue, is kept there.

    poller --RawEmail--> <p>.raw (direct) --> queue <p>.raw --> router
    router --RoutedEmail--> <p>.routed (topic, key = campaign key)
        --> queue <p>.campaign.<key> --> campaign systems
    campaign systems --OutboundEmail--> <p>.outbound (direct)
        --> queue <p>.outbound --> sender
    sender --DeliveryStatus--> <p>.delivery-status (topic, key = state)
        --> queue <p>.delivery-status --> campaign systems
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kombu import Exchange, Queue

RAW_KEY = "raw"
OUTBOUND_KEY = "outbound"


@dataclass
class Topology:
    prefix: str = "mailroom"
    queue_type: str = "classic"
    delivery_limit: int = 5
    retry_delays_seconds: tuple[int, ...] = (5, 30, 120, 600, 1800)
    _declared_campaigns: set[str] = field(default_factory=set, repr=False)

    @property
    def raw_exchange(self) -> str:
        return f"{self.prefix}.raw"

    @property
    def raw_queue(self) -> str:
        return f"{self.prefix}.raw"

    @property
    def routed_exchange(self) -> str:
        return f"{self.prefix}.routed"

    def campaign_queue(self, campaign_key: str) -> str:
        return f"{self.prefix}.campaign.{campaign_key}"

    @property
    def outbound_exchange(self) -> str:
        return f"{self.prefix}.outbound"

    @property
    def outbound_queue(self) -> str:
        return f"{self.prefix}.outbound"

    @property
    def status_exchange(self) -> str:
        return f"{self.prefix}.delivery-status"

    @property
    def status_queue(self) -> str:
        return f"{self.prefix}.delivery-status"

    def retry_queue(self, attempt: int) -> str:
        """Delay queue holding a send before its ``attempt``-th retry (from 1).

        The delay is part of the name, so changing the delays declares new
        queues instead of clashing with the arguments of the old ones.
        """
        delay = self.retry_delays_seconds[attempt - 1]
        return f"{self.prefix}.outbound.retry.{delay}s"

    @property
    def dead_exchange(self) -> str:
        return f"{self.prefix}.dead"

    def work_queues(self) -> list[str]:
        return [self.raw_queue, self.outbound_queue, self.status_queue]

    def _queue_arguments(self, name: str) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "x-dead-letter-exchange": self.dead_exchange,
            "x-dead-letter-routing-key": name,
        }
        if self.queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
            arguments["x-delivery-limit"] = self.delivery_limit
        return arguments

    def _declare_work_queue(
        self, channel: Any, name: str, exchange: Exchange, routing_key: str
    ) -> None:
        dead = Exchange(self.dead_exchange, "direct", durable=True)
        dead_args = {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}
        Queue(
            f"{name}.dead",
            dead,
            routing_key=name,
            durable=True,
            queue_arguments=dead_args,
        ).declare(channel=channel)
        Queue(
            name,
            exchange,
            routing_key=routing_key,
            durable=True,
            queue_arguments=self._queue_arguments(name),
        ).declare(channel=channel)

    def declare(self, channel: Any) -> None:
        """Declare every exchange and shared queue; campaign queues come later."""
        raw = Exchange(self.raw_exchange, "direct", durable=True)
        outbound = Exchange(self.outbound_exchange, "direct", durable=True)
        status = Exchange(self.status_exchange, "topic", durable=True)
        Exchange(self.routed_exchange, "topic", durable=True).declare(channel=channel)
        self._declare_work_queue(channel, self.raw_queue, raw, RAW_KEY)
        self._declare_work_queue(channel, self.outbound_queue, outbound, OUTBOUND_KEY)
        self._declare_work_queue(channel, self.status_queue, status, "#")
        self._declare_retry_queues(channel)

    def _declare_retry_queues(self, channel: Any) -> None:
        # Messages wait in a delay queue until its TTL dead-letters them back
        # to the outbound exchange: no worker sleeps on an unacked message.
        # One queue per delay keeps every queue's messages expiring in order.
        for attempt, delay in enumerate(self.retry_delays_seconds, start=1):
            Queue(
                self.retry_queue(attempt),
                durable=True,
                queue_arguments={
                    "x-message-ttl": delay * 1000,
                    "x-dead-letter-exchange": self.outbound_exchange,
                    "x-dead-letter-routing-key": OUTBOUND_KEY,
                },
            ).declare(channel=channel)

    def forget_campaigns(self) -> None:
        """After a reconnect: declare campaign queues again on first use."""
        self._declared_campaigns.clear()

    def declare_campaign(self, channel: Any, campaign_key: str) -> str:
        """Declare a campaign's queue once per process; returns its routing key."""
        if campaign_key not in self._declared_campaigns:
            routed = Exchange(self.routed_exchange, "topic", durable=True)
            self._declare_work_queue(
                channel, self.campaign_queue(campaign_key), routed, campaign_key
            )
            self._declared_campaigns.add(campaign_key)
        return campaign_key
