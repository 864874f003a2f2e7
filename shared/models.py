"""Messages exchanged between the services over RabbitMQ.

Each message carries ``schema_version`` so that a consumer can refuse (and
quarantine) a shape it does not know instead of guessing. Bytes travel as
base64 in JSON. Anything larger than the inline limit travels by claim check:
``Payload.data`` is empty and the bytes are in the blob store under
``Payload.sha256``.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION: Literal[1] = 1
NAMESPACE = uuid.UUID("6f1c63e2-5a57-4a53-9d1c-4a6d0f0c2b11")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _no_line_breaks(value: str) -> str:
    if any(ch in value for ch in "\r\n\x00"):
        raise ValueError("must not contain CR, LF or NUL characters")
    return value


class Message(BaseModel):
    model_config = ConfigDict(
        frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


class Protocol(StrEnum):
    IMAP = "imap"
    POP3 = "pop3"
    GRAPH = "graph"


class Payload(Message):
    """Bytes inline, or a claim check naming them in the blob store."""

    sha256: str
    size: int = Field(ge=0)
    data: bytes | None = None

    @property
    def is_claim_check(self) -> bool:
        return self.data is None

    @classmethod
    def of(cls, data: bytes, *, inline: bool = True) -> Payload:
        digest = hashlib.sha256(data).hexdigest()
        return cls(sha256=digest, size=len(data), data=data if inline else None)


class MailSource(Message):
    """Where a message was fetched from; two fetches of one message agree."""

    protocol: Protocol
    folder: str | None = None
    uidvalidity: int | None = None
    uid: int | None = None
    uidl: str | None = None
    remote_id: str | None = None

    def key(self) -> str:
        if self.protocol is Protocol.IMAP:
            return f"imap:{self.folder}:{self.uidvalidity}:{self.uid}"
        if self.protocol is Protocol.POP3:
            return f"pop3:{self.uidl}"
        return f"graph:{self.remote_id}"


class RawEmail(Message):
    schema_version: Literal[1] = SCHEMA_VERSION
    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    channel_id: int
    source: MailSource
    fetched_at: datetime = Field(default_factory=utcnow)
    raw: Payload


class Address(Message):
    name: str = ""
    email: str

    @field_validator("name", "email")
    @classmethod
    def _single_line(cls, value: str) -> str:
        return _no_line_breaks(value)

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>" if self.name else self.email


class Headers(Message):
    from_: list[Address] = Field(default_factory=list, alias="from")
    to: list[Address] = Field(default_factory=list)
    cc: list[Address] = Field(default_factory=list)
    reply_to: list[Address] = Field(default_factory=list)
    subject: str = ""
    date: datetime | None = None
    message_id: str = ""
    in_reply_to: str = ""
    references: list[str] = Field(default_factory=list)

    model_config = ConfigDict(populate_by_name=True)


class AttachmentInfo(Message):
    filename: str
    content_type: str
    size: int
    sha256: str
    withheld: bool = Field(
        False, description="Over the attachment limit: listed but not delivered."
    )
    content: Payload | None = Field(
        None,
        description=(
            "The file's bytes when they are not a MIME part of the raw message: "
            "files unpacked from a TNEF winmail.dat. Null for ordinary parts "
            "(read them from raw) and for withheld files."
        ),
    )


class Flag(StrEnum):
    ATTACHMENT_OVER_LIMIT = "attachment_over_limit"
    AUTO_REPLY = "auto_reply"
    BOUNCE = "bounce"
    MAILING_LIST = "mailing_list"
    PARSE_DEFECTS = "parse_defects"
    GENERATED_MESSAGE_ID = "generated_message_id"
    BODY_TRUNCATED = "body_truncated"
    # More mail from this sender to this channel than MAILROOM_LOOP_SENDER_LIMIT
    # in one window: likely a mail loop, so do not answer it automatically.
    LOOP_SUSPECTED = "loop_suspected"


class MatchField(StrEnum):
    SENDER = "sender"
    SUBJECT = "subject"
    BODY = "body"


class RouteDecision(Message):
    filter_id: int | None = Field(None, description="None when the default won.")
    field: MatchField | None = None
    value: str | None = None
    reason: str


class RoutedEmail(Message):
    schema_version: Literal[1] = SCHEMA_VERSION
    id: uuid.UUID = Field(description="Stable for one message in one channel.")
    raw_email_id: uuid.UUID
    channel_id: int
    campaign_id: int
    campaign_key: str
    decision: RouteDecision
    source: MailSource
    headers: Headers
    text_body: str = ""
    html_body: str = ""
    attachments: list[AttachmentInfo] = Field(default_factory=list)
    flags: list[Flag] = Field(default_factory=list)
    defects: list[str] = Field(default_factory=list)
    raw: Payload
    routed_at: datetime = Field(default_factory=utcnow)

    @staticmethod
    def stable_id(channel_id: int, raw_sha256: str) -> uuid.UUID:
        return uuid.uuid5(NAMESPACE, f"{channel_id}:{raw_sha256}")


class OutboundAttachment(Message):
    filename: str
    content_type: str = "application/octet-stream"
    content: Payload


class OutboundEmail(Message):
    schema_version: Literal[1] = SCHEMA_VERSION
    idempotency_key: str = Field(min_length=1, max_length=200)
    channel_id: int
    campaign_id: int | None = None
    to: list[Address] = Field(default_factory=list)
    cc: list[Address] = Field(default_factory=list)
    bcc: list[Address] = Field(default_factory=list)
    reply_to: list[Address] = Field(default_factory=list)
    subject: str = ""
    text_body: str = ""
    html_body: str = ""
    attachments: list[OutboundAttachment] = Field(default_factory=list)
    in_reply_to: str = ""
    references: list[str] = Field(default_factory=list)
    automatic: bool = Field(
        False, description="Sent without a person (Auto-Submitted: auto-replied)."
    )

    @field_validator("idempotency_key", "subject", "in_reply_to")
    @classmethod
    def _single_line(cls, value: str) -> str:
        return _no_line_breaks(value)

    @field_validator("references")
    @classmethod
    def _single_line_refs(cls, value: list[str]) -> list[str]:
        return [_no_line_breaks(v) for v in value]


class DeliveryState(StrEnum):
    SENT = "sent"
    RETRYING = "retrying"
    FAILED = "failed"
    DUPLICATE = "duplicate"


class DeliveryStatus(Message):
    schema_version: Literal[1] = SCHEMA_VERSION
    idempotency_key: str
    channel_id: int
    state: DeliveryState
    message_id: str = ""
    smtp_code: int | None = None
    detail: str = ""
    at: datetime = Field(default_factory=utcnow)
