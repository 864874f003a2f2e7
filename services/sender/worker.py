"""The sender: OutboundEmail in, mail delivered, a DeliveryStatus out.

Each idempotency key is sent at most once. Before talking to the server the
sender claims the key in PostgreSQL (state ``sending``); a message whose key
is ``sent`` or ``failed`` already is acknowledged as a duplicate, and one left
``sending`` by a worker that died mid-delivery is failed as "outcome unknown"
rather than risking a second copy. Temporary failures wait in a delay queue
and come back; permanent ones fail at once. Every outcome is published as a
DeliveryStatus event, also when the worker that reached it died before the
event was published: its redelivered message publishes the event again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import amqp
from pydantic import ValidationError

from services.sender.compose import compose, message_id_for, recipients
from services.sender.graph import GraphSender
from services.sender.smtp import SmtpConnection
from shared import blobs, broker
from shared.accounts import GraphAccount, SmtpAccount
from shared.broker import Outgoing
from shared.catalog import Catalog, Channel
from shared.errors import (
    MailroomError,
    NotFoundError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from shared.metrics import CHANNEL_MESSAGES, Outcome, Stage
from shared.models import Address, DeliveryState, DeliveryStatus, OutboundEmail
from shared.oauth import SMTP_SCOPES
from shared.secrets import SecretBox
from shared.worker import ConsumerWorker, Handled
from shared.xoauth2 import Bearer, Bearers

ATTEMPT_HEADER = "x-mailroom-attempt"
# On a send that waits for an earlier, interrupted delivery of its key to end.
INTERRUPTED_HEADER = "x-mailroom-interrupted"
FINAL = (DeliveryState.SENT, DeliveryState.FAILED)
# How often a long batch stops to read the broker's frames and send a
# heartbeat; far below the 30 s heartbeat interval.
KEEP_ALIVE_SECONDS = 2.0


class Sender(ConsumerWorker):
    stage = Stage.SENDER

    @property
    def queue(self) -> str:
        return self.topology.outbound_queue

    def open(self) -> None:
        super().open()
        self.catalog = Catalog(self.db, SecretBox(self.settings.secret_keys))
        self.connections: dict[int, _Open] = {}
        self.bearers = Bearers(timeout=self.settings.smtp_timeout_seconds)

    def close(self) -> None:
        for opened in getattr(self, "connections", {}).values():
            opened.connection.close()

    def handle_batch(self, messages: list[amqp.Message]) -> list[Handled]:
        results = []
        beat_at = time.monotonic() + KEEP_ALIVE_SECONDS
        for message in messages:
            results.append(self._handle(message))
            # A batch of slow servers can take longer than the broker waits
            # for a heartbeat (two intervals) before it drops the connection.
            # Looking costs a millisecond of waiting, so not after every send.
            if time.monotonic() >= beat_at:
                broker.keep_alive(self.connection)
                beat_at = time.monotonic() + KEEP_ALIVE_SECONDS
        return results

    def _handle(self, message: amqp.Message) -> Handled:
        try:
            out = OutboundEmail.model_validate_json(message.body)
        except ValidationError as exc:
            return self.quarantine(
                message,
                "not a valid OutboundEmail; fix the publisher and replay",
                detail=str(exc)[:2000],
            )

        try:
            channel = self.catalog.channel(out.channel_id)
        except NotFoundError:
            return self._fail(
                message, out, "", f"channel {out.channel_id} does not exist"
            )
        if channel.outbound is None:
            return self._fail(
                message,
                out,
                "",
                f"channel {channel.name!r} has no outbound account; add an SMTP "
                "or Exchange Online account to send from it",
            )

        try:
            message_id = message_id_for(out.idempotency_key, _domain(channel.address))
        except MailroomError as exc:
            return self._fail(message, out, "", f"channel address: {exc}")
        looping = self._looping_recipients(out)
        if looping:
            return self._fail(
                message,
                out,
                message_id,
                f"automatic reply held back by the loop guard: {', '.join(looping)} "
                f"sent this channel more than {self.settings.loop_sender_limit} "
                "messages in a window, most likely an auto-responder answering "
                "ours; have a person answer instead",
            )
        previous = self._claim(message, out, message_id)
        if previous is not None:
            return previous

        try:
            data = compose(
                out,
                sender=Address(name=channel.name, email=channel.address),
                attachments=[
                    (a, blobs.get(self.db, a.content)) for a in out.attachments
                ],
                message_id=message_id,
                attachment_limit=self.settings.attachment_limit_bytes,
            )
            summary, code = self._deliver(channel, recipients(out), data)
        except TemporaryDeliveryError as exc:
            return self._retry_or_fail(message, out, message_id, exc)
        except (PermanentDeliveryError, MailroomError) as exc:
            code = getattr(exc, "code", None)
            return self._fail(message, out, message_id, str(exc), code=code)

        self._record(out, DeliveryState.SENT, detail=summary, code=code)
        CHANNEL_MESSAGES.labels(channel_id=str(channel.id), direction="outbound").inc()
        return self._status(
            out, DeliveryState.SENT, Outcome.SENT, message_id, detail=summary, code=code
        )

    def _looping_recipients(self, out: OutboundEmail) -> list[str]:
        """Recipients of an automatic reply that the router found looping.

        The router counts each sender's mail to a channel (sender_rates); an
        automatic reply to one past the limit, in this window or the last,
        would answer an auto-responder that answers us.
        """
        if not out.automatic:
            return []
        addresses = sorted(
            {a.email.strip().lower() for a in (*out.to, *out.cc, *out.bcc)}
        )
        window = self.settings.loop_window_seconds
        rows = self.db.execute(
            """
            SELECT DISTINCT sender FROM sender_rates
            WHERE channel_id = %s AND sender = ANY(%s) AND messages > %s
              AND window_start >= to_timestamp(
                  floor(extract(epoch FROM now()) / %s) * %s - %s)
            ORDER BY sender
            """,
            (
                out.channel_id,
                addresses,
                self.settings.loop_sender_limit,
                window,
                window,
                window,
            ),
        ).fetchall()
        return [str(row["sender"]) for row in rows]

    def _deliver(
        self, channel: Channel, to: list[str], data: bytes
    ) -> tuple[str, int | None]:
        """Hand the message to the channel's server; returns what it answered,
        and the SMTP reply code (None through Exchange Online)."""
        account = channel.outbound
        if isinstance(account, GraphAccount):
            secrets = self.catalog.secrets(channel.id)
            timeout = self.settings.smtp_timeout_seconds
            with GraphSender(account, secrets, timeout=timeout) as graph:
                try:
                    return graph.send(data, to).summary(), None
                finally:
                    self.catalog.keep_rotated_secrets(
                        channel.id, secrets, graph.updated_secrets
                    )
        opened = self._connection(channel)
        try:
            result = opened.connection.send(channel.address, to, data)
            return result.summary(), result.reply.code
        finally:
            if opened.bearer is not None:
                rotated = opened.bearer.updated_secrets
                self.catalog.keep_rotated_secrets(channel.id, opened.secrets, rotated)
                opened.secrets = rotated

    def _connection(self, channel: Channel) -> _Open:
        account = channel.outbound
        assert isinstance(account, SmtpAccount)
        cached = self.connections.get(channel.id)
        if cached is not None and cached.account == account:
            return cached
        if cached is not None:
            cached.connection.close()
        secrets = self.catalog.secrets(channel.id)
        credential: str | Bearer | None = secrets.get("outbound_password")
        if account.oauth2 is not None:
            credential = self.bearers.get(
                channel.id, "outbound", account.oauth2, SMTP_SCOPES, secrets
            )
        connection = SmtpConnection(
            account, credential, timeout=self.settings.smtp_timeout_seconds
        )
        bearer = None if isinstance(credential, str | None) else credential
        opened = _Open(account, connection, secrets, bearer)
        self.connections[channel.id] = opened
        return opened

    def quarantine(
        self,
        message: amqp.Message,
        reason: str,
        *,
        channel_id: int | None = None,
        detail: str = "",
    ) -> Handled:
        """Keep the message, and give its key a final status all the same.

        The state stored for the key is left as it is, so that replaying the
        message once its cause is fixed can still send it.
        """
        kept = super().quarantine(message, reason, channel_id=channel_id, detail=detail)
        try:
            out = OutboundEmail.model_validate_json(message.body)
        except ValidationError:
            return kept

        row = self.db.execute(
            "SELECT state, message_id, smtp_code, detail FROM outbound_deliveries "
            "WHERE idempotency_key = %s",
            (out.idempotency_key,),
        ).fetchone() or {"message_id": "", "state": ""}
        if row["state"] not in FINAL:
            row |= {"state": DeliveryState.FAILED, "smtp_code": None}
            row["detail"] = f"kept in quarantine: {reason}"
        status = self._status(
            out,
            DeliveryState(row["state"]),
            kept.outcome,
            row["message_id"],
            detail=row["detail"],
            code=row["smtp_code"],
        )
        kept.publish.extend(status.publish)
        return kept

    def _claim(
        self, message: amqp.Message, out: OutboundEmail, message_id: str
    ) -> Handled | None:
        """Take the key for this attempt; a Handled when it must not be sent."""
        claimed = self.db.execute(
            """
            INSERT INTO outbound_deliveries
                (idempotency_key, channel_id, message_id, state, attempts)
            VALUES (%s, %s, %s, 'sending', 1)
            ON CONFLICT (idempotency_key) DO UPDATE
            SET state = 'sending', attempts = outbound_deliveries.attempts + 1,
                updated_at = now()
            WHERE outbound_deliveries.state = 'retrying'
            RETURNING attempts
            """,
            (out.idempotency_key, out.channel_id, message_id),
        ).fetchone()
        if claimed is not None:
            return None

        row = self.db.execute(
            """
            SELECT state, message_id, smtp_code, detail,
                now() - updated_at > make_interval(secs => %s) AS stale
            FROM outbound_deliveries WHERE idempotency_key = %s
            """,
            (self.settings.smtp_timeout_seconds * 2, out.idempotency_key),
        ).fetchone()
        assert row is not None
        if row["state"] == "sending" and row["stale"]:
            reason = (
                "delivery outcome unknown: a sender stopped while delivering it; "
                "check the mailbox's sent items before sending it again with a "
                "new idempotency key"
            )
            self._record(out, DeliveryState.FAILED, detail=reason)
            return self._status(
                out, DeliveryState.FAILED, Outcome.FAILED, message_id, detail=reason
            )

        # A redelivery follows a worker that stopped while holding this
        # message: it may have died mid-send, or after recording the outcome
        # but before publishing its status.
        headers = message.properties.get("application_headers") or {}
        interrupted = bool(
            message.delivery_info.get("redelivered") or headers.get(INTERRUPTED_HEADER)
        )
        if interrupted and row["state"] == "sending":
            return self._wait_for_interrupted(message, out)
        if interrupted and row["state"] in FINAL:
            return self._status(
                out,
                DeliveryState(row["state"]),
                Outcome.DUPLICATE,
                row["message_id"] or message_id,
                detail=row["detail"],
                code=row["smtp_code"],
            )
        return self._status(
            out,
            DeliveryState.DUPLICATE,
            Outcome.DUPLICATE,
            message_id,
            detail=f"already {row['state']}; not sent again",
        )

    def _wait_for_interrupted(
        self, message: amqp.Message, out: OutboundEmail
    ) -> Handled:
        """Look again after the first retry delay: by then the interrupted send
        has been recorded, or is stale and failed as outcome unknown."""
        headers = dict(message.properties.get("application_headers") or {})
        headers[INTERRUPTED_HEADER] = True
        delay = self.topology.retry_delays_seconds[0]
        return Handled(
            Outcome.RETRYING,
            publish=[
                Outgoing(
                    "",
                    self.topology.retry_queue(1),
                    bytes(message.body),
                    message_id=out.idempotency_key,
                    headers=headers,
                )
            ],
            details={
                "channel_id": out.channel_id,
                "idempotency_key": out.idempotency_key,
                "detail": "an earlier delivery stopped while sending; "
                "its outcome is checked again",
                "retry_in_seconds": delay,
            },
        )

    def _retry_or_fail(
        self,
        message: amqp.Message,
        out: OutboundEmail,
        message_id: str,
        exc: TemporaryDeliveryError,
    ) -> Handled:
        headers = message.properties.get("application_headers") or {}
        attempt = int(headers.get(ATTEMPT_HEADER, 0)) + 1
        if attempt > len(self.topology.retry_delays_seconds):
            return self._fail(
                message,
                out,
                message_id,
                f"gave up after {attempt} attempts: {exc}",
                code=exc.code,
            )

        self._record(out, DeliveryState.RETRYING, detail=str(exc), code=exc.code)
        handled = self._status(
            out,
            DeliveryState.RETRYING,
            Outcome.RETRYING,
            message_id,
            detail=str(exc),
            code=exc.code,
        )
        handled.publish.append(
            Outgoing(
                "",
                self.topology.retry_queue(attempt),
                bytes(message.body),
                message_id=out.idempotency_key,
                headers={ATTEMPT_HEADER: attempt},
            )
        )
        handled.details["retry_in_seconds"] = self.topology.retry_delays_seconds[
            attempt - 1
        ]
        return handled

    def _fail(
        self,
        message: amqp.Message,
        out: OutboundEmail,
        message_id: str,
        reason: str,
        *,
        code: int | None = None,
    ) -> Handled:
        self._record(out, DeliveryState.FAILED, detail=reason, code=code)
        return self._status(
            out,
            DeliveryState.FAILED,
            Outcome.FAILED,
            message_id,
            detail=reason,
            code=code,
        )

    def _record(
        self,
        out: OutboundEmail,
        state: DeliveryState,
        *,
        detail: str = "",
        code: int | None = None,
    ) -> None:
        self.db.execute(
            """
            INSERT INTO outbound_deliveries
                (idempotency_key, channel_id, message_id, state, smtp_code, detail)
            VALUES (%s, %s, '', %s, %s, %s)
            ON CONFLICT (idempotency_key) DO UPDATE
            SET state = EXCLUDED.state, smtp_code = EXCLUDED.smtp_code,
                detail = EXCLUDED.detail, updated_at = now()
            """,
            (out.idempotency_key, out.channel_id, state, code, detail[:2000]),
        )

    def _status(
        self,
        out: OutboundEmail,
        state: DeliveryState,
        outcome: Outcome,
        message_id: str,
        *,
        detail: str = "",
        code: int | None = None,
    ) -> Handled:
        status = DeliveryStatus(
            idempotency_key=out.idempotency_key,
            channel_id=out.channel_id,
            state=state,
            message_id=message_id,
            smtp_code=code,
            detail=detail,
        )
        publish = Outgoing(
            self.topology.status_exchange,
            state.value,
            status.to_json(),
            message_id=f"{out.idempotency_key}:{state.value}",
        )
        return Handled(
            outcome,
            publish=[publish],
            details={
                "channel_id": out.channel_id,
                "idempotency_key": out.idempotency_key,
                "state": state.value,
                "smtp_code": code,
                "detail": detail[:300],
            },
        )


@dataclass
class _Open:
    """A channel's SMTP connection, kept between messages."""

    account: SmtpAccount
    connection: SmtpConnection
    secrets: dict[str, str]  # as stored when it opened, or as last kept
    bearer: Bearer | None


def _domain(address: str) -> str:
    return address.rpartition("@")[2] or "mailroom.invalid"
