"""The mail the benchmarks push through: a realistic inbound mix and replies.

Inbound mail is the email corpus beside the project (when it is there) plus
generated 5-50 KB messages with text, HTML and attachments, made by
``benchmarks/parsing.py`` so that both suites measure the same inputs. Every
copy sent through a worker is made unique by one extra header, or the router
would drop the repeats as duplicates before parsing them.
"""

from __future__ import annotations

import os
import random
import uuid
from email.message import EmailMessage
from email.policy import SMTP

from benchmarks.parsing import CORPUS, WORDS, corpus_messages, generated_messages
from shared.models import Address, OutboundAttachment, OutboundEmail, Payload


class MailMix:
    """Distinct inbound messages: the corpus first, then generated ones."""

    def __init__(self, generated: int) -> None:
        corpus = corpus_messages() if CORPUS.is_dir() else []
        self.corpus_count = len(corpus)
        self.distinct = corpus + generated_messages(generated)

    @property
    def mean_bytes(self) -> float:
        return sum(map(len, self.distinct)) / len(self.distinct)

    def sources(self) -> str:
        generated = len(self.distinct) - self.corpus_count
        return f"{self.corpus_count} corpus + {generated} generated messages"

    def describe(self) -> str:
        return f"{self.sources()}, {self.mean_bytes / 1024:.0f} KB on average"

    def copies(self, count: int, tag: str) -> list[bytes]:
        """``count`` messages cycling through the mix, each with unique bytes."""
        return [
            unique(self.distinct[i % len(self.distinct)], f"{tag}-{i}")
            for i in range(count)
        ]


def unique(raw: bytes, token: str) -> bytes:
    newline = b"\r\n" if b"\r\n" in raw[:2000] else b"\n"
    return b"X-Bench-Copy: " + token.encode() + newline + raw


def replies(
    count: int, channel_id: int, tag: str, seed: int = 11
) -> list[OutboundEmail]:
    """Agents' replies: text, HTML in most, a small attachment in one in five."""
    rng = random.Random(seed)
    emails = []
    for i in range(count):
        text = _prose(rng, rng.randint(400, 3_000))
        attachments = []
        if rng.random() < 0.2:
            data = rng.randbytes(rng.randint(10_000, 150_000))
            attachments.append(
                OutboundAttachment(
                    filename=f"Rechnung {i}.pdf",
                    content_type="application/pdf",
                    content=Payload.of(data),
                )
            )
        emails.append(
            OutboundEmail(
                idempotency_key=f"{tag}-{i}",
                channel_id=channel_id,
                to=[Address(name=f"Customer {i}", email=f"customer{i}@example.org")],
                cc=[Address(email="team@example.org")] if i % 7 == 0 else [],
                subject=f"Re: {' '.join(rng.choices(WORDS, k=4))} #{i}",
                text_body=text,
                html_body=f"<p>{text}</p>" if rng.random() < 0.7 else "",
                attachments=attachments,
                in_reply_to=f"<{i}.{tag}@example.org>",
                references=[f"<{i}.{tag}@example.org>"],
            )
        )
    return emails


def reply_with_attachment(channel_id: int, key: str, payload: Payload) -> OutboundEmail:
    """A short reply carrying one attachment, inline or by claim check."""
    return OutboundEmail(
        idempotency_key=key,
        channel_id=channel_id,
        to=[Address(email="customer@example.org")],
        subject="The contract, signed",
        text_body="Please find the signed contract attached.",
        attachments=[
            OutboundAttachment(
                filename="contract-signed.pdf",
                content_type="application/pdf",
                content=payload,
            )
        ],
    )


def large_message(attachment_bytes: int) -> bytes:
    """A short letter with one incompressible attachment of the given size."""
    message = EmailMessage()
    message["From"] = "Customer <customer@example.org>"
    message["To"] = "support@bench.example"
    message["Subject"] = "Scans of the contract"
    message["Message-ID"] = f"<large-{uuid.uuid4().hex}@example.org>"
    message["Date"] = "Tue, 01 Dec 2026 09:30:00 +0000"
    message.set_content("Please find the scans attached.\n")
    message.add_attachment(
        os.urandom(attachment_bytes),
        maintype="application",
        subtype="pdf",
        filename="contract-scans.pdf",
    )
    return message.as_bytes(policy=SMTP)


def small_message(token: str) -> bytes:
    message = EmailMessage()
    message["From"] = "Customer <customer@example.org>"
    message["To"] = "support@bench.example"
    message["Subject"] = f"Question {token}"
    message["Message-ID"] = f"<{token}@bench.example>"
    message["Date"] = "Tue, 01 Dec 2026 09:30:00 +0000"
    message.set_content("Where is my order?\n")
    return message.as_bytes(policy=SMTP)


def _prose(rng: random.Random, size: int) -> str:
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)
