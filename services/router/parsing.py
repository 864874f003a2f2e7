"""Raw RFC 5322 bytes turned into what the router routes on and passes along.

Built for throughput and for broken mail. The header block is split by hand
and only the fields the router uses are decoded; the MIME tree is walked over
byte offsets, and attachment payloads are decoded only to count and hash them.
Whatever cannot be understood becomes a defect and parsing goes on; only input
without a single header field is rejected as not being mail.
"""

from __future__ import annotations

import binascii
import codecs
import hashlib
import html
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import getaddresses, parsedate_to_datetime
from functools import lru_cache
from urllib.parse import unquote_to_bytes

from shared.errors import MessageRejected
from shared.models import Address, AttachmentInfo, Flag, Headers

MAX_DEPTH = 20
MAX_PARTS = 500
MAX_DEFECTS = 50
MAX_ADDRESSES = 1000
MAX_ADDRESS_TEXT = 64 * 1024

HeaderFields = dict[str, list[bytes]]
# A parameter's bytes, and its RFC 2231 charset (None when it was not encoded).
Param = tuple[bytes, str | None]

_HEADER_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]+")
_PARAM = re.compile(r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)')
_QUOTED_PAIR = re.compile(r"\\(.)")
_MIME_TYPE = re.compile(r"[a-z0-9!#$&.+^_`{}~-]+/[a-z0-9!#$&.+^_`{}~-]+")
_ADDR_SPEC = r'[^\s<>(),;:"@\\]+@[^\s<>(),;:"@\\]+'
# Alternatives that cannot overlap, so a long run of spaces stays linear.
_SIMPLE_ADDRESS = re.compile(
    rf'\s*"((?:[^"\\]|\\.)*)"\s*<({_ADDR_SPEC})>\s*'
    rf'|([^"<>(),;:@\\]*)<({_ADDR_SPEC})>\s*'
    rf"|\s*({_ADDR_SPEC})\s*"
)
_ADDRESS_PIECE = re.compile(r'(?:"(?:[^"\\]|\\.)*"|[^,"])+')
_MSG_ID = re.compile(r"<[^<>\s]+>")
_UNSAFE_IN_FILENAME = re.compile(r'[<>:"|?*]')

_ASCII_CHARSETS = frozenset({"", "us-ascii", "ascii", "us", "ansi_x3.4-1968"})
# Labels that mail clients use for a larger charset than the label names.
_CHARSET_ALIASES = {
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "iso_8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "euc-kr": "cp949",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "euc-cn": "gb18030",
    "big5": "big5hkscs",
    "tis-620": "cp874",
    "iso-8859-11": "cp874",
}
# Text codecs that turn bytes into escapes or exceptions rather than text.
_REFUSED_CODECS = frozenset(
    {"undefined", "unicode_escape", "raw_unicode_escape", "idna", "punycode"}
)
# ASCII bytes that some codecs read as something else: shift sequences of
# ISO-2022, UTF-7 and HZ, and every ASCII byte for EBCDIC and UTF-16/32.
_ASCII_PROBES = (
    bytes(range(128)),
    b"\x1b$B$9\x1b(B",
    b"\x1b$)C\x0e!!\x0f",
    b"+AGEAYgBj-",
    b"~{<:~}",
)

_IDENTITY_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})
_UU_ENCODINGS = frozenset({"x-uuencode", "uuencode", "x-uue", "uue"})
_EXTENSIONS = {
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "text/rfc822-headers": ".txt",
    "message/rfc822": ".eml",
    "message/delivery-status": ".txt",
    "message/disposition-notification": ".txt",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "application/pdf": ".pdf",
    "application/pkcs7-signature": ".p7s",
    "application/pgp-signature": ".asc",
}

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
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


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


