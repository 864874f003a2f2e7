"""The poller: new mail from every active channel's mailbox, published as RawEmail.

Each loop re-reads the active channels from PostgreSQL, so a channel activated
or deactivated by an administrator is picked up or dropped without a restart.
A poller holds a lease on each channel it polls; several pollers share the
channels, and one that dies loses its leases when they expire.

The order of every poll is fetch, publish, wait for the broker's confirms,
and only then move the checkpoint (IMAP) or delete the message (POP3): a crash
at any point repeats work, which the router de-duplicates, and loses none.
"""

from __future__ import annotations

import contextvars
import json
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Generator, Iterable, Iterator
from typing import Any

import psycopg
import structlog

from services.poller.fetched import Fetched
from services.poller.graph import GraphMailbox
from services.poller.graph_state import DeltaLinkStore
from services.poller.idle import IdleWatcher
from services.poller.imap import ImapMailbox
from services.poller.leases import Leases
from services.poller.pop3 import Pop3Mailbox
from services.poller.recipients import addressed_to
from shared import blobs, broker, db, quarantine
from shared.accounts import GraphAccount, ImapAccount, Pop3Account
from shared.broker import Outgoing, Publisher
from shared.catalog import Catalog, Channel
from shared.checkpoints import Checkpoint, CheckpointStore
from shared.errors import ChannelError, MailroomError
from shared.logs import get_logger
from shared.metrics import (
    CHANNEL_MESSAGES,
    CONSECUTIVE_FAILURES,
    CREDENTIAL_EXPIRY,
    LAST_POLL_SUCCESS,
    MESSAGE_BYTES,
    MESSAGES,
    POLLS,
    QUARANTINE_WAITING,
    Credential,
    Outcome,
    Stage,
    forget_channel,
)
from shared.models import RawEmail
from shared.oauth import IMAP_SCOPES, POP3_SCOPES
from shared.secrets import SecretBox
from shared.settings import Settings
from shared.topology import RAW_KEY, Topology
from shared.worker import RECOVERABLE, Reconnecting
from shared.xoauth2 import Bearer, Bearers

log = get_logger(__name__)

Batch = tuple[list[Fetched], Checkpoint]


