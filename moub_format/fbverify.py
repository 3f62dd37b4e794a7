"""A bounded verifier for the .moub FlatBuffer index.

FlatBuffers' Python library reads whatever offsets a buffer holds: a hostile
file can point anywhere, ask for a 4-billion-element vector or loop a table
into itself. This module walks the index once, against a description of
schema/moub.fbs, and checks every root offset, soffset, vtable, field offset,
vector and string against the buffer (in Python ints), reading each field's
value as it goes. It is the one bounded read primitive: the reader uses the
values :func:`verify_tree` returns (no generated accessor runs on hostile
bytes), and after :func:`verify` passes every accessor of the generated code
would read in range too.

The index is a tree: no table is reached twice, and no two vectors or strings
share a byte. FlatBuffers allows many fields to point at one vector, and a
reader that copies per field would then materialise one stored vector once per
reference (4096 codebooks naming one 4 MB vector: 16 GB). Each table visited is
charged to the file's memory budget as it is read, since the walk itself
creates an object per table.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .budget import MemoryBudget
from .constants import FILE_IDENTIFIER, PREAMBLE_SIZE, ReaderLimits
from .errors import StructureError, TruncatedFileError, VersionError

# Field kinds
SCALAR = "scalar"
STRING = "string"
VECTOR = "vector"          # vector of scalars
TABLE_VECTOR = "tables"    # vector of tables
TABLE = "table"


@dataclass(frozen=True)
class Field:
    name: str
    kind: str
    size: int = 0            # scalar or vector element size
    table: str = ""          # for TABLE / TABLE_VECTOR
    required: bool = False
    fmt: str = ""            # struct format of a scalar, numpy dtype of a vector's elements


# Mirror of schema/moub.fbs: field order = vtable slot order. test_schema checks
# this against the schema; the verifier reads every value through it.
SCHEMA: dict[str, tuple[Field, ...]] = {
    "Checksum": (
        Field("algorithm", SCALAR, 1, fmt="<B"),
        Field("digest", VECTOR, 1, fmt="u1"),
    ),
    "Blob": (
        Field("offset", SCALAR, 8, fmt="<Q"),
        Field("length", SCALAR, 8, fmt="<Q"),
        Field("codec", SCALAR, 1, fmt="<B"),
        Field("decoded_length", SCALAR, 8, fmt="<Q"),
        Field("checksum", TABLE, table="Checksum"),
    ),
    "Codebook": (
        Field("values", VECTOR, 4, fmt="<f4"),
        Field("first", SCALAR, 8, fmt="<q"),
        Field("count", SCALAR, 4, fmt="<I"),
    ),
    "HuffmanTable": (
        Field("code_lengths", VECTOR, 1, fmt="u1"),
        Field("packed_lengths", VECTOR, 1, fmt="u1"),
        Field("count", SCALAR, 4, fmt="<I"),
    ),
    "Tensor": (
        Field("path", STRING, required=True),
        Field("name", STRING),
        Field("dtype", SCALAR, 4, fmt="<i"),
        Field("dims", VECTOR, 8, fmt="<i8"),
        Field("encoding", SCALAR, 1, fmt="<B"),
        Field("data", TABLE, table="Blob"),
        Field("codebook", SCALAR, 4, fmt="<I"),
        Field("table", SCALAR, 4, fmt="<I"),
        Field("chunk_elements", SCALAR, 4, fmt="<I"),
        Field("chunk_bits", VECTOR, 8, fmt="<u8"),
    ),
    "Pack": (
        Field("sites", VECTOR, 4, fmt="<u4"),
        Field("counts", VECTOR, 8, fmt="<u8"),
        Field("scales", VECTOR, 4, fmt="<f4"),
        Field("codebook", SCALAR, 4, fmt="<I"),
        Field("table", SCALAR, 4, fmt="<I"),
        Field("chunk_elements", SCALAR, 4, fmt="<I"),
        Field("chunk_bits", VECTOR, 8, fmt="<u8"),
        Field("data", TABLE, table="Blob"),
        Field("offsets", VECTOR, 8, fmt="<i8"),
        Field("counts32", VECTOR, 4, fmt="<u4"),
        Field("chunk_bits32", VECTOR, 4, fmt="<u4"),
        Field("offsets32", VECTOR, 4, fmt="<i4"),
    ),
    "MetadataEntry": (
        Field("key", STRING, required=True),
        Field("value", STRING, required=True),
    ),
    "Model": (
        Field("format_major", SCALAR, 2, fmt="<H"),
        Field("format_minor", SCALAR, 2, fmt="<H"),
        Field("required_features", SCALAR, 8, fmt="<Q"),
        Field("producer", STRING),
        Field("alignment", SCALAR, 4, fmt="<I"),
        Field("payload_offset", SCALAR, 8, fmt="<Q"),
        Field("graph", TABLE, table="Blob"),
        Field("codebooks", TABLE_VECTOR, table="Codebook"),
        Field("tables", TABLE_VECTOR, table="HuffmanTable"),
        Field("tensors", TABLE_VECTOR, table="Tensor"),
        Field("metadata", TABLE_VECTOR, table="MetadataEntry"),
        Field("payload_digest", TABLE, table="Checksum"),
        Field("index_digest", TABLE, table="Checksum"),
        Field("packs", TABLE_VECTOR, table="Pack"),
    ),
}
ROOT_TABLE = "Model"

# What one table of the index costs once read: its field dict, the NumPy views of its vectors
# and what the reader builds from it (about 750 bytes measured per table, with margin).
INDEX_TABLE_BYTES = 1024

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")


class _Verifier:
    def __init__(self, buf: memoryview, limits: ReaderLimits, filename: str, budget: MemoryBudget | None = None) -> None:
        self.buf = buf
        self.size = len(buf)
        self.limits = limits
        self.filename = filename
        self.budget = budget
        self.tables_seen: set[int] = set()
        self.ranges: list[tuple[int, int, str]] = []  # [start, end) of every vector and string, and its field
        self.end = PREAMBLE_SIZE  # highest byte used by the index, exclusive

    def fail(self, where: str, message: str) -> StructureError:
        return StructureError(f"{self.filename}: index {where}: {message}")

    def need(self, pos: int, length: int, where: str) -> None:
        if pos < 0 or length < 0 or pos + length > self.size:
            raise self.fail(where, f"range [{pos}, {pos + length}) lies outside the {self.size}-byte index")
        self.end = max(self.end, pos + length)

    def u16(self, pos: int, where: str) -> int:
        self.need(pos, 2, where)
        return _U16.unpack_from(self.buf, pos)[0]

    def u32(self, pos: int, where: str) -> int:
        self.need(pos, 4, where)
        return _U32.unpack_from(self.buf, pos)[0]

    def i32(self, pos: int, where: str) -> int:
        self.need(pos, 4, where)
        return _I32.unpack_from(self.buf, pos)[0]

    def follow(self, pos: int, where: str) -> int:
        """Resolve a uoffset stored at pos (unsigned, forward only)."""
        return pos + self.u32(pos, where)

    def table(self, pos: int, name: str, depth: int, where: str) -> dict:
        """Verify the table at ``pos`` and return its fields: scalars (defaults when
        absent), strings (str), vectors (NumPy views of the buffer, with their
        element position under ``NAME@``), tables (dicts) and table vectors (lists);
        absent non-scalars are None."""
        if depth > self.limits.max_flatbuffer_depth:
            raise self.fail(where, f"nesting depth {depth} exceeds the limit {self.limits.max_flatbuffer_depth}")
        if pos in self.tables_seen:
            raise self.fail(where, f"table at {pos} is shared or cyclic; the schema is a tree")
        self.tables_seen.add(pos)
        if len(self.tables_seen) > self.limits.max_flatbuffer_tables:
            raise self.fail(where, f"more than {self.limits.max_flatbuffer_tables} tables")
        if self.budget is not None:
            self.budget.charge(INDEX_TABLE_BYTES, f"index table {where}")
        vtable = pos - self.i32(pos, where + " soffset")
        vtable_len = self.u16(vtable, where + " vtable")
        table_len = self.u16(vtable + 2, where + " vtable")
        if vtable_len < 4 or vtable_len % 2:
            raise self.fail(where, f"vtable length {vtable_len} is not an even number >= 4")
        if table_len < 4:
            raise self.fail(where, f"table length {table_len} is below 4")
        self.need(vtable, vtable_len, where + " vtable")
        self.need(pos, table_len, where + " table")
        fields = SCHEMA[name]
        out: dict = {}
        for slot, field in enumerate(fields):
            entry = 4 + 2 * slot
            voffset = _U16.unpack_from(self.buf, vtable + entry)[0] if entry < vtable_len else 0
            fwhere = f"{where}.{field.name}"
            if voffset == 0:
                if field.required:
                    raise self.fail(fwhere, "required field is missing")
                out[field.name] = 0 if field.kind == SCALAR else None
                continue
            width = field.size if field.kind == SCALAR else 4
            if voffset < 4 or voffset + width > table_len:
                raise self.fail(fwhere, f"field offset {voffset} (+{width}) lies outside the {table_len}-byte table")
            field_pos = pos + voffset
            if field.kind == SCALAR:
                out[field.name] = struct.unpack_from(field.fmt, self.buf, field_pos)[0]
                continue
            target = self.follow(field_pos, fwhere)
            if field.kind == STRING:
                out[field.name] = self.string(target, fwhere)
            elif field.kind == VECTOR:
                count = self.vector(target, field.size, fwhere)
                out[field.name] = np.frombuffer(self.buf, dtype=field.fmt, count=count, offset=target + 4)
                out[field.name + "@"] = target + 4
            elif field.kind == TABLE:
                out[field.name] = self.table(target, field.table, depth + 1, fwhere)
            elif field.kind == TABLE_VECTOR:
                count = self.vector(target, 4, fwhere)
                out[field.name] = [
                    self.table(self.follow(target + 4 + 4 * i, f"{fwhere}[{i}]"), field.table, depth + 1, f"{fwhere}[{i}]")
                    for i in range(count)
                ]
        return out

    def vector(self, pos: int, elem_size: int, where: str, terminator: int = 0) -> int:
        count = self.u32(pos, where + " length")
        remaining = self.size - (pos + 4)
        if count * elem_size > remaining:
            raise self.fail(where, f"vector of {count} x {elem_size} bytes exceeds the {remaining} bytes remaining")
        self.need(pos + 4, count * elem_size, where)
        self.ranges.append((pos, pos + 4 + count * elem_size + terminator, where))
        return count

    def check_disjoint(self) -> None:
        """No two vectors or strings share a byte (each belongs to one field)."""
        self.ranges.sort()
        for (_, end, first), (start, _, second) in zip(self.ranges, self.ranges[1:]):
            if start < end:
                raise self.fail(second, f"shares bytes with {first} (from byte {start}); every vector and string belongs to one field")

    def string(self, pos: int, where: str) -> str:
        length = self.vector(pos, 1, where, terminator=1)
        if length > self.limits.max_string_bytes:
            raise self.fail(where, f"string of {length} bytes exceeds the limit {self.limits.max_string_bytes}")
        self.need(pos + 4 + length, 1, where + " terminator")
        if self.buf[pos + 4 + length] != 0:
            raise self.fail(where, "string is not NUL-terminated")
        try:
            return bytes(self.buf[pos + 4 : pos + 4 + length]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(where, f"string is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def check_preamble(buf: memoryview | bytes, filename: str) -> None:
    """Reject files too short for a root offset and identifier, or of another kind."""
    if len(buf) < PREAMBLE_SIZE:
        raise TruncatedFileError(f"{filename}: {len(buf)} bytes is shorter than the {PREAMBLE_SIZE}-byte preamble")
    identifier = bytes(buf[4:8])
    if identifier != FILE_IDENTIFIER:
        raise VersionError(f"{filename}: file identifier {identifier!r} is not {FILE_IDENTIFIER!r}: not a .moub file")


def verify_tree(buf: memoryview, limits: ReaderLimits, filename: str, budget: MemoryBudget | None = None) -> tuple[int, dict]:
    """Verify the whole index in ``buf``; return the end of the bytes it uses and the
    root table's fields (see :meth:`_Verifier.table`), read once, in range. Each table
    read is charged to ``budget``."""
    check_preamble(buf, filename)
    verifier = _Verifier(buf, limits, filename, budget)
    root = verifier.follow(0, "root offset")
    if root + 4 > len(buf):
        raise verifier.fail("root offset", f"root offset {root} lies outside the {len(buf)}-byte index")
    tree = verifier.table(root, ROOT_TABLE, 1, ROOT_TABLE)
    verifier.check_disjoint()
    return verifier.end, tree


def verify(buf: memoryview, limits: ReaderLimits, filename: str) -> int:
    """Verify the whole index in ``buf``; return the end of the bytes it uses."""
    return verify_tree(buf, limits, filename)[0]
