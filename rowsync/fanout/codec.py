"""What travels through the broker: resolved batches, barriers and gaps, as JSON bytes.

A message is ``{"v": 1, "term": T, "seq": S, "items": [...]}``: ``term`` names the capture
node that published it (a fencing token, see :mod:`.node`), ``seq`` numbers its messages so
a node notices one that went missing. Items are the dispatcher's :class:`Resolved` changes
(with their fetched rows) and :class:`Flush` barriers, in order, and the group's own
:class:`Gap` and :class:`Started` notices.

Row values keep their Python types across the broker: JSON's own types travel as they are;
UUIDs, dates and times, intervals, decimals, bytes, enums, network addresses and ranges
travel as ``{"$t": tag, "v": ...}`` (a JSON column's own object holding a ``"$t"`` key is
escaped the same way). Pickle is never used: a broker is shared, and pickle would run
whatever it is given. A value of any other type cannot travel: its change arrives as
unreadable (its subscribers are told to resync) and the capture node logs and counts it.

A decoded row keeps only the columns the receiving node may read of its table (its own
:class:`ColumnPolicy`, not the sender's word): a node configured differently, or a message
that should not be, cannot put a withheld column into a tree.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import ipaddress
import json
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias

import sqlalchemy as sa
from psycopg.types.range import Range

from rowsync.cache import CachedRow
from rowsync.columns import ColumnPolicy
from rowsync.dispatch import Resolved
from rowsync.listener import Flush
from rowsync.messages import Event

logger = logging.getLogger(__name__)

VERSION = 1
TAG = "$t"


@dataclass(frozen=True, slots=True)
class Gap:
    """Changes may have been missed: every node tells its subscriptions to resync (with
    ``tables``, those rows of these tables concern: :meth:`rowsync.dispatch.Dispatcher.gap`)."""

    reason: str
    tables: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True, slots=True)
class Started:
    """A node became the capture node. ``resumed``: it reads on from where the previous one
    stopped (a durable capture), so no change fell between them; otherwise it is a gap."""

    resumed: bool


Item: TypeAlias = Resolved | Flush | Gap | Started


class Envelope(NamedTuple):
    """One decoded message."""

    term: int
    """The publishing capture node's fencing token: higher for every new capture node."""
    seq: int
    """The message's number among those its capture node published."""
    items: list[Item]


_EVENTS: dict[str, Event] = {"i": "inserted", "u": "updated", "d": "deleted"}
_CODES = {event: code for code, event in _EVENTS.items()}


class _EnumName(str):
    """An enum member's name, until the column says which enum it belongs to."""


# -- values ----------------------------------------------------------------------------


def _range(value: Range[Any]) -> list[Any]:
    return [_plain(value.lower), _plain(value.upper), value.bounds, value.isempty]


_TAGGED: list[tuple[type, str, Callable[[Any], Any]]] = [
    (datetime.datetime, "datetime", datetime.datetime.isoformat),
    (datetime.date, "date", datetime.date.isoformat),
    (datetime.time, "time", datetime.time.isoformat),
    (datetime.timedelta, "timedelta", lambda v: [v.days, v.seconds, v.microseconds]),
    (uuid.UUID, "uuid", str),
    (decimal.Decimal, "decimal", str),
    (bytes, "bytes", lambda v: base64.b64encode(v).decode()),
    (memoryview, "bytes", lambda v: base64.b64encode(v).decode()),
    (enum.Enum, "enum", lambda v: v.name),
    (tuple, "tuple", lambda v: [_plain(x) for x in v]),
    (ipaddress.IPv4Interface, "ip_interface", str),  # an interface is also an address
    (ipaddress.IPv6Interface, "ip_interface", str),
    (ipaddress.IPv4Address, "ip_address", str),
    (ipaddress.IPv6Address, "ip_address", str),
    (ipaddress.IPv4Network, "ip_network", str),
    (ipaddress.IPv6Network, "ip_network", str),
    (Range, "range", _range),
]
"""Types that JSON lacks, most specific first (a datetime is also a date)."""

_FROM_TAG: dict[str, Callable[[Any], Any]] = {
    "datetime": datetime.datetime.fromisoformat,
    "date": datetime.date.fromisoformat,
    "time": datetime.time.fromisoformat,
    "timedelta": lambda v: datetime.timedelta(days=v[0], seconds=v[1], microseconds=v[2]),
    "uuid": uuid.UUID,
    "decimal": decimal.Decimal,
    "bytes": base64.b64decode,
    "enum": _EnumName,
    "tuple": tuple,
    "ip_address": ipaddress.ip_address,
    "ip_interface": ipaddress.ip_interface,
    "ip_network": ipaddress.ip_network,
    "range": lambda v: Range(v[0], v[1], v[2], empty=v[3]),
    "dict": dict,
}

