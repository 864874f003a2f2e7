"""Bytes of a message read as text, whatever they claim to be.

Charsets, transfer encodings (base64, quoted-printable, uuencode), RFC 2047
encoded words in header fields and RFC 2231 parameters. Nothing here fails on
bad input: what cannot be decoded is read as well as it can be, and what was
wrong is noted in the message's Defects.
"""

from __future__ import annotations

import binascii
import codecs
import hashlib
import re
from functools import lru_cache
from urllib.parse import unquote_to_bytes

MAX_DEFECTS = 50

# A parameter's bytes, and its RFC 2231 charset (None when it was not encoded).
Param = tuple[bytes, str | None]

_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]+")
_PARAM = re.compile(r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)')
_QUOTED_PAIR = re.compile(r"\\(.)")

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
# Encoded bytes decoded at a time when an attachment is only counted and
# hashed: large enough that the per-chunk overhead vanishes.
_DIGEST_CHUNK = 1 << 20


class Defects:
    """Defect names in the order found, each once, and no more than a screenful."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, text: str) -> None:
        if len(self.items) < MAX_DEFECTS and text not in self.items:
            self.items.append(text)


@lru_cache(maxsize=512)
def charset_codec(charset: str) -> tuple[str, bool] | None:
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

    codec = charset_codec(label)
    if codec is None:
        try:
            text, used = data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, used = data.decode("latin-1"), "latin-1"
        defects.add(f"unknown charset {excerpt(label)}, decoded as {used}")
        return text

    name, ascii_compatible = codec
    if ascii_compatible and data.isascii():
        return data.decode("ascii")
    try:
        return _without_surrogates(data.decode(name))
    except UnicodeError:
        defects.add(f"bytes invalid in {excerpt(label)} replaced")
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


def excerpt(text: str, limit: int = 40) -> str:
    """The start of a text, quoted, for naming a bad value in a defect."""
    text = single_line(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def transfer_decode(body: bytes, encoding: str, defects: Defects) -> bytes:
    """A body's bytes with its Content-Transfer-Encoding undone."""
    if encoding in _IDENTITY_ENCODINGS:
        return body
    if encoding == "base64":
        return _base64(body, defects)
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    if encoding in _UU_ENCODINGS:
        return _uudecode(body, defects)

    defects.add(f"unknown Content-Transfer-Encoding {excerpt(encoding)}, read as 8bit")
    return body


def transfer_digest(
    data: bytes, start: int, end: int, encoding: str, defects: Defects
) -> tuple[int, str]:
    """Size and SHA-256 of ``data[start:end]`` with its transfer encoding undone.

    An attachment is only counted and hashed, so base64 is decoded a chunk at
    a time and a part of many megabytes is never held whole, decoded or not.
    """
    if encoding in _IDENTITY_ENCODINGS:
        view = memoryview(data)[start:end]
        return len(view), hashlib.sha256(view).hexdigest()

    if encoding == "base64":
        digest = _base64_digest(data, start, end)
        if digest is not None:
            return digest

    decoded = transfer_decode(data[start:end], encoding, defects)
    return len(decoded), hashlib.sha256(decoded).hexdigest()


def _base64_digest(data: bytes, start: int, end: int) -> tuple[int, str] | None:
    """Size and SHA-256 of well-formed base64, decoded chunk by chunk.

    Chunks end at line ends. A chunk that decodes without error and holds no
    padding ends on a whole quantum, so decoding the chunks one by one gives
    what decoding the whole would. None when that cannot be shown (padding
    before the last chunk, a chunk that does not decode): the caller then
    decodes the whole, noting what is wrong.
    """
    hasher = hashlib.sha256()
    size = 0
    view = memoryview(data)
    pos = start
    while pos < end:
        stop = data.find(b"\n", pos + _DIGEST_CHUNK, end) + 1
        if stop <= 0:
            stop = end
        elif data.find(b"=", pos, stop) >= 0:
            return None

        try:
            decoded = binascii.a2b_base64(view[pos:stop])
        except binascii.Error:
            return None
        hasher.update(decoded)
        size += len(decoded)
        pos = stop
    return size, hasher.hexdigest()


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


def parameters(text: str) -> dict[str, Param]:
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
            value = unquote(value)

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


def param_text(param: Param, defects: Defects) -> str:
    """A parameter value as text, from its RFC 2231 charset or encoded words."""
    raw, charset = param
    if charset is not None:
        return decode_text(raw, charset, defects)
    return decode_words(header_text(raw), defects)


def unquote(text: str) -> str:
    """The inside of a quoted string with its backslash escapes undone."""
    if "\\" not in text:
        return text
    return _QUOTED_PAIR.sub(r"\1", text)
