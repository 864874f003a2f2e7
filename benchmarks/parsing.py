"""Throughput of the router's parse_email against the standard library.

Runs parse_email, and parse_email followed by choose() over 50 filters, on
(a) the fixture corpus and (b) generated 5-50 KB messages with attachments,
next to a bare loop of BytesParser(policy=email.policy.default).parsebytes,
get_body and iter_attachments on the same inputs. Prints messages per second
for each and the ratio. Single process, so the numbers are per worker.

    .venv/bin/python benchmarks/parsing.py [--messages 2000] [--seconds 2]
"""

from __future__ import annotations

import argparse
import email.policy
import random
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

from services.router.filters import choose
from services.router.parsing import parse_email
from shared.catalog import Filter
from shared.errors import MessageRejected
from shared.models import MatchField

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
LIMIT = 20 * 1024 * 1024
WORDS = (
    "invoice refund order delivery account payment password contract update "
    "meeting schedule request support ticket urgent reply thanks regards "
    "Rückerstattung commande livraison 注文 返金 заказ"
).split()


def corpus_messages() -> list[bytes]:
    return [path.read_bytes() for path in sorted(CORPUS.rglob("*.eml"))]


def generated_messages(count: int, seed: int = 7) -> list[bytes]:
    """Realistic-looking mail of 5-50 KB: text, HTML, attachments, forwards."""
    rng = random.Random(seed)
    messages = []
    for index in range(count):
        target = rng.randint(5_000, 50_000)
        msg = EmailMessage()
        msg["From"] = f"Customer {index} <customer{index}@example.{rng.choice(WORDS)}>"
        msg["To"] = "Support <support@contact-centre.example>"
        msg["Subject"] = " ".join(rng.choices(WORDS, k=rng.randint(2, 8)))
        msg["Date"] = "Tue, 10 May 2005 15:27:03 -0500"
        if rng.random() < 0.9:
            msg["Message-ID"] = f"<{index}.{rng.getrandbits(48)}@example.com>"
        if rng.random() < 0.2:
            msg["Auto-Submitted"] = "auto-replied"

        text = _prose(rng, rng.randint(300, 3_000))
        msg.set_content(text)
        if rng.random() < 0.6:
            msg.add_alternative(f"<html><body><p>{text}</p></body></html>", "html")
        while len(msg.as_bytes()) < target - 2_000:
            _attach(msg, rng, min(target - len(msg.as_bytes()), 30_000))
        messages.append(msg.as_bytes())
    return messages


def _prose(rng: random.Random, size: int) -> str:
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


def _attach(msg: EmailMessage, rng: random.Random, size: int) -> None:
    kind = rng.random()
    raw_size = max(size * 3 // 4, 100)
    if kind < 0.1:
        inner = EmailMessage()
        inner["Subject"] = "forwarded"
        inner.set_content(_prose(rng, raw_size))
        msg.add_attachment(inner)
    elif kind < 0.4:
        msg.add_attachment(
            rng.randbytes(raw_size), "image", "png", filename=f"scan {kind:.3f}.png"
        )
    else:
        msg.add_attachment(
            rng.randbytes(raw_size), "application", "pdf", filename="Rechnung Nr.pdf"
        )


def filters(count: int = 50) -> list[Filter]:
    fields = list(MatchField)
    rng = random.Random(3)
    result = []
    for position in range(1, count + 1):
        operator = "regex" if position % 10 == 0 else "contains"
        value = rf"\b{rng.choice(WORDS)}-\d+" if operator == "regex" else "zz-nomatch"
        result.append(
            Filter(
                id=position,
                channel_id=1,
                position=position,
                field=fields[position % 3],
                operator=operator,
                value=value,
                campaign_id=position,
            )
        )
    return result


def stdlib(raw: bytes) -> None:
    msg = BytesParser(policy=email.policy.default).parsebytes(raw)
    msg.get_body(preferencelist=("plain", "html"))
    list(msg.iter_attachments())


def router(raw: bytes) -> None:
    try:
        parse_email(raw, attachment_limit=LIMIT)
    except MessageRejected:
        pass


def router_and_filters(raw: bytes, rules: tuple[Filter, ...]) -> None:
    try:
        choose(rules, parse_email(raw, attachment_limit=LIMIT), 1)
    except MessageRejected:
        pass


def rate(run: Callable[[bytes], None], messages: list[bytes], seconds: float) -> float:
    """Messages per second over whole passes for at least ``seconds``."""
    for raw in messages[:50]:
        run(raw)

    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for raw in messages:
            run(raw)
        done += len(messages)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()

    rules = tuple(filters())
    sets = [("generated 5-50 KB", generated_messages(args.messages))]
    if CORPUS.is_dir():
        sets.insert(0, ("corpus", corpus_messages()))

    for name, messages in sets:
        size = sum(map(len, messages)) / len(messages) / 1024
        base = rate(stdlib, messages, args.seconds)
        ours = rate(router, messages, args.seconds)
        both = rate(lambda raw: router_and_filters(raw, rules), messages, args.seconds)
        print(f"{name}: {len(messages)} messages, {size:.1f} KB on average")
        print(f"  stdlib policy.default    {base:10,.0f} msg/s")
        print(f"  parse_email              {ours:10,.0f} msg/s  ({ours / base:.1f}x)")
        print(f"  parse_email + 50 filters {both:10,.0f} msg/s  ({both / base:.1f}x)")


if __name__ == "__main__":
    main()
