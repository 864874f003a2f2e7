"""The structure of a message: its header block and its tree of MIME parts.

Built for throughput and for broken mail. The header block is split by hand
into raw field values, and the MIME tree is walked over byte offsets: the
first plain text and HTML parts become the bodies, and every other part is
listed as an attachment, decoded only to count and hash it. Broken structure
(missing boundaries, runaway nesting, stray lines) is noted as a defect and
read as sensibly as it can be.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from functools import lru_cache
from types import MappingProxyType

from services.router import tnef
from services.router.decoding import (
    Defects,
    Param,
    decode_text,
    excerpt,
    param_text,
    parameters,
    transfer_decode,
    transfer_digest,
)
from services.router.filenames import attachment_name
from shared.models import AttachmentInfo

MAX_DEPTH = 20
MAX_PARTS = 500

HeaderFields = dict[str, list[bytes]]
# Part of a message as the whole message and offsets into it, so that a part
# of many megabytes is never copied to be walked.
Span = tuple[bytes, int, int]
Params = Mapping[str, Param]

_NO_PARAMS: Params = MappingProxyType({})
# Longest header value whose reading is cached; longer ones are read each time
# so that hostile mail cannot fill the cache with megabytes.
_CACHED_MAX = 512

_HEADER_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
# The line that ends a header block: empty but for carriage returns. Lines
# are split on LF alone, so a lone CR does not end one.
_LEADING_BLANK = re.compile(rb"\r*(?:\n|\Z)")
_BLANK_LINE = re.compile(rb"\n\r*(?:\n|\Z)")
_MIME_TYPE = re.compile(r"[a-z0-9!#$&.+^_`{}~-]+/[a-z0-9!#$&.+^_`{}~-]+")


def header_fields(
    data: bytes, defects: Defects, *, top: bool, start: int = 0, end: int = -1
) -> tuple[HeaderFields, int]:
    """Unfolded raw values by lower-case field name, and where the body starts.

    Reads ``data[start:end]`` (to the end when ``end`` is -1) without copying
    it: the empty line is found first, and only the header block is split.
    """
    size = len(data) if end < 0 else end
    if start >= size:
        return {}, size

    leading = _LEADING_BLANK.match(data, start, size)
    if leading:
        return {}, leading.end()

    blank = _BLANK_LINE.search(data, start, size)
    block_end = blank.start() + 1 if blank else size
    body_start = blank.end() if blank else size
    lines = data[start:block_end].split(b"\n")
    if blank:
        lines.pop()

    found: list[tuple[str, list[bytes]]] = []
    current: list[bytes] | None = None
    pos = start
    for raw_line in lines:
        following = pos + len(raw_line) + 1
        line = raw_line.rstrip(b"\r")
        if line[0] in b" \t":
            if current is not None:
                current.append(line)
            else:
                defects.add("FirstHeaderLineIsContinuationDefect")
        elif match := _HEADER_NAME.match(line):
            current = [line[match.end() :]]
            found.append((match.group(1).decode("ascii").lower(), current))
        elif top and pos == start and line.startswith(b"From "):
            pass
        elif (
            top and not line.startswith(b"--") and _fields_follow(data, following, size)
        ):
            defects.add("line without a field name in the header skipped")
        else:
            defects.add("MissingHeaderBodySeparatorDefect")
            body_start = pos
            break

        pos = following

    fields: HeaderFields = {}
    for name, parts in found:
        fields.setdefault(name, []).append(b"".join(parts).strip())
    return fields, body_start


def _fields_follow(data: bytes, pos: int, end: int) -> bool:
    """Whether only header fields follow, up to an empty line.

    Tells a stray line inside the header (skipped) from the first line of a
    body that a sender started without the empty line.
    """
    seen = False
    for _ in range(100):
        eol = data.find(b"\n", pos, end)
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


class Walker:
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
        # Files unpacked from TNEF parts, by their index in ``attachments``:
        # their bytes are not a MIME part a consumer could read from raw.
        self.unpacked: dict[int, bytes] = {}
        # Bodies found inside a TNEF part, for a message without one of its own.
        self.tnef_text: str | None = None
        self.tnef_html: str | None = None

    def entity(
        self, fields: HeaderFields, body: Span, depth: int, default_type: str
    ) -> None:
        if not self._count_part():
            return

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
        params: Params,
        body: Span,
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

        split = _split_multipart(*body, boundary, MAX_PARTS + 1 - self.parts)
        if split is None:
            self.defects.add("StartBoundaryNotFoundDefect")
            self.leaf(fields, "text/plain", params, body)
            return

        parts, closed = split
        if not closed:
            self.defects.add("CloseBoundaryNotFoundDefect")

        child_type = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        data = body[0]
        for start, end in parts:
            child_fields, body_start = header_fields(
                data, self.defects, top=False, start=start, end=end
            )
            child = (data, body_start, end)
            self.entity(child_fields, child, depth + 1, child_type)
            if self.stopped:
                return

    def leaf(
        self, fields: HeaderFields, ctype: str, params: Params, body: Span
    ) -> None:
        disposition, disposition_params = _disposition(fields)
        name = disposition_params.get("filename") or params.get("name")
        filename = param_text(name, self.defects) if name else ""
        encoding = _transfer_encoding(fields)
        if tnef.is_tnef(ctype, filename) and self._unpacked(body, encoding, filename):
            return

        is_text = ctype == "text/plain" or ctype == "text/html"
        if is_text and disposition != "attachment" and not filename:
            data, start, end = body
            text = data[start:end]
            if not text.strip():
                return

            if ctype == "text/plain" and self.text_body is None:
                self.text_body = self._text(text, encoding, params)
                return

            if ctype == "text/html" and self.html_body is None:
                self.html_body = self._text(text, encoding, params)
                return

        size, sha256 = transfer_digest(*body, encoding, self.defects)
        self._list(filename, ctype, size, sha256)

    def _count_part(self) -> bool:
        """Count one more part; False, and the walk stops, past MAX_PARTS."""
        if self.parts >= MAX_PARTS:
            self.defects.add(f"more than {MAX_PARTS} MIME parts; the rest is unread")
            self.stopped = True
            return False

        self.parts += 1
        return True

    def _list(self, filename: str, ctype: str, size: int, sha256: str) -> None:
        number = len(self.attachments) + 1
        self.attachments.append(
            AttachmentInfo(
                filename=attachment_name(filename, ctype, number),
                content_type=ctype,
                size=size,
                sha256=sha256,
                withheld=size > self.attachment_limit,
            )
        )

    def _unpacked(self, body: Span, encoding: str, filename: str) -> bool:
        """List a TNEF part's files in its place; False when it cannot be read."""
        data, start, end = body
        contents = tnef.unpack(
            transfer_decode(data[start:end], encoding, self.defects), self.defects
        )
        if isinstance(contents, tnef.Unreadable):
            self.defects.add(
                f"TNEF part {excerpt(filename or tnef.TNEF_NAME)} could not be "
                f"unpacked ({contents.reason}); kept as it is"
            )
            return False

        for item in contents.files:
            if not self._count_part():
                return True
            digest = hashlib.sha256(item.data).hexdigest()
            self._list(item.name, item.content_type, len(item.data), digest)
            if not self.attachments[-1].withheld:
                self.unpacked[len(self.attachments) - 1] = item.data

        self.tnef_text = self.tnef_text or contents.text_body
        self.tnef_html = self.tnef_html or contents.html_body
        return True

    def _text(self, body: bytes, encoding: str, params: Params) -> str:
        data = transfer_decode(body, encoding, self.defects)
        charset = params.get("charset", (b"", None))[0].decode("latin-1")
        self.body_charset = self.body_charset or charset
        text = decode_text(data, charset, self.defects)

        if "\r" in text:
            text = text.replace("\r\n", "\n")
        if "\x00" in text:
            text = text.replace("\x00", "\ufffd")
        return text


