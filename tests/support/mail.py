"""Test messages with a known expected route."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime


@dataclass(frozen=True)
class Sample:
    message_id: str
    sender: str
    subject: str
    body: str
    campaign: str
    field: str | None

    def to_bytes(self, attachment: bytes | None = None) -> bytes:
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = "support@example.test"
        message["Subject"] = self.subject
        message["Message-ID"] = f"<{self.message_id}>"
        message["Date"] = format_datetime(datetime(2026, 12, 1, 9, 30, tzinfo=UTC))
        message.set_content(self.body)
        if attachment is not None:
            message.add_attachment(
                attachment,
                maintype="application",
                subtype="octet-stream",
                filename="large.bin",
            )
        return bytes(message)


def samples(count: int, tag: str) -> list[Sample]:
    """Messages that exercise a sender, a subject and a body filter in turn.

    The filters they expect, in order: sender contains "@vip.example" -> vip,
    subject contains "refund" -> refunds, body contains "purchase order" ->
    sales; anything else goes to the default campaign, general. Every fifth
    message matches both the sender and the subject filter, and the first
    filter must win.
    """
    result = []
    for i in range(count):
        kind = i % 5
        mid = f"{tag}-{i}@test.example"
        if kind == 0:
            item = Sample(
                mid, f"Ann <ann{i}@VIP.example>", f"Hello {i}", "Hi.", "vip", "sender"
            )
        elif kind == 1:
            item = Sample(
                mid,
                f"bob{i}@customer.example",
                f"Please REFUND order {i}",
                "Thanks.",
                "refunds",
                "subject",
            )
        elif kind == 2:
            item = Sample(
                mid,
                f"cy{i}@customer.example",
                f"Question {i}",
                "Attached is our Purchase Order for Q1.",
                "sales",
                "body",
            )
        elif kind == 3:
            item = Sample(
                mid,
                f"dee{i}@customer.example",
                f"Other {i}",
                "Nothing special here.",
                "general",
                None,
            )
        else:
            item = Sample(
                mid,
                f"eve{i}@vip.example",
                f"refund please {i}",
                "purchase order too",
                "vip",
                "sender",
            )
        result.append(item)
    return result