_JSON_TYPES = (str, int, float, bool, type(None))


def _plain(value: Any) -> Any:
    """``value`` as JSON's types, tagging what JSON lacks; TypeError if it cannot travel."""
    if type(value) in _JSON_TYPES:
        return value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        if TAG in value:
            return {TAG: "dict", "v": [[k, _plain(v)] for k, v in value.items()]}
        return {k: _plain(v) for k, v in value.items()}
    for cls, tag, encode in _TAGGED:
        if isinstance(value, cls):
            return {TAG: tag, "v": encode(value)}
    if isinstance(value, _JSON_TYPES):
        return value  # a subclass of str, int or float: JSON writes it as its base type
    raise TypeError(f"a {type(value).__name__} value cannot travel through the broker")


def _tagged(obj: dict[str, Any]) -> Any:
    """``json.loads``' object hook: a tagged value back to its type."""
    tag = obj.get(TAG)
    if tag is None:
        return obj
    decode = _FROM_TAG.get(tag)
    if decode is None:
        raise ValueError(f"unknown value tag {tag!r}")
    return decode(obj["v"])


def _enum_classes(table: sa.Table) -> dict[str, type[enum.Enum]]:
    """Columns of ``table`` holding enum members (or lists of them), with their enum."""
    found: dict[str, type[enum.Enum]] = {}
    for column in table.columns:
        kind: Any = column.type
        if isinstance(kind, sa.ARRAY):
            kind = kind.item_type
        enum_class = getattr(kind, "enum_class", None)
        if isinstance(kind, sa.Enum) and enum_class is not None:
            found[column.name] = enum_class
    return found


def _members(value: Any, enum_class: type[enum.Enum]) -> Any:
    if isinstance(value, _EnumName):
        return enum_class[value]
    if isinstance(value, list):
        return [_members(v, enum_class) for v in value]
    return value


# -- items -----------------------------------------------------------------------------


def _item(item: Item, criteria: Mapping[str, str]) -> dict[str, Any]:
    if isinstance(item, Flush):
        return {"k": "f", "token": item.token}
    if isinstance(item, Gap):
        if item.tables is None:
            return {"k": "g", "reason": item.reason}
        return {"k": "g", "reason": item.reason, "tb": [list(t) for t in item.tables]}
    if isinstance(item, Started):
        return {"k": "s", "resumed": item.resumed}
    data: dict[str, Any] = {
        "k": "c",
        "r": item.ref,
        "t": list(item.table),
        "e": _CODES[item.event],
        "n": _plain(item.new),
        "o": _plain(item.old),
        "g": item.origin,
        "x": item.readable,
        "v": item.xid,
    }
    if item.row is not None:
        data["w"] = _plain(dict(item.row.values))
        data["m"] = sorted(criteria.get(name, name) for name in item.row.matches)
        data["p"] = None if item.row.old is None else _plain(dict(item.row.old))
    return data


