"""The consume-handle-publish-acknowledge loop that router and sender share.

A batch of deliveries is handled, everything the batch produced is published
and confirmed, and only then is the batch acknowledged. A crash anywhere
before the acknowledgement returns the whole batch to the queue, so work may
repeat but is never lost. A message that cannot be handled is quarantined
with its reason and acknowledged: it is kept, not retried forever.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import amqp
import psycopg
import structlog
from kombu import Connection

from shared import broker, db, quarantine
from shared.broker import BatchConsumer, Outgoing, Publisher
from shared.db import DbConnection
from shared.errors import BrokerError, DatabaseUnavailable, MessageRejected
from shared.logs import get_logger
from shared.metrics import HANDLE_SECONDS, MESSAGES, Outcome, Stage
from shared.settings import Settings
from shared.topology import Topology

log = get_logger(__name__)

RECOVERABLE: tuple[type[BaseException], ...] = (
    *broker.CONNECTION_ERRORS,
    BrokerError,
    DatabaseUnavailable,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)


@dataclass
class Handled:
    """What handling one delivery produced."""

    outcome: Outcome
    publish: list[Outgoing] = field(default_factory=list)
    after_confirm: Callable[[], None] | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Reconnecting:
    """Runs ``_run_connected`` until stopped, reconnecting after outages.

    The wait doubles from 0.5 s to 15 s, and starts over once a subclass
    sets ``_backoff`` back after connecting.
    """

    ready: threading.Event
    _backoff: float = 0.5

    def _run_connected(self, stop: threading.Event) -> None:
        raise NotImplementedError

    def stopped_context(self) -> dict[str, Any]:
        """What the final "stopped" log line names."""
        return {}

    def run(self, stop: threading.Event) -> None:
        self._backoff = 0.5
        while not stop.is_set():
            try:
                self._run_connected(stop)
            except RECOVERABLE as exc:
                self.ready.clear()
                log.warning(
                    "connection lost, reconnecting",
                    error=f"{type(exc).__name__}: {exc}",
                    in_seconds=self._backoff,
                )
                stop.wait(self._backoff)
                self._backoff = min(self._backoff * 2, 15.0)
        log.info("stopped", **self.stopped_context())


class ConsumerWorker(Reconnecting, ABC):
    """Consumes one queue until stopped, reconnecting after outages."""

    stage: Stage

    def __init__(self, settings: Settings, topology: Topology | None = None):
        self.settings = settings
        self.topology = topology or Topology(
            prefix=settings.broker_prefix,
            queue_type=settings.queue_type,
            delivery_limit=settings.delivery_limit,
            retry_delays_seconds=tuple(settings.retry_delays_seconds),
        )
        self.ready = threading.Event()
        self._backoff = 0.5
        self.db: DbConnection
        self.connection: Connection
        self.publisher: Publisher

    @property
    @abstractmethod
    def queue(self) -> str:
        """The queue this worker consumes."""

    @abstractmethod
    def handle_batch(self, messages: list[amqp.Message]) -> list[Handled]:
        """Handle each delivery; raise only for outages worth a reconnect."""

    def open(self) -> None:
        """Called after (re)connecting; declare what the worker needs."""
        broker.declare(self.connection, self.topology.declare)

    def close(self) -> None:
        """Called before disconnecting."""

    def confirmed(self) -> None:
        """Called once a batch's publishes are confirmed, before it is acked."""

    def stopped_context(self) -> dict[str, Any]:
        return {"queue": self.queue}

    def _run_connected(self, stop: threading.Event) -> None:
        with db.connect(self.settings.database_url.get_secret_value()) as conn:
            self.db = conn
            self.connection = broker.connect(self.settings.amqp_url.get_secret_value())
            try:
                self.open()
                self.publisher = Publisher(self.connection)
                consumer = BatchConsumer(
                    self.connection, self.queue, self.settings.prefetch
                )
                self.ready.set()
                # Connected again: the next outage starts over with a short wait.
                self._backoff = 0.5
                log.info("consuming", queue=self.queue, prefetch=self.settings.prefetch)
                while not stop.is_set():
                    batch = consumer.next_batch(self.settings.prefetch, 1.0)
                    if batch:
                        self._process(consumer, batch)
                consumer.cancel()
            finally:
                self.ready.clear()
                self.close()
                self.connection.release()

    def _process(self, consumer: BatchConsumer, batch: list[amqp.Message]) -> None:
        fresh = [m for m in batch if not m.delivery_info.get("redelivered")]
        redelivered = [m for m in batch if m.delivery_info.get("redelivered")]
        if fresh:
            self._process_together(consumer, fresh)

        # A redelivery may be the message that stopped the last worker, so
        # each is handled and acknowledged alone to spare its batch mates.
        for message in redelivered:
            if self._over_delivery_limit(message):
                self._finish(consumer, [message], [self._give_up(message)])
            else:
                self._process_together(consumer, [message])
                self._forget_attempts(message)

    def _process_together(
        self, consumer: BatchConsumer, batch: list[amqp.Message]
    ) -> None:
        started = time.perf_counter()
        results = self._handle_safely(batch)
        self._finish(consumer, batch, results, started)

    def _finish(
        self,
        consumer: BatchConsumer,
        batch: list[amqp.Message],
        results: list[Handled],
        started: float | None = None,
    ) -> None:
        for handled in results:
            for out in handled.publish:
                self.publisher.publish(out)
        self.publisher.wait()
        self.confirmed()

        for handled in results:
            if handled.after_confirm is not None:
                handled.after_confirm()

        # Each delivery alone: a multiple ack would also take deliveries with
        # lower tags that are not handled yet (redeliveries wait for the fresh
        # messages of their batch), and a crash would then lose them.
        for message in batch:
            consumer.ack(message)

        per_message = (time.perf_counter() - started) / len(batch) if started else 0.0
        for message, handled in zip(batch, results, strict=True):
            MESSAGES.labels(stage=self.stage, outcome=handled.outcome).inc()
            HANDLE_SECONDS.labels(stage=self.stage).observe(per_message)
            structlog.contextvars.bind_contextvars(
                queue=self.queue,
                message_id=message.properties.get("message_id"),
                delivery_tag=message.delivery_tag,
            )
            log.info("handled", outcome=handled.outcome, **handled.details)
            structlog.contextvars.unbind_contextvars(
                "queue", "message_id", "delivery_tag"
            )

    def _handle_safely(self, batch: list[amqp.Message]) -> list[Handled]:
        try:
            results = self.handle_batch(batch)
        except RECOVERABLE:
            raise
        except Exception:
            if len(batch) == 1:
                log.exception("handler failed", queue=self.queue)
                return [self._quarantine_unexpected(batch[0])]
            # Find the message that broke the batch by handling each alone.
            return [r for m in batch for r in self._handle_safely([m])]
        assert len(results) == len(batch)
        return results

    def _quarantine_unexpected(self, message: amqp.Message) -> Handled:
        return self.quarantine(
            message, "the worker failed on this message; see the service log"
        )

    def quarantine(
        self,
        message: amqp.Message,
        reason: str,
        *,
        channel_id: int | None = None,
        detail: str = "",
    ) -> Handled:
        entry = quarantine.put(
            self.db,
            stage=self.stage,
            reason=reason,
            body=bytes(message.body),
            queue=self.queue,
            channel_id=channel_id,
            detail=detail,
        )
        return Handled(
            Outcome.QUARANTINED,
            details={
                "reason": reason,
                "quarantine_id": entry,
                "channel_id": channel_id,
            },
        )

    def rejected(
        self, message: amqp.Message, exc: MessageRejected, **kw: Any
    ) -> Handled:
        return self.quarantine(message, str(exc), **kw)

    def _over_delivery_limit(self, message: amqp.Message) -> bool:
        headers = message.properties.get("application_headers") or {}
        if "x-delivery-count" in headers:
            return int(headers["x-delivery-count"]) >= self.settings.delivery_limit
        message_id = message.properties.get("message_id") or ""
        if not message_id:
            return False
        row = self.db.execute(
            """
            INSERT INTO delivery_attempts (queue, message_id) VALUES (%s, %s)
            ON CONFLICT (queue, message_id) DO UPDATE
            SET attempts = delivery_attempts.attempts + 1, updated_at = now()
            RETURNING attempts
            """,
            (self.queue, message_id),
        ).fetchone()
        return row is not None and int(row["attempts"]) >= self.settings.delivery_limit

    def _forget_attempts(self, message: amqp.Message) -> None:
        """Handled at last: another message with this id (the same email
        published twice, a retry) starts a count of its own."""
        message_id = message.properties.get("message_id") or ""
        if message_id:
            self.db.execute(
                "DELETE FROM delivery_attempts WHERE queue = %s AND message_id = %s",
                (self.queue, message_id),
            )

    def _give_up(self, message: amqp.Message) -> Handled:
        return self.quarantine(
            message,
            f"delivered {self.settings.delivery_limit} times without being "
            "handled; the worker probably crashes on it",
        )