def _split_multipart(
    body: bytes, first: int, size: int, boundary: bytes, limit: int
) -> tuple[list[tuple[int, int]], bool] | None:
    """Up to ``limit`` parts of ``body[first:size]`` between delimiter lines.

    Each part is given as offsets into ``body``, with whether a close came.
    None when no opening delimiter line is found. A delimiter must start a
    line and be followed by nothing but white space, so a boundary that is
    the prefix of a nested one does not split the nested part.
    """
    delimiter = b"--" + boundary
    parts: list[tuple[int, int]] = []
    start = -1
    pos = first
    while len(parts) < limit:
        found = body.find(delimiter, pos, size)
        if found < 0:
            break

        pos = found + 1
        if found > first and body[found - 1] != 0x0A:
            continue

        end = found + len(delimiter)
        closing = body.startswith(b"--", end, size)
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
            parts.append((start, stop))

        if closing and start >= 0:
            return parts, True
        if closing:
            continue

        if body.startswith(b"\r\n", end, size):
            end += 2
        elif end < size:
            end += 1
        start = pos = end

    if start < 0:
        return None
    if len(parts) >= limit:
        return parts, True
    parts.append((start, size))
    return parts, False


def _content_type(
    fields: HeaderFields, default: str, defects: Defects
) -> tuple[str, Params]:
    values = fields.get("content-type")
    if not values:
        return default, _NO_PARAMS

    if len(values) > 1:
        defects.add(f"{len(values)} Content-Type headers; the first is used")

    value = values[0]
    read = _read_content_type if len(value) > _CACHED_MAX else _cached_content_type
    ctype, params, found = read(value, default)
    for defect in found:
        defects.add(defect)
    return ctype, params


def _read_content_type(
    value: bytes, default: str
) -> tuple[str, Params, tuple[str, ...]]:
    """Type, parameters and defects of one Content-Type value."""
    found = []
    head, _, rest = value.decode("latin-1").partition(";")
    ctype = head.strip().lower()
    if "=" in ctype and len(words := ctype.split(None, 1)) == 2:
        found.append("Content-Type parameters without ';'")
        ctype = words[0]
        rest = head.strip().split(None, 1)[1] + ";" + rest

    params = parameters(rest)
    if not _MIME_TYPE.fullmatch(ctype):
        found.append(f"invalid Content-Type {excerpt(ctype)}, read as {default}")
        return default, params, tuple(found)
    return ctype, params, tuple(found)


def _disposition(fields: HeaderFields) -> tuple[str, Params]:
    values = fields.get("content-disposition")
    if not values:
        return "", _NO_PARAMS

    value = values[0]
    read = _read_disposition if len(value) > _CACHED_MAX else _cached_disposition
    return read(value)


def _read_disposition(value: bytes) -> tuple[str, Params]:
    head, _, rest = value.decode("latin-1").partition(";")
    return head.strip().lower(), parameters(rest)


# Most parts of most mail carry one of a few dozen Content-Type and
# Content-Disposition values, so each short one is read once. The parameters
# handed out are shared and must not be changed.
_cached_content_type = lru_cache(maxsize=1024)(_read_content_type)
_cached_disposition = lru_cache(maxsize=1024)(_read_disposition)


def _transfer_encoding(fields: HeaderFields) -> str:
    values = fields.get("content-transfer-encoding")
    if not values:
        return ""
    return values[0].decode("latin-1").split(";", 1)[0].strip().strip("\"'").lower()