class Defects:
    """Defect names in the order found, each once, and no more than a screenful."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, text: str) -> None:
        if len(self.items) < MAX_DEFECTS and text not in self.items:
            self.items.append(text)


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

    walker = _Walker(attachment_limit, defects)
    walker.entity(fields, data[body_start:], 0, "text/plain")

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
    return ParsedEmail(
        headers=headers,
        text_body=text_body,
        html_body=html_body,
        attachments=walker.attachments,
        flags=flags,
        defects=defects.items,
        sender_text=sender_text,
        body_text=text_body or html_to_text(html_body),
    )


def header_fields(
    data: bytes, defects: Defects, *, top: bool
) -> tuple[HeaderFields, int]:
    """Unfolded raw values by lower-case field name, and where the body starts."""
    found: list[tuple[str, list[bytes]]] = []
    current: list[bytes] | None = None
    size = len(data)
    pos = 0
    body_start = size
    while pos < size:
        eol = data.find(b"\n", pos)
        following = size if eol < 0 else eol + 1
        line = data[pos:following].rstrip(b"\r\n")
        if not line:
            body_start = following
            break

        if line[0] in b" \t":
            if current is not None:
                current.append(line)
            else:
                defects.add("FirstHeaderLineIsContinuationDefect")
        elif match := _HEADER_NAME.match(line):
            current = [line[match.end() :]]
            found.append((match.group(1).decode("ascii").lower(), current))
        elif top and pos == 0 and line.startswith(b"From "):
            pass
        elif top and not line.startswith(b"--") and _fields_follow(data, following):
            defects.add("line without a field name in the header skipped")
        else:
            defects.add("MissingHeaderBodySeparatorDefect")
            body_start = pos
            break

        pos = following

    fields: HeaderFields = {}
    for name, lines in found:
        fields.setdefault(name, []).append(b"".join(lines).strip())
    return fields, body_start


def _fields_follow(data: bytes, pos: int) -> bool:
    """Whether only header fields follow, up to an empty line.

    Tells a stray line inside the header (skipped) from the first line of a
    body that a sender started without the empty line.
    """
    seen = False
    for _ in range(100):
        eol = data.find(b"\n", pos)
        if eol < 0:
            return False

        line = data[pos:eol].rstrip(b"\r")
        if not line:
            return seen

        if line[0] not in b" \t":
            if not _HEADER_NAME.match(line):
                return False
            seen = True
        pos = eol + 1
    return False


class _Walker:
    """Depth-first walk of the MIME tree, choosing bodies and listing the rest."""

    def __init__(self, attachment_limit: int, defects: Defects) -> None:
        self.attachment_limit = attachment_limit
        self.defects = defects
        self.text_body: str | None = None
        self.html_body: str | None = None
        self.attachments: list[AttachmentInfo] = []
        self.top_type = ""
        self.body_charset = ""
        self.parts = 0
        self.stopped = False

    def entity(
        self, fields: HeaderFields, body: bytes, depth: int, default_type: str
    ) -> None:
        if self.parts >= MAX_PARTS:
            self.defects.add(f"more than {MAX_PARTS} MIME parts; the rest is unread")
            self.stopped = True
            return

        self.parts += 1
        ctype, params = _content_type(fields, default_type, self.defects)
        if not self.top_type:
            self.top_type = ctype

        if ctype.startswith("multipart/"):
            self.multipart(fields, ctype, params, body, depth)
        else:
            self.leaf(fields, ctype, params, body)

    def multipart(
        self,
        fields: HeaderFields,
        ctype: str,
        params: dict[str, Param],
        body: bytes,
        depth: int,
    ) -> None:
        if depth >= MAX_DEPTH:
            self.defects.add(f"MIME nested deeper than {MAX_DEPTH}; the rest is unread")
            self.stopped = True
            return

        boundary = params.get("boundary", (b"", None))[0].strip()
        if not boundary:
            self.defects.add("NoBoundaryInMultipartDefect")
            self.leaf(fields, "text/plain", params, body)
            return

        split = _split_multipart(body, boundary, MAX_PARTS + 1 - self.parts)
        if split is None:
            self.defects.add("StartBoundaryNotFoundDefect")
            self.leaf(fields, "text/plain", params, body)
            return

        parts, closed = split
        if not closed:
            self.defects.add("CloseBoundaryNotFoundDefect")

        child_type = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        for part in parts:
            child_fields, start = header_fields(part, self.defects, top=False)
            self.entity(child_fields, part[start:], depth + 1, child_type)
            if self.stopped:
                return

    def leaf(
        self, fields: HeaderFields, ctype: str, params: dict[str, Param], body: bytes
    ) -> None:
        disposition, disposition_params = _disposition(fields)
        name = disposition_params.get("filename") or params.get("name")
        filename = _param_text(name, self.defects) if name else ""
        encoding = _transfer_encoding(fields)

        is_text = ctype == "text/plain" or ctype == "text/html"
        if is_text and disposition != "attachment" and not filename:
            if not body.strip():
                return

            if ctype == "text/plain" and self.text_body is None:
                self.text_body = self._text(body, encoding, params)
                return

            if ctype == "text/html" and self.html_body is None:
                self.html_body = self._text(body, encoding, params)
                return

        data = _transfer_decode(body, encoding, self.defects)
        fallback = f"attachment-{len(self.attachments) + 1}"
        self.attachments.append(
            AttachmentInfo(
                filename=safe_filename(filename)
                or fallback + _EXTENSIONS.get(ctype, ".bin"),
                content_type=ctype,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                withheld=len(data) > self.attachment_limit,
            )
        )

    def _text(self, body: bytes, encoding: str, params: dict[str, Param]) -> str:
        data = _transfer_decode(body, encoding, self.defects)
        charset = params.get("charset", (b"", None))[0].decode("latin-1")
        self.body_charset = self.body_charset or charset
        text = decode_text(data, charset, self.defects)

        if "\r" in text:
            text = text.replace("\r\n", "\n")
        if "\x00" in text:
            text = text.replace("\x00", "\ufffd")
        return text


def _split_multipart(
    body: bytes, boundary: bytes, limit: int
) -> tuple[list[bytes], bool] | None:
    """Up to ``limit`` parts between delimiter lines, and whether a close came.

    None when no opening delimiter line is found. A delimiter must start a
    line and be followed by nothing but white space, so a boundary that is
    the prefix of a nested one does not split the nested part.
    """
    delimiter = b"--" + boundary
    size = len(body)
    parts: list[bytes] = []
    start = -1
    pos = 0
    while len(parts) < limit:
        found = body.find(delimiter, pos)
        if found < 0:
            break

        pos = found + 1
        if found > 0 and body[found - 1] != 0x0A:
            continue

        end = found + len(delimiter)
        closing = body.startswith(b"--", end)
        if closing:
            end += 2

        while end < size and body[end] in b" \t":
            end += 1

        if end < size and body[end] not in b"\r\n":
            continue

        if start >= 0:
            stop = found
            if stop > start and body[stop - 1] == 0x0A:
                stop -= 1
            if stop > start and body[stop - 1] == 0x0D:
                stop -= 1
            parts.append(body[start:stop])

        if closing and start >= 0:
            return parts, True
        if closing:
            continue

        if body.startswith(b"\r\n", end):
            end += 2
        elif end < size:
            end += 1
        start = pos = end

    if start < 0:
        return None
    if len(parts) >= limit:
        return parts, True
    parts.append(body[start:])
    return parts, False


def _content_type(
    fields: HeaderFields, default: str, defects: Defects
) -> tuple[str, dict[str, Param]]:
    values = fields.get("content-type")
    if not values:
        return default, {}

    if len(values) > 1:
        defects.add(f"{len(values)} Content-Type headers; the first is used")

    text = values[0].decode("latin-1")
    head, _, rest = text.partition(";")
    ctype = head.strip().lower()
    if "=" in ctype and len(words := ctype.split(None, 1)) == 2:
        defects.add("Content-Type parameters without ';'")
        ctype = words[0]
        rest = head.strip().split(None, 1)[1] + ";" + rest

    params = _params(rest)
    if not _MIME_TYPE.fullmatch(ctype):
        defects.add(f"invalid Content-Type {_short(ctype)}, read as {default}")
        return default, params
    return ctype, params


def _disposition(fields: HeaderFields) -> tuple[str, dict[str, Param]]:
    values = fields.get("content-disposition")
    if not values:
        return "", {}

    head, _, rest = values[0].decode("latin-1").partition(";")
    return head.strip().lower(), _params(rest)


def _transfer_encoding(fields: HeaderFields) -> str:
    values = fields.get("content-transfer-encoding")
    if not values:
        return ""
    return values[0].decode("latin-1").split(";", 1)[0].strip().strip("\"'").lower()


def _params(text: str) -> dict[str, Param]:
    """Parameters by lower-case name, RFC 2231 sections joined and unescaped.

    ``text`` is the header decoded as latin-1, so each character is one byte
    of the original and values keep their bytes for the charset to decode.
    """
    params: dict[str, Param] = {}
    sections: dict[str, dict[int, tuple[bool, str]]] = {}
    for match in _PARAM.finditer(";" + text):
        key = match.group(1).lower()
        value = match.group(2).strip()
        if value.startswith('"'):
            value = value[1:-1] if value.endswith('"') and len(value) > 1 else value[1:]
            if "\\" in value:
                value = _QUOTED_PAIR.sub(r"\1", value)

        name, star, rest = key.partition("*")
        extended = rest.endswith("*") or (bool(star) and not rest)
        number = rest.rstrip("*") or "0"
        if star and number.isdigit() and len(number) < 4:
            sections.setdefault(name, {}).setdefault(int(number), (extended, value))
        elif key not in params:
            params[key] = (value.encode("latin-1"), None)

    for name, parts in sections.items():
        charset = ""
        chunks = []
        for index in sorted(parts):
            extended, value = parts[index]
            if extended and index == min(parts) and value.count("'") >= 2:
                charset, _, value = value.split("'", 2)
            raw = value.encode("latin-1")
            chunks.append(unquote_to_bytes(raw) if extended else raw)
        params[name] = (b"".join(chunks), charset)
    return params


def _param_text(param: Param, defects: Defects) -> str:
    raw, charset = param
    if charset is not None:
        return decode_text(raw, charset, defects)
    return decode_words(header_text(raw), defects)


def _transfer_decode(body: bytes, encoding: str, defects: Defects) -> bytes:
    if encoding in _IDENTITY_ENCODINGS:
        return body
    if encoding == "base64":
        return _base64(body, defects)
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    if encoding in _UU_ENCODINGS:
        return _uudecode(body, defects)

    defects.add(f"unknown Content-Transfer-Encoding {_short(encoding)}, read as 8bit")
    return body


def _base64(data: bytes, defects: Defects) -> bytes:
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        defects.add("invalid base64; what could be read was decoded")

    cleaned = _NOT_BASE64.sub(b"", data)
    remainder = len(cleaned) % 4
    if remainder == 1:
        cleaned = cleaned[:-1]
    elif remainder:
        cleaned += b"=" * (4 - remainder)
    return binascii.a2b_base64(cleaned)


def _uudecode(data: bytes, defects: Defects) -> bytes:
    if not data.strip():
        return b""

    lines = iter(data.splitlines())
    for line in lines:
        if line.startswith(b"begin "):
            break
    else:
        defects.add("uuencoded part without a begin line, read as 8bit")
        return data

    out = bytearray()
    for line in lines:
        if line.strip() == b"end":
            break
        if not line:
            continue

        try:
            out += binascii.a2b_uu(line)
        except binascii.Error:
            # Some encoders pad lines with garbage; the length byte says how
            # much of the line is data.
            length = (((line[0] - 32) & 63) * 4 + 5) // 3
            try:
                out += binascii.a2b_uu(line[:length])
            except binascii.Error:
                defects.add("invalid uuencoded line skipped")
    return bytes(out)


@lru_cache(maxsize=512)
def _codec(charset: str) -> tuple[str, bool] | None:
    """Python's codec for a charset label, and whether it extends ASCII."""
    try:
        name = codecs.lookup(_CHARSET_ALIASES.get(charset, charset)).name
        if name.replace("-", "_") in _REFUSED_CODECS:
            return None
        decoded = [probe.decode(name, "replace") for probe in _ASCII_PROBES]
    except (LookupError, ValueError):
        # Unknown, not a text encoding (base64, zlib), or a name with NUL.
        return None
    return name, all(
        d == p.decode("ascii") for d, p in zip(decoded, _ASCII_PROBES, strict=True)
    )


