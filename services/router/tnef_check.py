"""Whether bytes are a TNEF stream that tnefparse can be trusted to read.

tnefparse trusts every count it reads. A MAPI block that claims four billion
properties with nothing behind them keeps it looping for hours, a
multi-valued property can make it build billions of values, and it copies
the rest of the stream for each record it reads, so a stream of many small
records followed by a large one costs gigabytes of copying. This walk reads
only the framing (MS-OXTNEF records and MAPI property blocks), checks every
length, count and checksum against the bytes that are there, and bounds the
work tnefparse will do. It reads no values except embedded messages, which
tnefparse unpacks too and are walked the same way, and the strings of
recipient rows: tnefparse reads those rows one after another, so a string it
cannot decode leaves it reading the next row from the wrong place, where any
count may turn up.
"""

from __future__ import annotations

import struct

from tnefparse.codepage import Codepage

SIGNATURE = 0x223E9F78
MAX_RECORDS = 4096
MAX_NESTING = 3
# Bytes tnefparse may copy while reading one stream: about a second of work.
MAX_COPIED = 2 << 30

_LEVELS = (1, 2)
_ATT_MAPI_PROPS = 0x9003
_ATT_RECIP_TABLE = 0x9004
_ATT_ATTACHMENT = 0x9005
_ATT_OEM_CODEPAGE = 0x9007
_PID_ATTACH_DATA = 0x3701
_EMBEDDED = b"\x07\x03\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46"

_MULTI_VALUED = 0x1000
_NAMED = 0x8000
_FIXED_SIZES = {
    0x0002: 2,  # short
    0x000B: 2,  # boolean
    0x0003: 4,  # long
    0x0004: 4,  # float
    0x000A: 4,  # error
    0x0005: 8,  # double
    0x0006: 8,  # currency
    0x0007: 8,  # application time
    0x0014: 8,  # 64-bit integer
    0x0040: 8,  # system time
    0x0048: 16,  # GUID
}
_VARIABLE = frozenset({0x0000, 0x000D, 0x001E, 0x001F, 0x0102})
_STRING = 0x001E
_UNICODE = 0x001F

_U32 = struct.Struct("<I")
_RECORD = struct.Struct("<BHHI")


class BadTnef(Exception):
    """Raised by the walk to say what is wrong; check() returns the text."""


def check(data: bytes) -> str | None:
    """None when tnefparse may read ``data``, otherwise what is wrong with it."""
    try:
        _Walk().stream(data, 0, len(data), 0)
    except BadTnef as exc:
        return str(exc)
    return None


