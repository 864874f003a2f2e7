"""Delivery of composed messages through Microsoft Graph, as the channel's mailbox.

``GraphSender.send`` takes the same MIME bytes and envelope recipients as the
SMTP sender, so one composer serves both and every header (Message-ID,
In-Reply-To, References, Auto-Submitted) reaches Exchange as written; Graph's
JSON message shape could not carry the threading headers. A message that fits
in one Graph request goes in a single ``sendMail``. A larger one is sent as a
draft: the MIME without its attachments, then each attachment (over 3 MB
through an upload session, in ranges), then ``send``.

Failures become ``TemporaryDeliveryError`` (throttling, Graph or the network
failing) or ``PermanentDeliveryError`` (refused credentials or permissions, a
message Graph will not take), with the reason in words.
"""

from __future__ import annotations

import base64
import email
import email.policy
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage, Message, MIMEPart
from email.utils import getaddresses
from types import TracebackType

from shared.accounts import GraphAccount
from shared.errors import (
    ChannelAuthError,
    ChannelConnectError,
    ChannelError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from shared.graph import GraphClient
from shared.logs import get_logger

log = get_logger(__name__)

# Graph takes requests of up to 4 MB; base64 makes MIME a third larger.
SEND_MAIL_LIMIT = 2_900_000
UPLOAD_SESSION_FROM = 3_000_000
UPLOAD_CHUNK = 10 * 320 * 1024
# Short waits are worth it inside one send; longer ones go back to the
# sender's retry queue instead of holding the worker.
MAX_THROTTLE_WAIT = 10.0


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class GraphDelivery:
    """What Graph accepted: the message, and how it went."""

    message_id: str
    via: str
    attachments: int = 0

    def summary(self) -> str:
        """One line for a delivery status."""
        how = "sendMail" if self.via == "sendMail" else "a draft and send"
        return (
            f"202 Accepted by Microsoft Graph through {how}; "
            f"{self.attachments} attachment(s) uploaded separately"
        )


class GraphSender:
    """Sends as one Exchange Online mailbox; use it as a context manager."""

    def __init__(
        self, account: GraphAccount, secrets: dict[str, str], *, timeout: float
    ):
        self.account = account
        self.client = GraphClient(
            account, secrets, timeout=timeout, max_throttle_wait=MAX_THROTTLE_WAIT
        )

    def __repr__(self) -> str:
        return f"GraphSender({self.account.mailbox!r})"

    def __enter__(self) -> GraphSender:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    @property
    def updated_secrets(self) -> dict[str, str]:
        """Store these (encrypted) after sending: the refresh token may rotate."""
        return self.client.updated_secrets

    def send(self, message: bytes, recipients: Sequence[str]) -> GraphDelivery:
        """Send composed MIME to the envelope ``recipients``.

        Exchange takes the recipients from the headers, so envelope recipients
        the headers do not name (blind copies) are added as a Bcc header,
        which Exchange removes before delivery.
        """
        mime = _with_bcc(message, recipients)
        message_id = _message_id(mime)
        try:
            if len(mime) <= SEND_MAIL_LIMIT:
                self.client.request(
                    "POST",
                    self.client.user_path("sendMail"),
                    data=base64.b64encode(mime),
                    headers={"Content-Type": "text/plain"},
                    expect=(202,),
                )
                delivery = GraphDelivery(message_id, "sendMail")
            else:
                delivery = self._send_as_draft(mime, message_id)
        except ChannelAuthError as exc:
            raise PermanentDeliveryError(
                f"Microsoft Graph would not let {self.account.mailbox} send: {exc}"
            ) from exc
        except ChannelConnectError as exc:
            raise TemporaryDeliveryError(str(exc)) from exc
        except ChannelError as exc:
            raise PermanentDeliveryError(str(exc)) from exc

        log.info(
            "sent through Microsoft Graph",
            via=delivery.via,
            size=len(mime),
            attachments=delivery.attachments,
        )
        return delivery

    def _send_as_draft(self, mime: bytes, message_id: str) -> GraphDelivery:
        body, attachments = _detach(mime)
        if len(body) > SEND_MAIL_LIMIT:
            raise PermanentDeliveryError(
                f"the message without its attachments is {len(body)} bytes, more "
                "than one Microsoft Graph request takes; send large content as "
                "attachments"
            )

        draft = self.client.json(
            "POST",
            self.client.user_path("messages"),
            data=base64.b64encode(body),
            headers={"Content-Type": "text/plain"},
            expect=(201,),
        )
        draft_path = self.client.user_path("messages", str(draft["id"]))
        try:
            for attachment in attachments:
                self._attach(draft_path, attachment)
            self.client.request("POST", f"{draft_path}/send", expect=(202,))
        except (ChannelError, PermanentDeliveryError):
            self._discard(draft_path)
            raise

        return GraphDelivery(message_id, "draft", len(attachments))

    def _attach(self, draft_path: str, attachment: Attachment) -> None:
        if len(attachment.data) < UPLOAD_SESSION_FROM:
            self.client.request(
                "POST",
                f"{draft_path}/attachments",
                json={
                    "@odata.type": "#microsoft.graph.fileAttachment",
                    "name": attachment.filename,
                    "contentType": attachment.content_type,
                    "contentBytes": base64.b64encode(attachment.data).decode(),
                },
                expect=(201,),
            )
            return

        session = self.client.json(
            "POST",
            f"{draft_path}/attachments/createUploadSession",
            json={
                "AttachmentItem": {
                    "attachmentType": "file",
                    "name": attachment.filename,
                    "size": len(attachment.data),
                    "contentType": attachment.content_type,
                }
            },
            expect=(201,),
        )

        total = len(attachment.data)
        for start in range(0, total, UPLOAD_CHUNK):
            chunk = attachment.data[start : start + UPLOAD_CHUNK]
            self.client.upload(str(session["uploadUrl"]), chunk, start, total)

    def _discard(self, draft_path: str) -> None:
        """Delete a draft that will not be sent, so retries leave none behind."""
        try:
            self.client.request("DELETE", draft_path, expect=(204, 404))
        except ChannelError as exc:
            log.warning("could not delete an unsent draft", error=str(exc))


def _with_bcc(message: bytes, recipients: Sequence[str]) -> bytes:
    head = email.message_from_bytes(message, policy=email.policy.compat32)
    named = {
        address.lower()
        for _name, address in getaddresses(
            [str(v) for key in ("to", "cc", "bcc") for v in head.get_all(key, [])]
        )
    }
    blind = [r for r in recipients if r.lower() not in named]
    if not blind:
        return message
    return b"Bcc: " + ", ".join(blind).encode() + b"\r\n" + message


def _message_id(mime: bytes) -> str:
    head = email.message_from_bytes(mime, policy=email.policy.compat32)
    return str(head.get("Message-ID", "")).strip()


def _detach(mime: bytes) -> tuple[bytes, list[Attachment]]:
    """The message without its attachments, and the attachments."""
    parsed = email.message_from_bytes(mime, policy=email.policy.SMTP)
    assert isinstance(parsed, EmailMessage)
    attachments: list[Attachment] = []
    for part in parsed.walk():
        if not part.is_multipart():
            continue
        kept: list[Message[str, str] | str] = []
        for child in list(part.iter_parts()):
            if child.get_content_disposition() == "attachment":
                attachments.append(_attachment(child))
            else:
                kept.append(child)
        part.set_payload(kept)
    return parsed.as_bytes(), attachments


def _attachment(part: MIMEPart) -> Attachment:
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        # An attached message (message/rfc822) is a part, not encoded bytes.
        data = b"".join(inner.as_bytes() for inner in part.iter_parts())
    return Attachment(
        part.get_filename() or "attachment", part.get_content_type(), data
    )
