"""Decoding the messages of Postgres' built-in ``pgoutput`` plugin (protocol version 1).

The replication client hands over each message as bytes; their layout is documented in
"Logical Replication Message Formats". Only the messages a publication with
``publish = 'insert, update, delete, truncate'`` and ``messages = true`` sends are decoded:
Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate, Message. Column
values arrive as text (the protocol's ``binary`` option is off), a null as ``'n'`` and an
unchanged TOASTed value, which the server did not send, as :data:`UNCHANGED`.

Pure functions over bytes: the source of the bytes (:mod:`rowsync.wal`) and what becomes of
the decoded values are not this module's business. A busy stream brings tens of thousands of
messages a second, decoded in the WAL thread: each is read with offsets into its bytes, and
decoded into a named tuple (immutable, and several times cheaper to make than a frozen
dataclass; two messages of different kinds with equal fields compare equal, so compare
their types too).
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

_EPOCH_OFFSET = 946_684_800_000_000
"""Microseconds from the Unix epoch to Postgres' (2000-01-01)."""


class Unchanged:
    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged()
"""An unchanged TOASTed value: the server kept it out of the message, its value is unknown."""

Value = bytes | None | Unchanged
"""A column's value in a tuple: its text representation, NULL, or :data:`UNCHANGED`."""


class Column(NamedTuple):
    name: str
    type_oid: int
    key: bool
    """Part of the replica identity."""


class Begin(NamedTuple):
    final_lsn: int
    """The LSN of the transaction's commit record: grows with commit order."""
    timestamp_us: int
    """Commit time, microseconds since the Unix epoch."""
    xid: int


class Commit(NamedTuple):
    lsn: int
    end_lsn: int
    timestamp_us: int


class Origin(NamedTuple):
    lsn: int
    name: str


class Relation(NamedTuple):
    oid: int
    schema: str
    table: str
    replica_identity: str
    """``d`` default (primary key), ``n`` nothing, ``f`` full, ``i`` an index."""
    columns: tuple[Column, ...]


class TypeInfo(NamedTuple):
    oid: int
    schema: str
    name: str


class Insert(NamedTuple):
    relation: int
    new: tuple[Value, ...]


class Update(NamedTuple):
    relation: int
    old: tuple[Value, ...] | None
    """The old replica identity (``key``) or the whole old row (REPLICA IDENTITY FULL);
    None when the key did not change and the identity is not FULL."""
    key_only: bool
    """Whether ``old`` holds only the identity columns (the others are None)."""
    new: tuple[Value, ...]


class Delete(NamedTuple):
    relation: int
    old: tuple[Value, ...]
    key_only: bool


class Truncate(NamedTuple):
    relations: tuple[int, ...]
    cascade: bool
    restart_identity: bool


class Message(NamedTuple):
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


_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!bQQq")
_MESSAGE = struct.Struct("!bQ")
_RELATION = struct.Struct("!I")
_COLUMN = struct.Struct("!Ii")  # type oid, typmod
_TUPLE_FIELD = struct.Struct("!i")


def _string(data: bytes, pos: int) -> tuple[str, int]:
    """The NUL-terminated string at ``pos``, and the position after it."""
    end = data.find(b"\0", pos)
    if end < 0:
        raise DecodeError("unterminated string")
    return data[pos:end].decode(), end + 1


def _tuple(data: bytes, pos: int) -> tuple[tuple[Value, ...], int]:
    """The tuple at ``pos`` and the position after it. The hot loop of a busy stream (a
    REPLICA IDENTITY FULL update holds two tuples): offsets into the bytes, one slice per
    value sent, no object per field."""
    (count,) = _I16.unpack_from(data, pos)
    pos += 2
    values: list[Value] = []
    append = values.append
    length = _TUPLE_FIELD.unpack_from
    total = len(data)
    for _ in range(count):
        kind = data[pos]
        if kind == 116:  # 't': text, its length first
            (size,) = length(data, pos + 1)
            pos += 5
            end = pos + size
            if size < 0 or end > total:
                raise DecodeError("message truncated")
            append(data[pos:end])
            pos = end
            continue
        pos += 1
        if kind == 110:  # 'n'
            append(None)
        elif kind == 117:  # 'u'
            append(UNCHANGED)
        else:
            raise DecodeError(f"unknown tuple column kind {bytes([kind])!r}")
    return tuple(values), pos