class Codec:
    """Encodes on the capture node, decodes on every node.

    ``tables`` maps ``(schema, table)`` to the watched tables (the same on every node): a
    change of a table this node does not watch is skipped, logged and counted.
    ``criteria`` maps the names this process gives the relationship criteria a row fetch
    evaluates (``CachedRow.matches``) to names every process agrees on (the
    relationships' paths): the local names are numbered in an order of this process's own.
    ``columns``: what this node may read of each table; any other value a change carries is
    dropped on decode, logged and counted.
    """

    def __init__(
        self,
        tables: Mapping[tuple[str, str], sa.Table],
        stats: Counter[str],
        criteria: Mapping[str, str] | None = None,
        columns: ColumnPolicy | None = None,
    ) -> None:
        self.tables = tables
        self.stats = stats
        self._enums = {name: _enum_classes(table) for name, table in tables.items()}
        policy = columns or ColumnPolicy()
        self._readable = {
            name: frozenset(c.name for c in policy.columns(table)) for name, table in tables.items()
        }
        self._to_wire = dict(criteria or {})
        self._from_wire = {wire: local for local, wire in self._to_wire.items()}

    # -- the capture node ------------------------------------------------------------

    def encode(self, term: int, seq: int, items: Sequence[Item], limit: int) -> list[bytes]:
        """``items`` as messages of at most ``limit`` bytes, numbered from ``seq``, in order."""
        messages: list[bytes] = []
        room = limit - 64  # the envelope around the items
        parts: list[bytes] = []
        size = 0
        for item in items:
            part = self._part(item, room)
            if parts and size + len(part) + 1 > room:
                messages.append(_envelope(term, seq + len(messages), parts))
                parts, size = [], 0
            parts.append(part)
            size += len(part) + 1
        if parts or not messages:
            messages.append(_envelope(term, seq + len(messages), parts))
        return messages

    def _part(self, item: Item, room: int) -> bytes:
        """One item's JSON; a change that cannot travel whole travels as unreadable (its
        subscribers resync), or failing that as a gap."""
        try:
            part = _dumps(_item(item, self._to_wire))
        except TypeError as exc:
            self.stats["unencodable"] += 1
            logger.error("change %s cannot be published (%s): sent as unreadable", _ref(item), exc)
            part = b""
        if len(part) > room:
            self.stats["oversized"] += 1
            logger.error(
                "change %s is %d bytes, over the broker's limit: sent as unreadable",
                _ref(item),
                len(part),
            )
            part = b""
        if not part and isinstance(item, Resolved):
            unreadable = dataclasses.replace(item, row=None, readable=False)
            with_ids = _dumps(_item(unreadable, self._to_wire))
            if len(with_ids) <= room:
                return with_ids
        if not part:
            return _dumps(_item(Gap(f"change {_ref(item)} could not be published"), {}))
        return part

    # -- every node ------------------------------------------------------------------

    def decode(self, data: bytes) -> Envelope:
        """A message back as an :class:`Envelope`; ValueError if it is not one of ours."""
        try:
            message = json.loads(data, object_hook=_tagged)
            if message["v"] != VERSION:
                raise ValueError(f"message version {message['v']!r}, expected {VERSION}")
            term, seq = message["term"], message["seq"]
            if not (isinstance(term, int) and isinstance(seq, int)):
                raise ValueError("term and seq must be integers")
            items = [i for i in map(self._decoded, message["items"]) if i is not None]
        except (KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ValueError(f"not a rowsync fan-out message: {exc!r}") from exc
        return Envelope(term, seq, items)

    def _decoded(self, data: dict[str, Any]) -> Item | None:
        kind = data["k"]
        if kind == "f":
            return Flush(str(data["token"]))
        if kind == "g":
            tables = data.get("tb")
            return Gap(
                str(data["reason"]),
                None if tables is None else tuple((str(s), str(t)) for s, t in tables),
            )
        if kind == "s":
            return Started(bool(data["resumed"]))
        if kind != "c":
            raise ValueError(f"unknown item kind {kind!r}")
        table = (str(data["t"][0]), str(data["t"][1]))
        if table not in self.tables:
            self.stats["unwatched"] += 1
            logger.warning("skipping a published change of unwatched table %s.%s", *table)
            return None
        row = None
        if "w" in data:
            values = self._kept(table, data["w"])
            for name, enum_class in self._enums[table].items():
                if name in values:
                    values[name] = _members(values[name], enum_class)
            if unknown := [m for m in data["m"] if m not in self._from_wire]:
                raise ValueError(f"criteria {unknown} of {table} are unknown here")
            matches = frozenset(self._from_wire[m] for m in data["m"])
            row = CachedRow(
                values, matches, None if data["p"] is None else self._kept(table, data["p"])
            )
        return Resolved(
            ref=int(data["r"]),
            table=table,
            event=_EVENTS[data["e"]],
            new=self._kept(table, data["n"]),
            old=None if data["o"] is None else self._kept(table, data["o"]),
            origin=data["g"],
            row=row,
            readable=bool(data["x"]),
            xid=_xid(data.get("v")),
        )

    def _kept(self, table: tuple[str, str], values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` reduced to the columns of ``table`` this node may read."""
        readable = self._readable[table]
        given = dict(values)
        kept = {name: value for name, value in given.items() if name in readable}
        if len(kept) < len(given):
            self.stats["withheld"] += 1
            logger.warning(
                "dropped values of %s.%s a published change carried but this node does not "
                "read: %s",
                *table,
                sorted(name for name in given if name not in readable),
            )
        return kept


def _xid(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"xid {value!r} is not an integer")
    return value


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _envelope(term: int, seq: int, parts: Sequence[bytes]) -> bytes:
    head = b'{"v":%d,"term":%d,"seq":%d,"items":[' % (VERSION, term, seq)
    return head + b",".join(parts) + b"]}"


def _ref(item: Item) -> str:
    return f"#{item.ref}" if isinstance(item, Resolved) else repr(item)
