"""Decoding the messages of Postgres' built-in ``pgoutput`` plugin (protocol version 1).

The replication client hands over each message as bytes; their layout is documented in
"Logical Replication Message Formats". Only the messages a publication with
``publish = 'insert, update, delete, truncate'`` and ``messages = true`` sends are decoded:
Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate, Message. Column
values arrive as text (the protocol's ``binary`` option is off), a null as ``'n'`` and an
unchanged TOASTed value, which the server did not send, as :data:`UNCHANGED`.

Pure functions over bytes: the source of the bytes (:mod:`rowsync.wal`) and what becomes of
the decoded values are not this module's business.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

_EPOCH_OFFSET = 946_684_800_000_000
"""Microseconds from the Unix epoch to Postgres' (2000-01-01)."""


class Unchanged:
    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged()
"""An unchanged TOASTed value: the server kept it out of the message, its value is unknown."""

Value = bytes | None | Unchanged
"""A column's value in a tuple: its text representation, NULL, or :data:`UNCHANGED`."""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    key: bool
    """Part of the replica identity."""


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    """The LSN of the transaction's commit record: grows with commit order."""
    timestamp_us: int
    """Commit time, microseconds since the Unix epoch."""
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    lsn: int
    end_lsn: int
    timestamp_us: int


@dataclass(frozen=True, slots=True)
class Origin:
    lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    schema: str
    table: str
    replica_identity: str
    """``d`` default (primary key), ``n`` nothing, ``f`` full, ``i`` an index."""
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class TypeInfo:
    oid: int
    schema: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation: int
    new: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Update:
    relation: int
    old: tuple[Value, ...] | None
    """The old replica identity (``key``) or the whole old row (REPLICA IDENTITY FULL);
    None when the key did not change and the identity is not FULL."""
    key_only: bool
    """Whether ``old`` holds only the identity columns (the others are None)."""
    new: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    relation: int
    old: tuple[Value, ...]
    key_only: bool


@dataclass(frozen=True, slots=True)
class Truncate:
    relations: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class Message:
    """A ``pg_logical_emit_message``."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Decoded = (
    Begin | Commit | Origin | Relation | TypeInfo | Insert | Update | Delete | Truncate | Message
)


class DecodeError(ValueError):
    """Bytes that are not a pgoutput message this module knows."""


_I8 = struct.Struct("!b")
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I64 = struct.Struct("!q")
_U64 = struct.Struct("!Q")


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if size < 0 or end > len(self.data):
            raise DecodeError("message truncated")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, fmt: struct.Struct) -> int:
        value: int = fmt.unpack(self.take(fmt.size))[0]
        return value

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise DecodeError("unterminated string")
        text = self.data[self.pos : end].decode()
        self.pos = end + 1
        return text

    def tuple(self) -> tuple[Value, ...]:
        values: list[Value] = []
        for _ in range(self.unpack(_I16)):
            kind = self.take(1)
            if kind == b"t":
                values.append(self.take(self.unpack(_I32)))
            elif kind == b"n":
                values.append(None)
            elif kind == b"u":
                values.append(UNCHANGED)
            else:
                raise DecodeError(f"unknown tuple column kind {kind!r}")
        return tuple(values)

    def done(self) -> None:
        if self.pos != len(self.data):
            raise DecodeError(f"{len(self.data) - self.pos} unexpected trailing bytes")


def decode(data: bytes) -> Decoded:
    """One pgoutput message. Raises :class:`DecodeError` for anything else."""
    if not data:
        raise DecodeError("empty message")
    r = _Reader(data)
    kind = r.take(1)
    message: Decoded
    if kind == b"B":
        lsn, ts, xid = r.unpack(_U64), r.unpack(_I64), r.unpack(_U32)
        message = Begin(lsn, ts + _EPOCH_OFFSET, xid)
    elif kind == b"C":
        r.unpack(_I8)  # flags, unused
        lsn, end, ts = r.unpack(_U64), r.unpack(_U64), r.unpack(_I64)
        message = Commit(lsn, end, ts + _EPOCH_OFFSET)
    elif kind == b"O":
        message = Origin(r.unpack(_U64), r.string())
    elif kind == b"R":
        oid, schema, table = r.unpack(_U32), r.string(), r.string()
        identity = r.take(1).decode()
        columns = []
        for _ in range(r.unpack(_I16)):
            flags, name, type_oid = r.unpack(_I8), r.string(), r.unpack(_U32)
            r.unpack(_I32)  # typmod
            columns.append(Column(name, type_oid, bool(flags & 1)))
        message = Relation(oid, schema, table, identity, tuple(columns))
    elif kind == b"Y":
        message = TypeInfo(r.unpack(_U32), r.string(), r.string())
    elif kind == b"I":
        relation = r.unpack(_U32)
        if r.take(1) != b"N":
            raise DecodeError("insert without a new tuple")
        message = Insert(relation, r.tuple())
    elif kind == b"U":
        relation = r.unpack(_U32)
        tag = r.take(1)
        old = None
        key_only = False
        if tag in (b"K", b"O"):
            key_only = tag == b"K"
            old = r.tuple()
            tag = r.take(1)
        if tag != b"N":
            raise DecodeError("update without a new tuple")
        message = Update(relation, old, key_only, r.tuple())
    elif kind == b"D":
        relation = r.unpack(_U32)
        tag = r.take(1)
        if tag not in (b"K", b"O"):
            raise DecodeError("delete without an old tuple")
        message = Delete(relation, r.tuple(), tag == b"K")
    elif kind == b"T":
        count, options = r.unpack(_I32), r.unpack(_I8)
        relations = tuple(r.unpack(_U32) for _ in range(count))
        message = Truncate(relations, bool(options & 1), bool(options & 2))
    elif kind == b"M":
        flags, lsn, prefix = r.unpack(_I8), r.unpack(_U64), r.string()
        message = Message(bool(flags & 1), lsn, prefix, r.take(r.unpack(_I32)))
    else:
        raise DecodeError(f"unknown message kind {kind!r}")
    r.done()
    return message
