"""TNEF parts (winmail.dat): unpacked into attachments and a body, or kept.

Most tests call parse_email on hand-built mail; the last ones route through
a real Router worker over RabbitMQ, as the pipeline does.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from services.router.decoding import Defects
from services.router.parsing import MAX_PARTS, ParsedEmail, parse_email
from services.router.tnef import unpack
from services.router.worker import Router
from shared import blobs, broker, db
from shared.broker import Outgoing, Publisher
from shared.catalog import Catalog
from shared.models import Flag, MailSource, Protocol, RawEmail, RoutedEmail
from shared.settings import Settings
from shared.topology import RAW_KEY, Topology
from tests.conftest import AMQP_URL
from tests.support import tnef
from tests.support.queues import drain
from tests.support.tnef import Attachment, Tnef, winmail_mail

LIMIT = 1024 * 1024


def parse(raw: bytes, limit: int = LIMIT) -> ParsedEmail:
    return parse_email(raw, attachment_limit=limit)


def two_files() -> Tnef:
    return Tnef(
        attachments=[
            Attachment(b"invoice.pdf", b"%PDF-1.4 " + b"x" * 1000),
            Attachment(b"photo.jpg", b"\xff\xd8\xff" + b"\x00" * 2500),
        ]
    )


def test_both_files_inside_winmail_dat_are_listed_in_its_place() -> None:
    parsed = parse(winmail_mail(two_files().to_bytes(), text="See attached."))

    listed = [(a.filename, a.content_type, a.size) for a in parsed.attachments]
    assert [
        ("invoice.pdf", "application/pdf", 1009),
        ("photo.jpg", "image/jpeg", 2503),
    ] == listed
    expected = hashlib.sha256(b"\xff\xd8\xff" + b"\x00" * 2500).hexdigest()
    assert expected == parsed.attachments[1].sha256
    assert "See attached." == parsed.body_text.strip()
    assert [] == parsed.defects
    assert Flag.PARSE_DEFECTS not in parsed.flags


def test_a_part_named_winmail_dat_is_unpacked_whatever_its_content_type() -> None:
    raw = winmail_mail(
        two_files().to_bytes(),
        content_type="application/octet-stream",
        filename="WINMAIL.DAT",
    )

    parsed = parse(raw)

    assert ["invoice.pdf", "photo.jpg"] == [a.filename for a in parsed.attachments]


def test_names_inside_tnef_lose_directories_and_control_characters() -> None:
    tnef = Tnef(
        attachments=[
            Attachment(b"..\\..\\Windows\\evil\x07\x1b.exe", b"MZ"),
            Attachment(b"short.txt", b"text", long_filename="a/b/re\u202eport\t.txt"),
            Attachment(b"Pr\xe9sentation.pptx", b"PK"),
            Attachment(b"", b"nameless"),
        ]
    )

    parsed = parse(winmail_mail(tnef.to_bytes()))

    assert [
        "evil.exe",
        "report.txt",
        "Présentation.pptx",
        "attachment-4.bin",
    ] == [a.filename for a in parsed.attachments]
    assert "application/octet-stream" == parsed.attachments[3].content_type


def test_the_tnef_body_is_the_body_of_a_message_without_one() -> None:
    tnef = Tnef(body=b"Our purchase order r\xe9f. 42\r\nfollows.\x00")

    parsed = parse(winmail_mail(tnef.to_bytes()))

    assert "Our purchase order réf. 42\nfollows." == parsed.text_body
    assert parsed.text_body == parsed.body_text
    assert [] == parsed.attachments


def test_an_html_tnef_body_is_used_when_it_is_all_there_is() -> None:
    tnef = Tnef(html=b"<html><body><p>Purchase <b>order</b></p></body></html>")

    parsed = parse(winmail_mail(tnef.to_bytes()))

    assert "" == parsed.text_body
    assert "Purchase order" == parsed.body_text


def test_the_message_own_text_wins_over_the_tnef_body() -> None:
    tnef = Tnef(body=b"From inside the TNEF")

    parsed = parse(winmail_mail(tnef.to_bytes(), text="From the message"))

    assert "From the message" == parsed.text_body.strip()


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda b: b[: len(b) - 700], "truncated"),
        (lambda b: b[:-30] + b"\xaa" + b[-29:], "checksum"),
        (lambda b: b"not TNEF at all", "no TNEF signature"),
        (lambda b: b"", "no TNEF signature"),
    ],
)
def test_a_broken_winmail_dat_is_kept_as_it_is_with_a_defect(
    damage: Callable[[bytes], bytes], why: str
) -> None:
    broken = damage(two_files().to_bytes())

    parsed = parse(winmail_mail(broken))

    assert [("winmail.dat", "application/ms-tnef", len(broken))] == [
        (a.filename, a.content_type, a.size) for a in parsed.attachments
    ]
    assert 1 == len(parsed.defects)
    assert parsed.defects[0].startswith("TNEF part 'winmail.dat' could not be")
    assert why in parsed.defects[0]
    assert Flag.PARSE_DEFECTS in parsed.flags


def test_a_count_of_four_billion_properties_is_refused_not_believed() -> None:
    # tnefparse itself would loop over every claimed property.
    tnef = bytearray(Tnef(html=b"<p>x</p>").to_bytes())
    block = tnef.index(b"\x01\x00\x00\x00\x02\x01\x13\x10")
    tnef[block : block + 4] = b"\xff\xff\xff\xff"
    data_start = tnef.rindex(b"\x03\x90\x06\x00", 0, block) + 8
    checksum = sum(tnef[data_start:-2]) & 0xFFFF
    tnef[-2:] = checksum.to_bytes(2, "little")

    result = unpack(bytes(tnef), Defects())

    assert "4294967295 MAPI properties claimed" in getattr(result, "reason", "")


def recipients(name: bytes) -> bytes:
    """An attRecipTable of one row holding a display name in the code page."""
    row = tnef.mapi_block((0x001E, 0x3001, name))
    return tnef.record(1, 0x0004_9004, (1).to_bytes(4, "little") + row)


def test_recipient_rows_are_read_only_when_tnefparse_can_decode_them() -> None:
    # An undecodable string would leave tnefparse reading the next row from
    # the wrong place, so the whole stream is refused.
    readable = Tnef(body=b"Hi.").to_bytes() + recipients(b"Ann\x00")
    unreadable = Tnef(body=b"Hi.").to_bytes() + recipients(b"\x81\x81\x00")

    assert "Hi." == parse(winmail_mail(readable)).text_body
    kept = parse(winmail_mail(unreadable))
    assert ["winmail.dat"] == [a.filename for a in kept.attachments]
    assert "recipient row string is not cp1252" in kept.defects[0]


def embedded(inner: bytes, depth: int) -> bytes:
    """``inner`` as a message attached to a message, ``depth`` times over."""
    data = inner
    for _ in range(depth):
        outer = bytearray(Tnef().to_bytes())
        outer += tnef.record(2, tnef.ATT_ATTACH_REND_DATA, b"\x00" * 14)
        outer += tnef.record(2, tnef.ATT_ATTACH_TITLE, b"forwarded.msg\x00")
        props = tnef.mapi_block((0x000D, 0x3701, tnef.EMBEDDED_MESSAGE + data))
        outer += tnef.record(2, tnef.ATT_ATTACHMENT, props)
        data = bytes(outer)
    return data


def test_embedded_messages_are_listed_and_their_nesting_is_bounded() -> None:
    inner = Tnef(body=b"innermost").to_bytes()

    shallow = parse(winmail_mail(embedded(inner, 3)))
    deep = parse(winmail_mail(embedded(inner, 4)))

    assert ["forwarded.msg"] == [a.filename for a in shallow.attachments]
    assert [] == shallow.defects
    assert ["winmail.dat"] == [a.filename for a in deep.attachments]
    assert "embedded more than 3 deep" in deep.defects[0]


def test_a_file_inside_tnef_over_the_limit_is_withheld_and_flagged() -> None:
    tnef = Tnef(
        attachments=[
            Attachment(b"small.txt", b"s" * 100),
            Attachment(b"large.bin", b"L" * 5000),
        ]
    )

    parsed = parse(winmail_mail(tnef.to_bytes()), limit=4096)

    assert [("small.txt", False), ("large.bin", True)] == [
        (a.filename, a.withheld) for a in parsed.attachments
    ]
    assert Flag.ATTACHMENT_OVER_LIMIT in parsed.flags


def test_files_inside_tnef_count_towards_the_part_cap() -> None:
    many = [Attachment(f"f{i}.txt".encode(), b"x") for i in range(MAX_PARTS + 10)]

    parsed = parse(winmail_mail(Tnef(attachments=many).to_bytes()))

    # The message, its multipart and the winmail.dat part are parts too.
    assert MAX_PARTS - 2 == len(parsed.attachments)
    assert any(f"more than {MAX_PARTS}" in d for d in parsed.defects)


# --- through a real router over RabbitMQ ---------------------------------------


@pytest.fixture
def router_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"attachment_limit_bytes": 64 * 1024, "inline_max_bytes": 1024}
    )


@contextmanager
def running_router(settings: Settings) -> Iterator[Router]:
    worker = Router(settings)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert worker.ready.wait(10)
        yield worker
    finally:
        stop.set()
        thread.join(10)


def publish(settings: Settings, channel_id: int, mails: list[bytes]) -> None:
    topology = Topology(prefix=settings.broker_prefix)
    outgoing = []
    with db.connect(settings.database_url.get_secret_value()) as conn:
        for data in mails:
            raw = RawEmail(
                channel_id=channel_id,
                source=MailSource(protocol=Protocol.POP3, uidl=uuid.uuid4().hex),
                raw=blobs.put(conn, data, inline_max=settings.inline_max_bytes),
            )
            outgoing.append(
                Outgoing(topology.raw_exchange, RAW_KEY, raw.to_json(), str(raw.id))
            )
    connection = broker.connect(AMQP_URL, attempts=3)
    try:
        Publisher(connection).publish_all(outgoing)
    finally:
        connection.release()


def test_winmail_dat_mail_is_routed_by_its_tnef_body_with_its_files_listed(
    catalog: Catalog, router_settings: Settings
) -> None:
    for key in ("general", "sales"):
        catalog.add_campaign(key, key.title())
    channel = catalog.add_channel("support", default_campaign="general")
    catalog.add_filter(channel.id, "body", "purchase order", "sales")
    order = Tnef(
        body=b"Please find our Purchase Order attached.",
        attachments=[
            Attachment(b"po-1234.pdf", b"%PDF" * 100),
            Attachment(b"scan.tif", b"II*\x00" + b"\x01" * 70_000),
            Attachment(b"terms.txt", b"Terms. " * 300),
        ],
    )
    plain = Tnef(body=b"Nothing to see.")
    broken = two_files().to_bytes()[:-500]
    mails = [
        winmail_mail(order.to_bytes(), message_id="order@customer.example"),
        winmail_mail(plain.to_bytes(), message_id="plain@customer.example"),
        winmail_mail(broken, message_id="broken@customer.example"),
    ]
    topology = Topology(prefix=router_settings.broker_prefix)
    queues = [topology.campaign_queue(key) for key in ("general", "sales")]

    with running_router(router_settings):
        publish(router_settings, channel.id, mails)
        got = drain(AMQP_URL, queues, until=lambda t: len(t) >= 3, timeout=20)
    routed = {
        r.headers.message_id: r
        for r in (RoutedEmail.model_validate_json(m.body) for m in got)
    }

    first = routed["<order@customer.example>"]
    assert "sales" == first.campaign_key
    assert "Please find our Purchase Order attached." == first.text_body
    assert [
        ("po-1234.pdf", 400, False),
        ("scan.tif", 70_004, True),
        ("terms.txt", 2_100, False),
    ] == [(a.filename, a.size, a.withheld) for a in first.attachments]
    # A consumer gets the files' bytes: inline while they fit the inline
    # limit, the rest by claim check; a withheld file has none.
    pdf, scan, terms = (a.content for a in first.attachments)
    assert pdf is not None and b"%PDF" * 100 == pdf.data
    assert scan is None
    assert terms is not None and terms.is_claim_check
    with db.connect(router_settings.database_url.get_secret_value()) as conn:
        assert b"Terms. " * 300 == blobs.get(conn, terms)
    assert Flag.ATTACHMENT_OVER_LIMIT in first.flags
    assert "general" == routed["<plain@customer.example>"].campaign_key

    kept = routed["<broken@customer.example>"]
    assert "general" == kept.campaign_key
    assert ["winmail.dat"] == [a.filename for a in kept.attachments]
    assert Flag.PARSE_DEFECTS in kept.flags
    assert "truncated" in kept.defects[0]