class Poller(Reconnecting):
    stage = Stage.POLLER

    def __init__(self, settings: Settings, topology: Topology | None = None):
        self.settings = settings
        self.topology = topology or Topology(
            prefix=settings.broker_prefix, queue_type=settings.queue_type
        )
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.ready = threading.Event()
        self.box = SecretBox(settings.secret_keys)
        self.watchers: dict[int, IdleWatcher] = {}
        self.bearers = Bearers(timeout=settings.smtp_timeout_seconds)
        self._requested: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._backoff = 0.5
        self._reported: set[int] = set()
        self._quarantine_reported_at = float("-inf")

    def stopped_context(self) -> dict[str, Any]:
        return {"owner": self.owner}

    def _run_connected(self, stop: threading.Event) -> None:
        with db.connect(self.settings.database_url.get_secret_value()) as conn:
            self.db = conn
            self.catalog = Catalog(conn, self.box)
            self.leases = Leases(conn, self.owner, self.settings.lease_seconds)
            connection = broker.connect(self.settings.amqp_url.get_secret_value())
            try:
                broker.declare(connection, self.topology.declare)
                self.publisher = Publisher(connection)
                self.ready.set()
                # Connected again: the next outage starts over with a short wait.
                self._backoff = 0.5
                log.info("polling", owner=self.owner)
                self._loop(stop)
            finally:
                self.ready.clear()
                self._stop_watchers(set(self.watchers))
                self._release_leases()
                connection.release()

    def wake_up(self, channel_id: int) -> None:
        """Poll this channel at the next turn of the loop (IDLE saw new mail)."""
        with self._lock:
            self._requested.add(channel_id)
        self._wake.set()

    def _loop(self, stop: threading.Event) -> None:
        announced_idle = False
        while not stop.is_set():
            with self._lock:
                requested, self._requested = self._requested, set()
            share = self.leases.refresh(self.settings.poll_interval_seconds, requested)
            self._sync_watchers(set(share.owned))
            self._forget_lost_channels(set(share.owned))
            self._report_quarantine()
            if not share.owned and not announced_idle:
                if not self.catalog.channels(active_only=True):
                    log.info(
                        "no active channel to poll; add one with `mailroom channel "
                        "add` and `mailroom channel activate`"
                    )
                announced_idle = True

            for channel_id in share.due:
                if stop.is_set():
                    break
                self.poll_channel(channel_id)

            self._wake.wait(1.0)
            self._wake.clear()
            broker.keep_alive(self.publisher.connection)

    def _sync_watchers(self, owned: set[int]) -> None:
        """IDLE on the IMAP channels this poller holds, and on no others."""
        self._stop_watchers(set(self.watchers) - owned)
        for channel_id in owned - set(self.watchers):
            channel = self.catalog.channel(channel_id)
            account = channel.inbound
            if isinstance(account, ImapAccount) and account.idle:
                watcher = IdleWatcher(
                    channel_id,
                    account,
                    self._credential(channel, self.catalog.secrets(channel_id)),
                    wake=self.wake_up,
                    timeout=self.settings.smtp_timeout_seconds,
                )
                watcher.start()
                self.watchers[channel_id] = watcher
        for channel_id, watcher in list(self.watchers.items()):
            if not watcher.alive:
                del self.watchers[channel_id]

    def _forget_lost_channels(self, owned: set[int]) -> None:
        """A channel another poller took, or that was deactivated, is not ours
        to report on: its gauges would freeze and mislead the alerts."""
        for channel_id in self._reported - owned:
            forget_channel(channel_id)
        self._reported &= owned

    def _report_quarantine(self) -> None:
        if time.monotonic() - self._quarantine_reported_at < 30:
            return
        rows = self.db.execute(
            "SELECT stage, count(*) AS n FROM quarantine "
            "WHERE replayed_at IS NULL GROUP BY stage"
        ).fetchall()
        counts = {r["stage"]: int(r["n"]) for r in rows}
        for stage in Stage:
            QUARANTINE_WAITING.labels(stage=stage).set(counts.get(stage, 0))
        self._quarantine_reported_at = time.monotonic()

    def _stop_watchers(self, channel_ids: set[int]) -> None:
        for channel_id in channel_ids:
            self.watchers.pop(channel_id).stop()

    def _release_leases(self) -> None:
        try:
            self.leases.release_all()
        except psycopg.Error:
            log.warning("could not release leases; they expire on their own")

    def poll_channel(self, channel_id: int) -> int:
        """Poll one channel now; returns how many messages were published."""
        structlog.contextvars.bind_contextvars(channel_id=channel_id)
        started = time.monotonic()
        self.db.execute(
            "UPDATE channels SET last_poll_at = now() WHERE id = %s", (channel_id,)
        )
        try:
            channel = self.catalog.channel(channel_id)
            secrets = self.catalog.secrets(channel_id)
            published = self._poll(channel, secrets)
        except (ChannelError, MailroomError) as exc:
            if isinstance(exc, RECOVERABLE):
                raise
            self._record_failure(channel_id, exc)
            return 0
        finally:
            structlog.contextvars.unbind_contextvars("channel_id")

        self.db.execute(
            """
            UPDATE channels SET last_poll_ok_at = now(), last_poll_error = NULL,
                consecutive_failures = 0
            WHERE id = %s
            """,
            (channel_id,),
        )
        self._reported.add(channel_id)
        self._report_credentials(channel)
        POLLS.labels(channel_id=str(channel_id), result="ok").inc()
        LAST_POLL_SUCCESS.labels(channel_id=str(channel_id)).set(time.time())
        CONSECUTIVE_FAILURES.labels(channel_id=str(channel_id)).set(0)
        log.info(
            "polled",
            channel_id=channel_id,
            published=published,
            seconds=round(time.monotonic() - started, 3),
        )
        return published

    def _report_credentials(self, channel: Channel) -> None:
        for account in (channel.inbound, channel.outbound):
            if isinstance(account, GraphAccount) and account.client_secret_expires_at:
                CREDENTIAL_EXPIRY.labels(
                    channel_id=str(channel.id), credential=Credential.CLIENT_SECRET
                ).set(account.client_secret_expires_at.timestamp())

    def _record_failure(self, channel_id: int, exc: Exception) -> None:
        row = self.db.execute(
            """
            UPDATE channels SET last_poll_error = %s,
                consecutive_failures = consecutive_failures + 1
            WHERE id = %s RETURNING consecutive_failures
            """,
            (str(exc)[:1000], channel_id),
        ).fetchone()
        failures = int(row["consecutive_failures"]) if row else 0
        self._reported.add(channel_id)
        POLLS.labels(channel_id=str(channel_id), result="failed").inc()
        CONSECUTIVE_FAILURES.labels(channel_id=str(channel_id)).set(failures)
        log.warning(
            "poll failed, retrying next interval",
            channel_id=channel_id,
            error=str(exc),
            error_type=type(exc).__name__,
            consecutive_failures=failures,
        )

    def _poll(self, channel: Channel, secrets: dict[str, str]) -> int:
        account = channel.inbound
        timeout = self.settings.smtp_timeout_seconds
        if isinstance(account, ImapAccount):
            credential = self._credential(channel, secrets)
            try:
                with ImapMailbox(account, credential, timeout=timeout) as mailbox:
                    return self._poll_imap(channel, mailbox)
            finally:
                if not isinstance(credential, str):
                    self.catalog.keep_rotated_secrets(
                        channel.id, secrets, credential.updated_secrets
                    )
        if isinstance(account, Pop3Account):
            credential = self._credential(channel, secrets)
            try:
                with Pop3Mailbox(account, credential, timeout=timeout) as pop3:
                    return self._poll_pop3(channel, pop3)
            finally:
                if not isinstance(credential, str):
                    self.catalog.keep_rotated_secrets(
                        channel.id, secrets, credential.updated_secrets
                    )
        if isinstance(account, GraphAccount):
            with GraphMailbox(account, secrets, timeout=timeout) as graph:
                try:
                    return self._poll_graph(channel, graph)
                finally:
                    self.catalog.keep_rotated_secrets(
                        channel.id, secrets, graph.updated_secrets
                    )
        raise MailroomError(
            f"channel {channel.name!r} has no inbound account this poller can use"
        )

    def _poll_imap(self, channel: Channel, mailbox: ImapMailbox) -> int:
        store = CheckpointStore(self.db, channel.id)
        published = 0
        for folder in mailbox.folders(all_folders=channel.sync_all_folders):
            batches = mailbox.fetch_new(
                folder,
                store.get(folder),
                batch=self.settings.fetch_batch,
                max_bytes=self.settings.max_message_bytes,
            )
            published += self._publish_batches(batches, channel, store)
        return published

    def _publish_batches(
        self,
        batches: Iterator[Batch],
        channel: Channel,
        store: CheckpointStore,
    ) -> int:
        """Publish each batch while the next one downloads.

        The next batch is fetched in a thread while this one is published and
        its confirms come in; its checkpoint is stored only once the broker
        confirmed all of it.
        """
        published = 0
        waiting: tuple[int, Checkpoint] | None = None
        ahead = _read_ahead(batches)
        try:
            for fetched, checkpoint in ahead:
                if waiting is not None:
                    ready, waiting = waiting, None
                    published += self._settle(channel, *ready, store)

                waiting = self._publish(channel, fetched), checkpoint
        except Exception:
            # Only the fetch after a publish can fail with one still waiting:
            # what was published before it is kept.
            if waiting is not None:
                self._settle(channel, *waiting, store)
            raise
        finally:
            ahead.close()

        if waiting is not None:
            published += self._settle(channel, *waiting, store)
        return published

    def _settle(
        self,
        channel: Channel,
        count: int,
        checkpoint: Checkpoint,
        store: CheckpointStore,
    ) -> int:
        if count:
            self.publisher.wait()
        self._count_published(channel, count)
        store.advance(checkpoint)
        return count

    def _poll_graph(self, channel: Channel, mailbox: GraphMailbox) -> int:
        store = DeltaLinkStore(self.db, channel.id)
        published = 0
        for folder in mailbox.folders(all_folders=channel.sync_all_folders):
            pages = mailbox.fetch_new(
                folder, store.get(folder), max_bytes=self.settings.max_message_bytes
            )
            for fetched, link in pages:
                published += self._emit(channel, fetched)
                mailbox.mark_processed(
                    folder,
                    [f.source.remote_id for f in fetched if f.source.remote_id],
                )
                store.put(folder, link)
        return published

    def _credential(self, channel: Channel, secrets: dict[str, str]) -> str | Bearer:
        """The IMAP or POP3 account's password, or the bearer of its XOAUTH2
        login."""
        account = channel.inbound
        assert isinstance(account, ImapAccount | Pop3Account)
        if account.oauth2 is None:
            return secrets.get("inbound_password", "")
        scopes = IMAP_SCOPES if isinstance(account, ImapAccount) else POP3_SCOPES
        return self.bearers.get(channel.id, "inbound", account.oauth2, scopes, secrets)

    def _poll_pop3(self, channel: Channel, mailbox: Pop3Mailbox) -> int:
        skipped = self._skipped_keys(channel.id)
        listing = [
            item for item in mailbox.listing() if f"pop3:{item[1]}" not in skipped
        ]
        published = 0
        batch = self.settings.fetch_batch
        for start in range(0, len(listing), batch):
            chunk = listing[start : start + batch]
            fetched = [
                mailbox.retrieve(
                    number, uidl, size, max_bytes=self.settings.max_message_bytes
                )
                for number, uidl, size in chunk
            ]
            published += self._emit(channel, fetched)

            # Only mail that is now safely in the broker (or kept in
            # quarantine, which _emit wrote) leaves the server.
            kept = self._skipped_keys(channel.id)
            for (number, uidl, _size), item in zip(chunk, fetched, strict=True):
                if item.data is not None and f"pop3:{uidl}" not in kept:
                    mailbox.delete(number)
        return published

    def _skipped_keys(self, channel_id: int) -> set[str]:
        rows = self.db.execute(
            "SELECT source_key FROM skipped_messages WHERE channel_id = %s",
            (channel_id,),
        ).fetchall()
        return {r["source_key"] for r in rows}

    def _emit(self, channel: Channel, fetched: Iterable[Fetched]) -> int:
        """Publish what was fetched and wait for every confirm."""
        count = self._publish(channel, fetched)
        if count:
            self.publisher.wait()
        self._count_published(channel, count)
        return count

    def _publish(self, channel: Channel, fetched: Iterable[Fetched]) -> int:
        """Publish what was fetched without waiting for the confirms."""
        count = 0
        for item in fetched:
            if item.data is None:
                self._skip_oversize(channel, item)
                continue
            if channel.sync_recipient_only and not addressed_to(
                item.data, channel.address
            ):
                self._skip(channel, item, "not addressed to the channel's address")
                continue
            raw = RawEmail(
                channel_id=channel.id,
                source=item.source,
                raw=blobs.put(
                    self.db, item.data, inline_max=self.settings.inline_max_bytes
                ),
            )
            MESSAGE_BYTES.observe(item.size)
            self.publisher.publish(
                Outgoing(
                    self.topology.raw_exchange,
                    RAW_KEY,
                    raw.to_json(),
                    message_id=str(raw.id),
                    headers={"channel_id": channel.id},
                )
            )
            count += 1
        return count

    def _count_published(self, channel: Channel, count: int) -> None:
        MESSAGES.labels(stage=self.stage, outcome=Outcome.PUBLISHED).inc(count)
        CHANNEL_MESSAGES.labels(channel_id=str(channel.id), direction="inbound").inc(
            count
        )

    def _skip(self, channel: Channel, item: Fetched, reason: str) -> None:
        self.db.execute(
            "INSERT INTO skipped_messages (channel_id, source_key, reason) "
            "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (channel.id, item.source.key(), reason),
        )
        MESSAGES.labels(stage=self.stage, outcome=Outcome.SKIPPED).inc()
        log.info(
            "skipped", channel_id=channel.id, source=item.source.key(), reason=reason
        )

    def _skip_oversize(self, channel: Channel, item: Fetched) -> None:
        reason = (
            f"message of {item.size} bytes is over MAILROOM_MAX_MESSAGE_BYTES "
            f"({self.settings.max_message_bytes}); it was left in the mailbox"
        )
        quarantine.put(
            self.db,
            stage=self.stage,
            reason=reason,
            body=json.dumps(
                {
                    "channel_id": channel.id,
                    "source": item.source.model_dump(mode="json"),
                    "size": item.size,
                }
            ).encode(),
            queue="",
            channel_id=channel.id,
        )
        self._skip(channel, item, reason)


def _read_ahead(batches: Iterator[Batch]) -> Generator[Batch, None, None]:
    """The batches, the next one fetched in a thread while the caller handles
    the one it has, so the mailbox and the broker are waited on together.

    Only the thread touches the mailbox until the generator is closed, and
    closing it waits for the thread to finish the fetch it is in.
    """
    handoff: queue.Queue[Batch | BaseException | None] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def offer(item: Batch | BaseException | None) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def fetch() -> None:
        try:
            for batch in batches:
                if not offer(batch):
                    return
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            offer(exc)
            return
        offer(None)

    thread = threading.Thread(
        target=contextvars.copy_context().run,
        args=(fetch,),
        name="imap-read-ahead",
        daemon=True,
    )
    thread.start()
    try:
        while (item := handoff.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
