"""RabbitMQ connections, a publisher with pipelined confirms, a batch consumer.

Publishing waits for confirms per batch, not per message: many publishes are
in flight at once and one wait covers them all. Consumers take a batch of
deliveries (bounded by the prefetch), and the worker acknowledges them only
after everything they caused is confirmed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import amqp
import kombu.exceptions
from kombu import Connection

from shared.errors import BrokerError, PublishNotConfirmed
from shared.logs import get_logger
from shared.metrics import PUBLISH_CONFIRM_SECONDS

log = get_logger(__name__)

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    amqp.exceptions.ConnectionError,
    amqp.exceptions.ChannelError,
    amqp.exceptions.RecoverableConnectionError,
    ConnectionError,
    OSError,
)


def connect(url: str, *, attempts: int | None = None) -> Connection:
    """Open a connection, retrying with backoff; ``attempts=None`` retries forever."""
    conn = Connection(url, heartbeat=30, transport_options={"confirm_publish": False})

    def _retrying(exc: BaseException, interval: float) -> None:
        log.warning("broker unreachable, retrying", error=str(exc), in_seconds=interval)

    try:
        conn.ensure_connection(
            errback=_retrying,
            max_retries=attempts,
            interval_start=0.5,
            interval_step=1.0,
            interval_max=10.0,
        )
    except (*conn.connection_errors, kombu.exceptions.OperationalError) as exc:
        # kombu re-raises the last failure of a bounded retry as its own error.
        raise BrokerError(
            "cannot connect to RabbitMQ; check MAILROOM_AMQP_URL and that the "
            f"server is running ({exc})"
        ) from exc
    return conn


@dataclass(frozen=True)
class Outgoing:
    """One message to publish."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    headers: dict[str, Any] | None = None


class Publisher:
    """Publishes persistent messages on its own channel with publisher confirms."""

    def __init__(self, connection: Connection, *, confirm_timeout: float = 30.0):
        self.connection = connection
        self.confirm_timeout = confirm_timeout
        self.channel: amqp.Channel = connection.channel()
        self.channel.confirm_select()
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.channel.events["basic_return"].add(self._on_return)
        self._next_tag = 1
        self._pending: dict[int, None] = {}
        self._failures: list[str] = []

    def publish(self, out: Outgoing) -> None:
        message = amqp.Message(
            out.body,
            content_type="application/json",
            delivery_mode=2,
            message_id=out.message_id,
            application_headers=out.headers or {},
        )
        self.channel.basic_publish(
            message, exchange=out.exchange, routing_key=out.routing_key, mandatory=True
        )
        self._pending[self._next_tag] = None
        self._next_tag += 1

    def publish_all(self, batch: list[Outgoing]) -> None:
        for out in batch:
            self.publish(out)
        self.wait()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def wait(self) -> None:
        """Block until every publish so far is confirmed; raise if any was not."""
        started = time.monotonic()
        deadline = started + self.confirm_timeout
        while self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishNotConfirmed(
                    f"{len(self._pending)} publishes not confirmed within "
                    f"{self.confirm_timeout:.0f} s"
                )
            try:
                self.connection.drain_events(timeout=min(remaining, 1.0))
            except TimeoutError:
                continue
        PUBLISH_CONFIRM_SECONDS.observe(time.monotonic() - started)
        if self._failures:
            failures, self._failures = self._failures, []
            raise PublishNotConfirmed("; ".join(failures[:3]))

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._failures.append(f"broker refused publish {delivery_tag}")
        self._settle(delivery_tag, multiple)

    def _on_return(
        self, _exc: Exception, exchange: str, routing_key: str, _message: Any
    ) -> None:
        self._failures.append(f"no queue bound to {exchange!r} for {routing_key!r}")

    def _settle(self, delivery_tag: int, multiple: bool) -> None:
        if not multiple:
            self._pending.pop(delivery_tag, None)
            return
        for tag in list(self._pending):
            if tag > delivery_tag:
                break
            del self._pending[tag]


class BatchConsumer:
    """Consumes one queue with manual acks and a bounded prefetch."""

    def __init__(self, connection: Connection, queue: str, prefetch: int):
        self.connection = connection
        self.queue = queue
        self.channel: amqp.Channel = connection.channel()
        self.channel.basic_qos(0, prefetch, False)
        self._buffer: list[amqp.Message] = []
        self.tag = self.channel.basic_consume(queue, callback=self._buffer.append)

    def next_batch(self, max_size: int, wait_seconds: float) -> list[amqp.Message]:
        """Wait up to ``wait_seconds`` for one delivery, then take what is ready."""
        if not self._buffer:
            try:
                self.connection.drain_events(timeout=wait_seconds)
            except TimeoutError:
                keep_alive(self.connection)
                return []
        while len(self._buffer) < max_size:
            try:
                self.connection.drain_events(timeout=0.001)
            except TimeoutError:
                break
        keep_alive(self.connection)
        batch = self._buffer[:max_size]
        del self._buffer[:max_size]
        return batch

    def ack(self, message: amqp.Message) -> None:
        self.channel.basic_ack(message.delivery_tag)

    def ack_through(self, message: amqp.Message) -> None:
        """Acknowledge this delivery and every earlier one on the channel."""
        self.channel.basic_ack(message.delivery_tag, multiple=True)

    def reject(self, message: amqp.Message, *, requeue: bool) -> None:
        self.channel.basic_reject(message.delivery_tag, requeue=requeue)

    def cancel(self) -> None:
        self.channel.basic_cancel(self.tag)


def keep_alive(connection: Connection) -> None:
    """Read what the broker sent and send a heartbeat when one is due.

    kombu sends heartbeats only when asked, and the broker closes a connection
    it heard nothing from for two heartbeat intervals: a process that holds a
    connection must call this at least once per interval (30 s).
    """
    try:
        connection.drain_events(timeout=0.001)
    except TimeoutError:
        pass
    connection.heartbeat_check()


def declare(connection: Connection, declare_with: Callable[[Any], object]) -> None:
    """Run declarations on a short-lived channel."""
    channel = connection.channel()
    try:
        declare_with(channel)
    finally:
        channel.close()