class _Walk:
    def __init__(self) -> None:
        self.records = 0
        self.copied = 0

    def stream(self, data: bytes, start: int, end: int, depth: int) -> None:
        if end - start < 6 or _U32.unpack_from(data, start)[0] != SIGNATURE:
            raise BadTnef("no TNEF signature")

        # The code page tnefparse reads 8-bit strings in, once a record set it.
        codepage: str | None = None
        pos = start + 6
        while pos < end:
            self.records += 1
            self.copied += end - pos
            if self.records > MAX_RECORDS:
                raise BadTnef(f"more than {MAX_RECORDS} attributes")
            if self.copied > MAX_COPIED:
                raise BadTnef("too many attributes before large ones")
            if end - pos < _RECORD.size + 2:
                raise BadTnef(f"truncated at byte {pos - start}")

            level, name, _kind, length = _RECORD.unpack_from(data, pos)
            data_start = pos + _RECORD.size
            data_end = data_start + length
            if data_end + 2 > end:
                raise BadTnef(
                    f"truncated: attribute {name:#06x} at byte {pos - start} "
                    f"needs {length} bytes, {max(end - data_start - 2, 0)} are left"
                )
            if level not in _LEVELS:
                raise BadTnef(f"attribute {name:#06x} has level {level}")

            stored = int.from_bytes(data[data_end : data_end + 2], "little")
            if sum(data[data_start:data_end]) & 0xFFFF != stored:
                raise BadTnef(f"checksum of attribute {name:#06x} does not match")

            if (level == 2 and name == _ATT_ATTACHMENT) or (
                level == 1 and name == _ATT_MAPI_PROPS
            ):
                self.properties(data, data_start, data_end, depth)
            elif level == 1 and name == _ATT_RECIP_TABLE:
                rows = self.count(data, data_start, data_end, 4, "recipient rows")
                row = data_start + 4
                for _ in range(rows):
                    row = self.properties(data, row, data_end, depth, codepage or "")
            elif level == 1 and name == _ATT_OEM_CODEPAGE and length >= 4:
                number = _U32.unpack_from(data, data_start)[0]
                codepage = Codepage(number).codepage()
            pos = data_end + 2

    def properties(
        self,
        data: bytes,
        pos: int,
        end: int,
        depth: int,
        strings: str | None = None,
    ) -> int:
        """Walk one MAPI property block; return where it ends.

        With ``strings`` (recipient rows), names and strings must also decode
        as tnefparse decodes them: UTF-16, and 8-bit strings in that code page
        ('' when the stream has set none yet).
        """
        count = self.count(data, pos, end, 8, "MAPI properties")
        pos += 4
        for _ in range(count):
            kind, pid = struct.unpack_from("<HH", data, self.need(pos, 4, end))
            pos += 4
            if pid >= _NAMED:
                named_kind = _U32.unpack_from(data, self.need(pos + 16, 4, end))[0]
                pos += 20
                if named_kind == 0:
                    pos = self.need(pos, 4, end) + 4
                else:
                    size = _padded(_U32.unpack_from(data, self.need(pos, 4, end))[0])
                    start = self.need(pos + 4, size, end)
                    if strings is not None:
                        _decode(data[start : start + size], "utf-16")
                    pos = start + size

            # As tnefparse reads it: a multi-valued property with no values
            # is read as one value with a count of its own.
            values = 0
            if kind & _MULTI_VALUED:
                kind &= ~_MULTI_VALUED
                values = self.count(data, pos, end, 2, "values")
                pos += 4

            for _ in range(values or 1):
                if kind in _FIXED_SIZES:
                    pos = self.need(pos, _FIXED_SIZES[kind], end) + _FIXED_SIZES[kind]
                elif kind in _VARIABLE:
                    pos = self.variable(
                        data, pos, end, kind, pid, values, depth, strings
                    )
                else:
                    raise BadTnef(f"unknown MAPI type {kind:#06x}")

            if (values or 1) % 2 and kind in (0x0002, 0x000B):
                pos += 2
        return pos

    def variable(
        self,
        data: bytes,
        pos: int,
        end: int,
        kind: int,
        pid: int,
        multi: int,
        depth: int,
        strings: str | None,
    ) -> int:
        """Walk a value of a variable-length type: one item, or a counted list."""
        items = 1
        if not multi:
            items = self.count(data, pos, end, 4, "MAPI values")
            pos += 4

        for _ in range(items):
            size = _U32.unpack_from(data, self.need(pos, 4, end))[0]
            start = pos + 4
            pos = self.need(start, _padded(size), end) + _padded(size)
            if strings is not None and kind == _UNICODE:
                _decode(data[start:pos], "utf-16")
            elif strings is not None and kind == _STRING:
                _decode(data[start:pos], strings)

            if pid == _PID_ATTACH_DATA and data.startswith(_EMBEDDED, start, pos):
                if depth >= MAX_NESTING:
                    raise BadTnef(f"messages embedded more than {MAX_NESTING} deep")
                self.stream(data, start + len(_EMBEDDED), start + size, depth + 1)
        return pos

    def count(self, data: bytes, pos: int, end: int, each: int, what: str) -> int:
        """A count at ``pos``, refused when its items cannot fit before ``end``."""
        value = int(_U32.unpack_from(data, self.need(pos, 4, end))[0])
        if value > (end - pos - 4) // each:
            raise BadTnef(f"{value} {what} claimed in {end - pos - 4} bytes")
        return value

    @staticmethod
    def need(pos: int, size: int, end: int) -> int:
        if pos + size > end:
            raise BadTnef("a MAPI property block ends early")
        return pos


def _padded(size: int) -> int:
    return size + (-size % 4)


def _decode(value: bytes, codec: str) -> None:
    if not codec:
        raise BadTnef("an 8-bit string in a recipient row before any code page")
    try:
        value.decode(codec)
    except (LookupError, UnicodeDecodeError) as exc:
        raise BadTnef(f"a recipient row string is not {codec}") from exc