def decode_text(data: bytes, charset: str, defects: Defects) -> str:
    """Bytes as text in the declared charset, never failing.

    Bytes that do not fit the charset become U+FFFD, an unknown charset is
    read as UTF-8 or else latin-1, and each of these leaves a defect.
    """
    label = charset.strip().strip("\"'").lower()
    if label in _ASCII_CHARSETS:
        if data.isascii():
            return data.decode("ascii")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            defects.add("8-bit text without a charset, decoded as windows-1252")
            return data.decode("cp1252", "replace")

    codec = _codec(label)
    if codec is None:
        try:
            text, used = data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, used = data.decode("latin-1"), "latin-1"
        defects.add(f"unknown charset {_short(label)}, decoded as {used}")
        return text

    name, ascii_compatible = codec
    if ascii_compatible and data.isascii():
        return data.decode("ascii")
    try:
        return _without_surrogates(data.decode(name))
    except UnicodeError:
        defects.add(f"bytes invalid in {_short(label)} replaced")
        return _without_surrogates(data.decode(name, "replace"))


def _without_surrogates(text: str) -> str:
    # UTF-7 and friends can decode to lone surrogates, which JSON and
    # PostgreSQL refuse.
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def header_text(value: bytes, charset: str = "") -> str:
    """Raw header bytes as text.

    ASCII or UTF-8 (RFC 6532) as they are; other 8-bit bytes are most often
    in the charset of the body, else windows-1252.
    """
    if value.isascii():
        return value.decode("ascii")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        pass

    if charset:
        try:
            return _without_surrogates(value.decode(charset))
        except UnicodeError:
            pass
    return value.decode("cp1252", "replace")


