"""Raw RFC 5322 bytes turned into what the router routes on and passes along.

parse_email splits the message with services.router.mime, decodes only the
header fields the router uses into Headers and addresses, and sets the flags
that filters match on: auto-reply, bounce, mailing list. Whatever cannot be
understood becomes a defect and parsing goes on; only input without a single
header field is rejected as not being mail. html_to_text gives filters the
visible text of a message that has only an HTML body.
"""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import getaddresses, parsedate_to_datetime

from services.router.decoding import (
    MAX_DEFECTS,
    Defects,
    charset_codec,
    decode_words,
    excerpt,
    header_text,
    single_line,
    unquote,
)
from services.router.filenames import safe_filename
from services.router.mime import (
    MAX_DEPTH,
    MAX_PARTS,
    HeaderFields,
    Walker,
    header_fields,
)
from shared.errors import MessageRejected
from shared.models import Address, AttachmentInfo, Flag, Headers

# The limits and safe_filename live with the code they govern; callers that
# know them from this module still find them here.
__all__ = [
    "MAX_DEFECTS",
    "MAX_DEPTH",
    "MAX_PARTS",
    "ParsedEmail",
    "html_to_text",
    "parse_email",
    "safe_filename",
]

MAX_ADDRESSES = 1000
MAX_ADDRESS_TEXT = 64 * 1024

_ADDR_SPEC = r'[^\s<>(),;:"@\\]+@[^\s<>(),;:"@\\]+'
# Alternatives that cannot overlap, so a long run of spaces stays linear.
_SIMPLE_ADDRESS = re.compile(
    rf'\s*"((?:[^"\\]|\\.)*)"\s*<({_ADDR_SPEC})>\s*'
    rf'|([^"<>(),;:@\\]*)<({_ADDR_SPEC})>\s*'
    rf"|\s*({_ADDR_SPEC})\s*"
)
_ADDRESS_PIECE = re.compile(r'(?:"(?:[^"\\]|\\.)*"|[^,"])+')
_MSG_ID = re.compile(r"<[^<>\s]+>")

_AUTO_REPLY_HEADERS = ("x-autoreply", "x-autorespond", "x-autoreply-from")
_AUTO_PRECEDENCE = frozenset({"bulk", "junk", "auto_reply", "auto-reply"})

