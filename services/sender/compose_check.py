"""The check that a composed message says exactly what was meant.

``compose`` builds the bytes; ``verify`` parses every header block back and
follows the parts by their boundary lines, and refuses the message unless
its headers, addresses and parts are exactly the intended ones. Some Python
releases (3.11.7 among them) fold a header so that an encoded line break
becomes a real one; a value crafted for that would show up here as a header
or recipient too many.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from typing import NoReturn

from shared.errors import MessageRejected

FIELD = re.compile(rb"^[!-9;-~]+:")
PART_FIELDS = frozenset(
    {"content-type", "content-transfer-encoding", "content-disposition"}
)
MIME_VERSION = b"MIME-Version: 1.0\r\n"
TEXT_TYPES = ("text/plain", "text/html")
TEXT_HEADERS = (
    b'Content-Type: %s; charset="utf-8"\r\n'
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
)
TEXT_BLOCKS = {
    TEXT_HEADERS % subtype.encode("ascii"): subtype for subtype in TEXT_TYPES
}
MULTIPART_BLOCK = re.compile(
    rb'Content-Type: (multipart/(?:mixed|alternative)); boundary="(=_[0-9a-f]{24})"'
    rb"\r\n\r\n"
)
HEADER_PARSER = BytesHeaderParser(policy=policy.default)

Intended = str | list[tuple[str, str]]
# A part as a parser reads it: content type, filename, subparts.
Shape = tuple[str, str | None, tuple["Shape", ...]]


def verify(raw: bytes, headers: list[tuple[str, Intended]], shape: Shape) -> None:
    """Refuse ``raw`` unless it parses back to exactly what was intended.

    Only the header blocks are parsed: bodies are found by their boundary
    lines, the way a MIME parser finds them, and every occurrence of a
    boundary in the message must be one of those lines.
    """
    if not raw.isascii():
        refuse("it is not plain ASCII")

    end = raw.find(b"\r\n\r\n")
    if end < 0:
        refuse("it has no end of headers")

    # The message's own headers come first, then the MIME ones, which are
    # checked as those of a part are.
    _field_names(raw[:end])
    mime = raw.rfind(b"\r\n" + MIME_VERSION, 0, end + 2)
    if mime < 0:
        refuse("it has no MIME-Version header where it belongs")

    found = _field_names(raw[:mime])
    intended = [name.lower() for name, _ in headers]
    if sorted(found) != sorted(intended):
        refuse(f"its headers are {found}, not {intended}")

    parsed = _parse_headers(raw[:mime])
    for name, value in headers:
        if _parsed_value(parsed, name) != _normalized(value):
            refuse(f"its {name} header does not read back as written")

    if _part(raw, mime + 2 + len(MIME_VERSION), len(raw)) != shape:
        refuse("its parts or attachments do not read back as written")


def _shape(raw: bytes, parsed: EmailMessage, start: int, end: int) -> Shape:
    """What a parser makes of the part whose body is ``raw[start:end]``."""
    content_type = parsed.get_content_type()
    filename = _filename(parsed)
    if not content_type.startswith("multipart/"):
        return content_type, filename, ()

    boundary = parsed.get_boundary()
    if not boundary:
        refuse("a multipart has no boundary")

    return content_type, filename, tuple(_parts(raw, boundary, start, end))


def _parts(raw: bytes, boundary: str, start: int, end: int) -> Iterator[Shape]:
    delimiter = b"--" + boundary.encode("ascii")
    where = raw.find(delimiter, start, end)
    if where != start:
        refuse("a multipart does not start with its boundary")

    while True:
        after = where + len(delimiter)
        if raw.startswith(b"--\r\n", after, end) and after + 4 == end:
            return

        if not raw.startswith(b"\r\n", after, end):
            refuse("a boundary line holds more than the boundary")

        following = raw.find(delimiter, after, end)
        if following < 0 or raw[following - 2 : following] != b"\r\n":
            refuse("a boundary appears inside a part")

        yield _part(raw, after + 2, following - 2)
        where = following


def _part(raw: bytes, start: int, end: int) -> Shape:
    head_end = raw.find(b"\r\n\r\n", start, end)
    if head_end < 0:
        refuse("a part has no end of headers")

    # The header blocks of text parts and multiparts hold no value from the
    # message, so they are compared as bytes; only attachments need parsing.
    block = raw[start : head_end + 4]
    if block in TEXT_BLOCKS:
        return TEXT_BLOCKS[block], None, ()

    multipart = MULTIPART_BLOCK.fullmatch(block)
    if multipart is not None:
        content_type, boundary = (group.decode("ascii") for group in multipart.groups())
        return content_type, None, tuple(_parts(raw, boundary, head_end + 4, end))

    names = _field_names(raw[start:head_end])
    if len(set(names)) != len(names) or not set(names) <= PART_FIELDS:
        refuse(f"a part has the headers {names}")

    parsed = _parse_headers(raw[start:head_end])
    return _shape(raw, parsed, head_end + 4, end)


def _parse_headers(head: bytes) -> EmailMessage:
    parsed = HEADER_PARSER.parsebytes(head + b"\r\n\r\n")
    assert isinstance(parsed, EmailMessage)
    return parsed


def _field_names(head: bytes) -> list[str]:
    names: list[str] = []
    for line in head.split(b"\r\n"):
        if b"\r" in line or b"\n" in line or b"\x00" in line:
            refuse("a header holds a bare line break")

        if line[:1] in (b" ", b"\t") and names:
            continue

        field = FIELD.match(line)
        if field is None:
            refuse("a header line is neither a field nor a continuation")

        names.append(field.group()[:-1].decode("ascii").lower())

    return names


def _filename(part: EmailMessage) -> str | None:
    # get_filename() strips quotes and angle brackets a name may really have.
    disposition = part.get("Content-Disposition")
    params = getattr(disposition, "params", {})
    return params.get("filename")


def _parsed_value(parsed: EmailMessage, name: str) -> Intended:
    found = parsed.get_all(name, [])
    if len(found) != 1:
        return []

    header = found[0]
    if hasattr(header, "addresses"):
        return _normalized([(a.display_name, a.addr_spec) for a in header.addresses])

    return _normalized(str(header))


def _normalized(value: Intended) -> Intended:
    """``value`` without the white space folding may change.

    The standard parser puts a space between adjacent encoded words of a
    display name, where RFC 2047 says there is none; so names compare
    without white space, addresses exactly.
    """
    if isinstance(value, str):
        return " ".join(value.split())

    return [("".join(name.split()), email) for name, email in value]


def refuse(reason: str) -> NoReturn:
    raise MessageRejected(
        f"the composed message was not sent because {reason}: a value tried "
        "to add headers or recipients, or holds text that looks like an "
        "encoded word (=?...?=); change it and send again"
    )