def decode_words(text: str, defects: Defects) -> str:
    """RFC 2047 encoded words decoded, adjacent words joined before decoding.

    Joining the bytes of neighbouring words in one charset first mends
    characters that a sender split across two words.
    """
    if "=?" not in text:
        return text

    out: list[str] = []
    pending = bytearray()
    pending_charset: str | None = None
    pos = 0
    for match in _ENCODED_WORD.finditer(text):
        gap = text[pos : match.start()]
        if gap and (pending_charset is None or not gap.isspace()):
            if pending_charset is not None:
                out.append(decode_text(bytes(pending), pending_charset, defects))
                pending_charset = None
            out.append(gap)

        charset = match.group(1).split("*", 1)[0]
        payload = match.group(3).encode("utf-8")
        if match.group(2) in "bB":
            decoded = _base64(payload, defects)
        else:
            decoded = binascii.a2b_qp(payload, header=True)

        if charset.lower() != pending_charset:
            if pending_charset is not None:
                out.append(decode_text(bytes(pending), pending_charset, defects))
            pending = bytearray()
            pending_charset = charset.lower()
        pending += decoded
        pos = match.end()

    if pending_charset is not None:
        out.append(decode_text(bytes(pending), pending_charset, defects))
    out.append(text[pos:])
    return "".join(out)