def decode(data: bytes) -> Decoded:
    """One pgoutput message. Raises :class:`DecodeError` for anything else."""
    try:
        message, end = _decode(data)
    except (struct.error, IndexError):
        raise DecodeError("message truncated") from None
    except UnicodeDecodeError as exc:
        raise DecodeError(f"a name is not UTF-8 ({exc})") from None
    if end != len(data):
        raise DecodeError(f"{len(data) - end} unexpected trailing bytes")
    return message


def _decode(data: bytes) -> tuple[Decoded, int]:
    if not data:
        raise DecodeError("empty message")
    kind = data[0]
    if kind == 85:  # 'U'
        (relation,) = _RELATION.unpack_from(data, 1)
        tag = data[5]
        pos = 6
        old = None
        key_only = False
        if tag == 75 or tag == 79:  # 'K', 'O'
            key_only = tag == 75
            old, pos = _tuple(data, pos)
            tag = data[pos]
            pos += 1
        if tag != 78:  # 'N'
            raise DecodeError("update without a new tuple")
        new, pos = _tuple(data, pos)
        return Update(relation, old, key_only, new), pos
    if kind == 73:  # 'I'
        (relation,) = _RELATION.unpack_from(data, 1)
        if data[5] != 78:
            raise DecodeError("insert without a new tuple")
        new, pos = _tuple(data, 6)
        return Insert(relation, new), pos
    if kind == 68:  # 'D'
        (relation,) = _RELATION.unpack_from(data, 1)
        tag = data[5]
        if tag != 75 and tag != 79:
            raise DecodeError("delete without an old tuple")
        old, pos = _tuple(data, 6)
        return Delete(relation, old, tag == 75), pos
    if kind == 66:  # 'B'
        lsn, ts, xid = _BEGIN.unpack_from(data, 1)
        return Begin(lsn, ts + _EPOCH_OFFSET, xid), 1 + _BEGIN.size
    if kind == 67:  # 'C'
        _, lsn, end, ts = _COMMIT.unpack_from(data, 1)  # flags, unused
        return Commit(lsn, end, ts + _EPOCH_OFFSET), 1 + _COMMIT.size
    if kind == 79:  # 'O'
        (lsn,) = struct.unpack_from("!Q", data, 1)
        name, pos = _string(data, 9)
        return Origin(lsn, name), pos
    if kind == 82:  # 'R'
        (oid,) = _U32.unpack_from(data, 1)
        schema, pos = _string(data, 5)
        table, pos = _string(data, pos)
        identity = chr(data[pos])
        (count,) = _I16.unpack_from(data, pos + 1)
        pos += 3
        columns = []
        for _ in range(count):
            flags = data[pos]
            name, pos = _string(data, pos + 1)
            type_oid, _ = _COLUMN.unpack_from(data, pos)
            pos += _COLUMN.size
            columns.append(Column(name, type_oid, bool(flags & 1)))
        return Relation(oid, schema, table, identity, tuple(columns)), pos
    if kind == 89:  # 'Y'
        (oid,) = _U32.unpack_from(data, 1)
        schema, pos = _string(data, 5)
        name, pos = _string(data, pos)
        return TypeInfo(oid, schema, name), pos
    if kind == 84:  # 'T'
        count, options = struct.unpack_from("!iB", data, 1)
        if count < 0:
            raise DecodeError("message truncated")
        relations = struct.unpack_from(f"!{count}I", data, 6)
        return Truncate(relations, bool(options & 1), bool(options & 2)), 6 + 4 * count
    if kind == 77:  # 'M'
        flags, lsn = _MESSAGE.unpack_from(data, 1)
        prefix, pos = _string(data, 1 + _MESSAGE.size)
        (size,) = _I32.unpack_from(data, pos)
        pos += 4
        if size < 0 or pos + size > len(data):
            raise DecodeError("message truncated")
        return Message(bool(flags & 1), lsn, prefix, data[pos : pos + size]), pos + size
    raise DecodeError(f"unknown message kind {bytes([kind])!r}")