_HTML_INVISIBLE = re.compile(r"<!--|<(script|style|head|title)[\s>/]", re.I)
_HTML_CLOSE = {
    tag: re.compile(f"</{tag}", re.I) for tag in ("script", "style", "head", "title")
}
_HTML_BREAK = re.compile(
    r"<\s*(?:br|p|div|tr|li|h[1-6]|table|blockquote)\b[^<>]*>"
    r"|<\s*/\s*(?:p|div|tr|li|h[1-6]|table|blockquote)\s*>",
    re.I,
)
_HTML_TAG = re.compile(r"<[^<>]*>")
_HTML_SPACE = re.compile(r"[ \t\r\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class ParsedEmail:
    headers: Headers
    text_body: str
    html_body: str
    attachments: list[AttachmentInfo]
    flags: list[Flag]
    defects: list[str]
    sender_text: str
    body_text: str
    # Bytes of files unpacked from TNEF, by index in ``attachments``.
    unpacked: dict[int, bytes] = field(default_factory=dict)


def parse_email(raw: bytes, *, attachment_limit: int) -> ParsedEmail:
    """Parse one message; raise MessageRejected only when it is not mail at all."""
    if not raw or raw.isspace():
        raise MessageRejected("empty message")

    defects = Defects()
    data = raw
    if raw[0] in b"\r\n":
        data = raw.lstrip(b"\r\n")
        defects.add("blank lines before the header")

    fields, body_start = header_fields(data, defects, top=True)
    if not fields:
        raise MessageRejected("no header fields; this is not an email")

    walker = Walker(attachment_limit, defects)
    walker.entity(fields, (data, body_start, len(data)), 0, "text/plain")

    reader = _HeaderReader(fields, defects, walker.body_charset)
    headers = reader.headers()
    sender_text = reader.sender_text()
    flags = _flags(fields, walker.top_type, reader.senders())
    if not headers.message_id:
        generated = f"<{hashlib.sha256(raw).hexdigest()[:32]}@mailroom.invalid>"
        headers = headers.model_copy(update={"message_id": generated})
        flags.append(Flag.GENERATED_MESSAGE_ID)

    if any(a.withheld for a in walker.attachments):
        flags.append(Flag.ATTACHMENT_OVER_LIMIT)
    if defects.items:
        flags.append(Flag.PARSE_DEFECTS)

    text_body = walker.text_body or ""
    html_body = walker.html_body or ""
    if not text_body and not html_body:
        text_body = walker.tnef_text or ""
        html_body = walker.tnef_html or ""
    return ParsedEmail(
        headers=headers,
        text_body=text_body,
        html_body=html_body,
        attachments=walker.attachments,
        flags=flags,
        defects=defects.items,
        sender_text=sender_text,
        body_text=text_body or html_to_text(html_body),
        unpacked=walker.unpacked,
    )


class _HeaderReader:
    """Decodes the header fields the router uses, noting what is broken."""

    def __init__(self, fields: HeaderFields, defects: Defects, charset: str) -> None:
        self.fields = fields
        self.defects = defects
        codec = charset_codec(charset.strip().strip("\"'").lower())
        self.charset = codec[0] if codec and codec[1] else ""
        self.parsed_addresses: dict[str, list[Address]] = {}

    def headers(self) -> Headers:
        for name in ("from", "subject", "date", "message-id"):
            count = len(self.fields.get(name, ()))
            if count > 1:
                self.defects.add(f"{count} {name.title()} headers")

        references = self.fields.get("references", [])
        return Headers(
            **{"from": self.addresses("from")},
            to=self.addresses("to"),
            cc=self.addresses("cc"),
            reply_to=self.addresses("reply-to"),
            subject=self.text("subject"),
            date=self.date(),
            message_id=self.message_id("message-id"),
            in_reply_to=self.message_id("in-reply-to"),
            references=_MSG_ID.findall(
                single_line(self.raw_text(b" ".join(references)))
            ),
        )

    def raw_text(self, value: bytes) -> str:
        return header_text(value, self.charset)

    def text(self, name: str) -> str:
        values = self.fields.get(name)
        if not values:
            return ""
        return single_line(decode_words(self.raw_text(values[0]), self.defects))

    def addresses(self, name: str) -> list[Address]:
        cached = self.parsed_addresses.get(name)
        if cached is not None:
            return cached

        result: list[Address] = []
        for value in self.fields.get(name, ()):
            pairs = _address_pairs(self.raw_text(value))
            if len(pairs) + len(result) > MAX_ADDRESSES:
                self.defects.add(f"more than {MAX_ADDRESSES} addresses in {name}")
                pairs = pairs[: MAX_ADDRESSES - len(result)]

            found = 0
            for display, email in pairs:
                email = single_line(email)
                if email:
                    display = single_line(decode_words(display, self.defects))
                    result.append(Address(name=display, email=email))
                    found += 1

            if not found and name == "from" and value:
                self.defects.add("no address in From header")
        self.parsed_addresses[name] = result
        return result

    def date(self) -> datetime | None:
        text = self.text("date")
        if not text:
            return None

        try:
            date = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            self.defects.add(f"unreadable Date header {excerpt(text)}")
            return None
        return date if date.tzinfo else date.replace(tzinfo=UTC)

    def message_id(self, name: str) -> str:
        """The first <id> of a field, or its text when a sender left out the <>."""
        values = self.fields.get(name)
        if not values:
            return ""

        text = single_line(self.raw_text(values[0]))
        match = _MSG_ID.search(text)
        if match:
            return match.group()
        return text if text.strip("<> ") else ""

    def senders(self) -> list[Address]:
        return self.addresses("from") + self.addresses("sender")

    def sender_text(self) -> str:
        """From and Sender as filters see them.

        The addresses as parsed, and the decoded header text as well when
        parsing lost part of it (two addresses without a comma, say).
        """
        senders = self.senders()
        parsed = ", ".join(str(a) for a in senders)
        if senders and all(_is_plain_address(a.email) for a in senders):
            return parsed

        values = self.fields.get("from", []) + self.fields.get("sender", [])
        raw = " ".join(self.raw_text(v) for v in values)
        return single_line(f"{parsed} {decode_words(raw, self.defects)}")


def _address_pairs(text: str) -> list[tuple[str, str]]:
    """(display name, address) pairs of an address list.

    The common shapes (``a@b``, ``Name <a@b>``, ``"Name" <a@b>``, separated
    by commas) are read by one regular expression; anything else goes to the
    standard library's slower, more forgiving parser.
    """
    if "(" in text or text.count('"') % 2:
        return _parse_addresses(text)

    pieces = _ADDRESS_PIECE.findall(text) if '"' in text else text.split(",")
    pairs = []
    for piece in pieces:
        match = _SIMPLE_ADDRESS.fullmatch(piece)
        if match is None:
            return _parse_addresses(text)

        quoted, quoted_spec, plain, plain_spec, bare = match.groups()
        if quoted_spec is not None:
            pairs.append((unquote(quoted), quoted_spec))
        elif plain_spec is not None:
            pairs.append((" ".join(plain.split()), plain_spec))
        else:
            pairs.append(("", bare))
    return pairs


def _parse_addresses(text: str) -> list[tuple[str, str]]:
    if len(text) > MAX_ADDRESS_TEXT:
        return []
    try:
        return getaddresses([text])
    except RecursionError:
        # Thousands of nested comment parentheses.
        return []


def _is_plain_address(email: str) -> bool:
    local, at, domain = email.rpartition("@")
    return bool(local and at and domain) and " " not in email


def _flags(fields: HeaderFields, top_type: str, senders: list[Address]) -> list[Flag]:
    flags = []
    if _is_auto_reply(fields):
        flags.append(Flag.AUTO_REPLY)
    if _is_bounce(fields, top_type, senders):
        flags.append(Flag.BOUNCE)
    if (
        "list-id" in fields
        or "list-unsubscribe" in fields
        or _first(fields, "precedence") == "list"
    ):
        flags.append(Flag.MAILING_LIST)
    return flags


def _first(fields: HeaderFields, name: str) -> str:
    """The first value of a field as a lower-case token, '' when absent."""
    values = fields.get(name)
    if not values:
        return ""
    return values[0].decode("latin-1").split(";", 1)[0].strip().lower()


def _is_auto_reply(fields: HeaderFields) -> bool:
    auto_submitted = _first(fields, "auto-submitted")
    return (
        (auto_submitted != "" and auto_submitted != "no")
        or _first(fields, "x-auto-response-suppress") != ""
        or _first(fields, "precedence") in _AUTO_PRECEDENCE
        or any(name in fields for name in _AUTO_REPLY_HEADERS)
    )


def _is_bounce(fields: HeaderFields, top_type: str, senders: list[Address]) -> bool:
    return_path = fields.get("return-path")
    return (
        top_type == "multipart/report"
        or bool(return_path and b"".join(return_path[0].split()) == b"<>")
        or any(a.email.lower().partition("@")[0] == "mailer-daemon" for a in senders)
    )


def html_to_text(markup: str) -> str:
    """Visible text of an HTML body, for matching filters against."""
    if not markup:
        return ""

    markup = _drop_invisible(markup)
    markup = _HTML_BREAK.sub("\n", markup)
    text = html.unescape(_HTML_TAG.sub("", markup))
    lines = (_HTML_SPACE.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _drop_invisible(markup: str) -> str:
    """Comments, scripts, styles and the head removed, in one pass."""
    match = _HTML_INVISIBLE.search(markup)
    if match is None:
        return markup

    out = []
    pos = 0
    while match is not None:
        out.append(markup[pos : match.start()])
        tag = match.group(1)
        if tag:
            close = _HTML_CLOSE[tag.lower()].search(markup, match.end())
            found = markup.find(">", close.end()) if close else -1
            end = found + 1 if found >= 0 else -1
        else:
            found = markup.find("-->", match.end())
            end = found + 3 if found >= 0 else -1
        if end < 0:
            return "".join(out)

        pos = end
        match = _HTML_INVISIBLE.search(markup, pos)

    out.append(markup[pos:])
    return "".join(out)