def single_line(text: str) -> str:
    """Control characters (CR, LF, NUL, tab...) as spaces, ends trimmed."""
    return _without_surrogates(_CONTROLS.sub(" ", text).strip())


class _HeaderReader:
    """Decodes the header fields the router uses, noting what is broken."""

    def __init__(self, fields: HeaderFields, defects: Defects, charset: str) -> None:
        self.fields = fields
        self.defects = defects
        codec = _codec(charset.strip().strip("\"'").lower())
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
            self.defects.add(f"unreadable Date header {_short(text)}")
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
            pairs.append((_QUOTED_PAIR.sub(r"\1", quoted), quoted_spec))
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


def safe_filename(name: str) -> str:
    """A file name without directories or control characters; '' when unusable.

    Path separators, control and format characters (bidi overrides that hide
    an extension among them) and characters Windows refuses are removed.
    """
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    if not name.isascii():
        name = "".join(
            ch for ch in name if unicodedata.category(ch) not in _UNSAFE_CATEGORIES
        )

    name = _UNSAFE_IN_FILENAME.sub("_", _CONTROLS.sub("", name)).strip().rstrip(".")
    if len(name) > 200:
        stem, dot, extension = name.rpartition(".")
        keep = dot and len(extension) < 10
        name = stem[:190] + dot + extension if keep else name[:200]

    return "" if name in ("", ".", "..") else name


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


def _short(text: str, limit: int = 40) -> str:
    text = single_line(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")
