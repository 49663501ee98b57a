"""Just enough of R's serialization format to read character vectors out of an R package's lazy-load database.

An installed R package keeps its datasets in ``data/Rdata.rdb``: a sequence of entries, each a 4-byte big-endian
uncompressed length followed by a zlib stream holding one serialized R object. We only need character vectors
(``STRSXP``), which is what janeaustenr stores its novels as (one element per line of text), so this is a reader
for that one case, not a general R deserializer:

    header   b"X\\n", int version, int writer R version, int minimum reader R version
             (version 3 only) int n, n bytes of the writer's native encoding name
    STRSXP   int flags (SEXPTYPE 16 in the low byte), int length (-1: a long vector, two more ints give it)
    CHARSXP  per element: int flags (SEXPTYPE 9 in the low byte, encoding bits in the "levels" above bit 12),
             int byte length (-1 = NA_character_), the bytes

All ints are big-endian (the XDR format ``X``); the ASCII (``A``) and native binary (``B``) formats are refused.
"""

import codecs
import struct
import zlib
from typing import Iterator

STRSXP = 16
CHARSXP = 9
# CHARSXP "levels" (flags >> 12) encoding bits, from R's Defn.h.
_BYTES_MASK, _LATIN1_MASK, _UTF8_MASK, _ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6


class RDataError(ValueError):
    """The bytes are not an R serialization this reader understands."""


def iter_rdb_entries(data: bytes) -> Iterator[bytes]:
    """The decompressed serializations in an ``Rdata.rdb`` file's bytes, in file order."""
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise RDataError(f"truncated entry header at byte {pos} of {len(data)}")
        (length,) = struct.unpack_from(">I", data, pos)
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(data[pos + 4:])
        except zlib.error as e:
            raise RDataError(f"entry at byte {pos} is not a zlib stream ({e}); is this an Rdata.rdb file?") from e
        if not inflater.eof or len(raw) != length:
            raise RDataError(f"entry at byte {pos}: {len(raw)} bytes inflated, header says {length}")
        pos = len(data) - len(inflater.unused_data)
        yield raw


class _Cursor:
    def __init__(self, raw: bytes):
        self.raw, self.pos = raw, 0

    def int(self) -> int:
        if self.pos + 4 > len(self.raw):
            raise RDataError(f"serialization ends at byte {len(self.raw)}, expected an int at {self.pos}")
        (value,) = struct.unpack_from(">i", self.raw, self.pos)
        self.pos += 4
        return value

    def bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.raw):
            raise RDataError(f"serialization ends at byte {len(self.raw)}, expected {n} bytes at {self.pos}")
        out = self.raw[self.pos:self.pos + n]
        self.pos += n
        return out


def read_strsxp(raw: bytes) -> list[str | None] | None:
    """One serialized R object -> its elements if it is a character vector, else None (other objects are skipped).

    Elements are ``str`` (decoded per element: UTF-8, or Latin-1 where R marked it so; unmarked strings use the
    writer's native encoding, assumed UTF-8) or None for ``NA_character_``. Attributes after the elements (names,
    ...) are ignored.
    """
    if raw[:2] != b"X\n":
        raise RDataError(f"not an XDR R serialization (starts {raw[:2]!r}, expected b'X\\n')")
    cur = _Cursor(raw)
    cur.pos = 2
    version = cur.int()
    cur.int(), cur.int()  # the writer's R version and the minimum reader version: not needed
    native = "utf-8"  # version 2 does not record the writer's encoding; R packages built today are UTF-8
    if version == 3:
        native = cur.bytes(cur.int()).decode("ascii", errors="replace") or "utf-8"
        try:
            codecs.lookup(native)
        except LookupError as e:
            raise RDataError(f"the writer's native encoding {native!r} is unknown to Python") from e
    elif version != 2:
        raise RDataError(f"R serialization version {version} (this reader knows 2 and 3)")
    flags = cur.int()
    if flags & 0xFF != STRSXP:
        return None
    length = cur.int()
    if length == -1:  # a long vector (> 2^31 - 1 elements): the length follows as two ints
        upper, lower = cur.int(), cur.int()
        length = (upper << 32) | (lower & 0xFFFFFFFF)
    elements: list[str | None] = []
    for i in range(length):
        element_flags = cur.int()
        if element_flags & 0xFF != CHARSXP:
            raise RDataError(f"element {i} has SEXPTYPE {element_flags & 0xFF}, expected CHARSXP ({CHARSXP})")
        n = cur.int()
        if n == -1:
            elements.append(None)
            continue
        data = cur.bytes(n)
        levels = element_flags >> 12
        if levels & _LATIN1_MASK:
            elements.append(data.decode("latin-1"))
        elif levels & (_UTF8_MASK | _ASCII_MASK):
            elements.append(data.decode("utf-8"))
        elif levels & _BYTES_MASK:
            raise RDataError(f"element {i} is a 'bytes' string with no text encoding")
        else:
            elements.append(data.decode(native))
    return elements


def write_lines_text(elements: list[str | None]) -> str:
    """What R's ``writeLines(x)`` writes for a character vector: each element then a newline, NA as ``"NA"``."""
    return "".join(("NA" if e is None else e) + "\n" for e in elements)
