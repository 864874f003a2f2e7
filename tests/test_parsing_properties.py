"""parse_email on generated malformed mail: it rejects or parses, never fails.

Hypothesis builds messages from random header lines, MIME trees with broken
or missing boundaries, random charsets and transfer encodings, random bytes
in bodies and deep nesting, and checks the promises the router relies on.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.router.parsing import (
    MAX_DEFECTS,
    MAX_PARTS,
    ParsedEmail,
    parse_email,
)
from shared.errors import MessageRejected
from shared.models import Flag
from tests.support import tnef

LIMIT = 64

CHARSETS = [
    "utf-8",
    "us-ascii",
    "iso-8859-1",
    "windows-1252",
    "x-unknown",
    "utf-7",
    "utf-16",
    "shift_jis",
    "iso-2022-jp",
    "ks_c_5601-1987",
    "gb2312",
    "base64",
    "zlib",
    "unicode_escape",
    "undefined",
    "",
    '"utf-8"',
    "\x00",
]
ENCODINGS = ["base64", "quoted-printable", "7bit", "8bit", "x-uuencode", "bogus", ""]
TYPES = [
    "text/plain",
    "text/html",
    "message/rfc822",
    "multipart/report",
    "application/pdf",
    "image/png",
    "text",
    "",
]
NAMES = [
    "From",
    "To",
    "Cc",
    "Reply-To",
    "Sender",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "Content-Type",
    "Content-Disposition",
    "Content-Transfer-Encoding",
    "Return-Path",
    "Auto-Submitted",
    "Precedence",
    "List-Id",
    "X-Anything",
]

properties = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

junk = st.binary(max_size=200)
charset = st.sampled_from(CHARSETS) | st.text(max_size=12)
text = st.text(max_size=60)


@st.composite
def encoded_word(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from("bBqQ"))
    payload = draw(st.text(alphabet="ABCDEFabcdef0123456789=+/_? ", max_size=20))
    return f"=?{draw(charset)}?{kind}?{payload}?=".encode("utf-8", "replace")


header_value = st.one_of(
    text.map(lambda t: t.encode("utf-8")),
    junk,
    encoded_word(),
    st.lists(encoded_word(), max_size=4).map(b"\r\n ".join),
    st.sampled_from(
        [
            b"<>",
            b'"Doe, Jane" <jane@example.com>, bob@example.com',
            b"undisclosed-recipients:;",
            b"bad <<a@b>",
            b"Tue, 10 May 2005 15:27:03 -0500",
            b"Mon, 99 Foo 99999 99:99:99 +9999",
            b"multipart/mixed; boundary=",
            b"attachment; filename*0*=x'y'%E3%81; filename*1=z",
            b"auto-replied",
        ]
    ),
)


@st.composite
def header_line(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(NAMES) | st.text(min_size=1, max_size=10))
    separator = draw(st.sampled_from([b": ", b":", b" : ", b"\r\n\t", b""]))
    return name.encode("utf-8", "replace") + separator + draw(header_value)


@st.composite
def entity(draw: st.DrawFn, depth: int) -> bytes:
    """One MIME entity: header lines, then a body that may be a multipart."""
    lines = draw(st.lists(header_line(), max_size=4))
    ctype = draw(st.sampled_from(TYPES))
    params = f"; charset={draw(charset)}"
    if draw(st.booleans()):
        params += f'; name="{draw(text)}"'

    body: bytes
    if depth > 0 and draw(st.booleans()):
        boundary = draw(st.sampled_from(["b", "b-b", "=_x", "a--", ""]))
        boundary += str(depth)
        ctype = draw(st.sampled_from(["multipart/mixed", "multipart/digest", ""]))
        params = f'; boundary="{boundary}"'
        children = draw(st.lists(entity(depth - 1), max_size=3))
        used = draw(st.sampled_from([boundary, boundary + "x", boundary[:-1]]))
        delimiter = f"\r\n--{used}\r\n".encode()
        body = draw(junk) + delimiter + delimiter.join(children)
        if draw(st.booleans()):
            body += f"\r\n--{used}--\r\n".encode()
    else:
        body = draw(junk)

    encoding = draw(st.sampled_from(ENCODINGS))
    lines.append(f"Content-Type: {ctype}{params}".encode("utf-8", "replace"))
    lines.append(f"Content-Transfer-Encoding: {encoding}".encode())
    draw(st.randoms()).shuffle(lines)
    separator = draw(st.sampled_from([b"\r\n\r\n", b"\n\n", b"\r\n"]))
    return b"\r\n".join(lines) + separator + body


def check(parsed: ParsedEmail) -> None:
    headers = parsed.headers
    addresses = headers.from_ + headers.to + headers.cc + headers.reply_to
    strings = [
        headers.subject,
        headers.message_id,
        headers.in_reply_to,
        *headers.references,
        *(a.name for a in addresses),
        *(a.email for a in addresses),
        parsed.sender_text,
    ]
    assert [] == [s for s in strings if re.search(r"[\r\n\x00]", s)]
    assert headers.message_id != ""

    for attachment in parsed.attachments:
        assert attachment.size >= 0
        assert (attachment.size > LIMIT) == attachment.withheld
        assert attachment.filename != ""
        assert not re.search(r"[/\\\x00-\x1f]", attachment.filename)
    withheld = any(a.withheld for a in parsed.attachments)
    assert withheld == (Flag.ATTACHMENT_OVER_LIMIT in parsed.flags)
    assert len(parsed.attachments) <= MAX_PARTS

    assert bool(parsed.defects) == (Flag.PARSE_DEFECTS in parsed.flags)
    assert len(parsed.defects) <= MAX_DEFECTS
    assert len(set(parsed.flags)) == len(parsed.flags)
    for body in (parsed.text_body, parsed.html_body, parsed.body_text):
        body.encode("utf-8")
    if parsed.text_body:
        assert parsed.text_body == parsed.body_text
    headers.model_dump_json()


def parse_or_reject(raw: bytes) -> None:
    try:
        parsed = parse_email(raw, attachment_limit=LIMIT)
    except MessageRejected as exc:
        assert str(exc) != ""
        return
    check(parsed)


@properties
@given(st.binary(max_size=2000))
def test_random_bytes_are_parsed_or_rejected(raw: bytes) -> None:
    parse_or_reject(raw)


@properties
@given(st.lists(header_line(), min_size=1, max_size=12), junk)
def test_random_header_lines_are_parsed_or_rejected(
    lines: list[bytes], body: bytes
) -> None:
    parse_or_reject(b"\r\n".join(lines) + b"\r\n\r\n" + body)


@properties
@given(entity(depth=4))
def test_broken_mime_trees_are_parsed_or_rejected(raw: bytes) -> None:
    parse_or_reject(b"From: a@example.com\r\n" + raw)


@properties
@given(st.integers(min_value=1, max_value=40), st.sampled_from(["\r\n", "\n"]))
def test_deep_nesting_stops_at_the_cap(depth: int, newline: str) -> None:
    head = "".join(
        f'Content-Type: multipart/mixed; boundary="{i}"{newline}{newline}--{i}{newline}'
        for i in range(depth)
    )
    raw = f"From: a@example.com{newline}{head}{newline}deepest{newline}".encode()

    parsed = parse_email(raw, attachment_limit=LIMIT)

    check(parsed)
    assert ("deepest" in parsed.text_body) == (depth <= 20)


TNEF_ATTRIBUTES = [
    tnef.ATT_TNEF_VERSION,
    tnef.ATT_OEM_CODEPAGE,
    tnef.ATT_MESSAGE_CLASS,
    tnef.ATT_BODY,
    tnef.ATT_MAPI_PROPS,
    tnef.ATT_ATTACH_REND_DATA,
    tnef.ATT_ATTACH_TITLE,
    tnef.ATT_ATTACH_DATA,
    tnef.ATT_ATTACHMENT,
    0x0004_9004,  # attRecipTable
    0x0000_8000,  # attFrom
    0x0003_8013,  # attAttachModifyDate
]


@st.composite
def mapi_value(draw: st.DrawFn) -> bytes:
    """A MAPI property block: sound, or with counts and types drawn at random."""
    if draw(st.booleans()):
        kind = draw(st.sampled_from([tnef.PT_BINARY, tnef.PT_UNICODE]))
        pid = draw(st.sampled_from([tnef.PID_BODY_HTML, 0x3701, 0x3707, 0x8001]))
        return tnef.mapi_block((kind, pid, draw(junk)))
    count = draw(st.integers(0, 2**32 - 1) | st.integers(0, 4))
    return count.to_bytes(4, "little") + draw(junk)


@st.composite
def tnef_stream(draw: st.DrawFn) -> bytes:
    """Records with sound framing and checksums, and values drawn at random."""
    out = bytearray(tnef.SIGNATURE.to_bytes(4, "little") + b"\x00\x00")
    for _ in range(draw(st.integers(0, 12))):
        level = draw(st.sampled_from([1, 1, 2, 2, 2, 0]))
        attribute = draw(st.sampled_from(TNEF_ATTRIBUTES))
        if attribute in (tnef.ATT_MAPI_PROPS, tnef.ATT_ATTACHMENT, 0x0004_9004):
            data = draw(mapi_value())
        else:
            data = draw(junk)
        out += tnef.record(level, attribute, data)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(out)))
        out = out[:cut] + draw(junk)
    return bytes(out)


@properties
@given(junk | tnef_stream(), st.sampled_from(["application/ms-tnef", "image/png"]))
def test_random_bytes_in_a_tnef_part_are_unpacked_or_kept(
    data: bytes, content_type: str
) -> None:
    raw = tnef.winmail_mail(data, text="Hello.", content_type=content_type)

    parsed = parse_email(raw, attachment_limit=LIMIT)

    check(parsed)
    unreadable = [d for d in parsed.defects if d.startswith("TNEF part")]
    kept = [a for a in parsed.attachments if a.filename == "winmail.dat"]
    assert len(unreadable) == len(kept)
