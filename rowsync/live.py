"""Live queries: a statement's result, kept current in the background, with the diffs a UI
can patch itself with.

``rs.live(session_factory, select(Person).where(...).order_by(...).options(...))`` runs the
statement once and derives the rest from it:

* what to subscribe to: every change of the root model (a row may enter or leave the
  ``WHERE``), every change of the other tables the ``FROM``/``WHERE`` reads, and the tree
  below the roots as far as the loader options load it (``subscribe(roots, assocs=...)``);
* root membership and order: a changed root row is re-checked by the statement itself,
  restricted to its primary key (one small query), never by evaluating the ``WHERE`` in
  Python; it takes its place by its ``ORDER BY`` values as Postgres computed them;
* what changed, as :class:`Diff` values addressed by primary keys.

Rows are subscribed to from a position taken before their query (:mod:`rowsync.position`):
what commits between the query's snapshot and the registration is replayed to the live
query's subscription, so nothing is lost and nothing needs a second look.

One background thread for the whole process (:class:`_Pump`) applies the messages of every
live query with ``rs.sync``, computes the diffs, calls the callbacks and feeds the
``changes()`` iterators. A live query nobody reads for ``idle_timeout`` seconds lets go of its
tree and subscriptions; the next read runs the statement again.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import contextlib
import dataclasses
import datetime
import decimal
import enum
import functools
import logging
import math
import operator
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import sqlalchemy as sa
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.base import instance_state
from sqlalchemy.sql.util import find_tables

from rowsync import ordering, tree
from rowsync.columns import ColumnPolicy
from rowsync.errors import ConfigurationError, NotRunningError, RowsyncError
from rowsync.fetch import _where_key, key_of, table_of
from rowsync.graph import Graph
from rowsync.messages import Change, Message, Sync
from rowsync.position import Position
from rowsync.roots import whole_result_clauses
from rowsync.subscription import Subscription
from rowsync.watchers import spec_assocs

if TYPE_CHECKING:
    from rowsync.app import RowSync

logger = logging.getLogger(__name__)

Key: TypeAlias = tuple[Any, ...]
"""A primary key, as a tuple of column values."""
Path: TypeAlias = tuple[Any, ...]
"""Where a row sits: ``(root key, relationship, key, relationship, key, ...)``."""
SessionFactory: TypeAlias = Callable[[], Session]

_COMPACT_AFTER = 64
"""Roots that left the WHERE keep their interests until this many (or as many as the list
holds) have left; then the statement runs again, which registers only what is held."""


@dataclasses.dataclass(frozen=True, slots=True)
class Diff:
    """One change of a live query's tree.

    ``path`` addresses the row by primary keys from the root list: ``((3,),)`` is the root
    whose key is ``(3,)``; ``((3,), "posts", (10,), "tags", (5,))`` is tag 5 in the ``tags``
    of post 10 in the ``posts`` of root 3. A path never depends on the order of siblings.

    ``values``: for ``inserted``, every loaded column (by attribute name); for ``updated``,
    the columns that changed (empty when the row only moved); None for ``removed``. Withheld
    columns (``RowSync(exclude=...)``, sensitive names) never appear.

    ``index``: for ``inserted``, its position in its list; for ``updated``, set when the row
    moved: take it out of its list and put it back at ``index``. None otherwise, and always
    for a reference (many-to-one, one-to-one). Applied in order, the diffs of a batch turn
    the previous tree into the new one: removals come first, and each position counts the
    list as the earlier diffs left it. An inserted row's loaded relationships follow as
    inserted diffs of their own; a removed row takes what is below it along.
    """

    kind: Literal["inserted", "updated", "removed"]
    path: Path
    model: type[Any]
    key: Key
    values: dict[str, Any] | None = None
    index: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The diff as JSON-ready data (keys as lists, dates as ISO strings, decimals and
        UUIDs as strings, bytes in base64), for ``json.dumps`` and a websocket."""
        return {
            "kind": self.kind,
            "path": _jsonable(self.path),
            "model": self.model.__name__,
            "key": _jsonable(self.key),
            "values": _jsonable(self.values),
            "index": self.index,
        }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return str(value)


# -- what a statement asks for -------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
    """What a live query derives from its statement, once."""

    mapper: Mapper[Any]
    table: sa.Table
    spec: tree.LoadSpec
    assocs: list[Any]
    order: tuple[ordering.Term, ...]
    in_python: bool
    """Python compares every ORDER BY value as Postgres orders it: a row takes its place by
    its values; otherwise the statement's keys say where it goes."""
    below: tuple[sa.Table, ...]
    """Tables whose changes can alter what is loaded below the roots."""
    where: tuple[sa.Table, ...]
    """Tables other than the root's that the statement's FROM, WHERE or ORDER BY read."""
    loading: sa.Select[Any]
    """The statement, with its ORDER BY values as extra columns."""
    keys: sa.Select[Any]
    """The statement's primary keys and ORDER BY values, without loading anything."""

    @classmethod
    def of(cls, rs: RowSync, statement: sa.Select[Any]) -> _Plan:
        if not isinstance(statement, sa.Select):
            raise ConfigurationError(f"a live query runs select(Model), not {statement!r}")
        described = statement.column_descriptions
        entity = described[0].get("expr") if len(described) == 1 else None
        if not isinstance(entity, type):
            raise ConfigurationError(
                "a live query selects exactly one mapped class: select(Model).where(...)"
            )
        refused = whole_result_clauses(statement)
        if refused:
            raise ConfigurationError(
                f"a live query cannot keep a statement with {', '.join(refused)} current: "
                "whether a row belongs would depend on the other rows"
            )
        mapper: Mapper[Any] = sa.inspect(entity)
        table = rs._watched(entity)
        spec = tree.options_spec(mapper, statement._with_options)
        assocs = spec_assocs(spec)
        below: dict[sa.Table, None] = {}
        mappers = [mapper]
        pending = list(rs.router.spec(mapper, assocs))
        while pending:
            edge, nested = pending.pop()
            below.update(dict.fromkeys(sorted(edge.tables, key=lambda t: t.fullname)))
            mappers.append(edge.target)
            pending.extend(nested)
        if inherited := sorted(
            {
                m.base_mapper.class_.__name__
                for m in mappers
                if len(m.base_mapper.self_and_descendants) > 1
            }
        ):
            raise ConfigurationError(
                f"a live query over an inheritance hierarchy ({', '.join(inherited)}) is not "
                "supported: keep it with rs.load(session, statement) and rs.sync"
            )
        order = tuple(_term(clause) for clause in statement._order_by_clauses)
        pk = list(table.primary_key.columns)
        keys = statement.with_only_columns(*pk, *(t.expr for t in order))
        read = {t for t in find_tables(keys, check_columns=True) if isinstance(t, sa.Table)}
        where = tuple(sorted(read - {table}, key=lambda t: t.fullname))
        for other in (*below, *where):
            rs._watched(other)
        return cls(
            mapper=mapper,
            table=table,
            spec=spec,
            assocs=assocs,
            order=order,
            in_python=all(ordering.in_python(t) for t in order),
            below=tuple(below),
            where=where,
            loading=statement.add_columns(*(t.expr for t in order)),
            keys=keys,
        )


def _term(clause: sa.ColumnElement[Any]) -> ordering.Term:
    found = ordering.term(clause)
    if "label_reference" in found.expr.__visit_name__:
        raise ConfigurationError(
            f"order_by({found.expr}) names a label: a live query orders by columns or expressions"
        )
    return found


# -- the tree as the diffs describe it -----------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Slot:
    """What a node held under one relationship, as last described."""

    held: Any
    """The relationship's value then: sync replaces it (never mutates it) when it changes."""
    many: bool
    nodes: dict[Key, _Node]
    index_key: tuple[Mapper[Any], str] | None


@dataclasses.dataclass(eq=False)
class _Node:
    obj: Any
    path: Path
    table: sa.Table
    values: dict[str, Any]
    spec: tree.LoadSpec
    slots: dict[str, _Slot]
    alive: bool = True

    @property
    def key(self) -> Key:
        key: Key = self.path[-1]
        return key

    @property
    def model(self) -> type[Any]:
        return type(self.obj)


def _longest_run(before: list[Key], after: list[Key]) -> set[Key]:
    """The largest set of rows of ``before`` whose order ``after`` keeps (a longest increasing
    subsequence of their old positions, in O(n log n)): the rows that need not move."""
    position = {key: i for i, key in enumerate(before)}
    keys = [key for key in after if key in position]
    tails: list[int] = []  # tails[n]: index in ``keys`` ending the best run of length n + 1
    ends: list[int] = []  # ends[n]: the old position of keys[tails[n]]
    previous: list[int] = []
    for i, key in enumerate(keys):
        n = bisect.bisect_left(ends, position[key])
        previous.append(tails[n - 1] if n else -1)
        if n == len(tails):
            tails.append(i)
            ends.append(position[key])
        else:
            tails[n] = i
            ends[n] = position[key]
    run: set[Key] = set()
    i = tails[-1] if tails else -1
    while i >= 0:
        run.add(keys[i])
        i = previous[i]
    return run


class _Mirror:
    """The tree as the diffs so far described it, along the statement's LoadSpec, with an
    index of nodes by row and by relationship, so that a message re-reads only the nodes and
    collections its table can have changed."""

    def __init__(self, graph: Graph, spec: tree.LoadSpec, policy: ColumnPolicy) -> None:
        self.graph = graph
        self.spec = spec
        self._policy = policy
        self._hidden: dict[Mapper[Any], frozenset[str]] = {}
        self.roots = _Slot(held=None, many=True, nodes={}, index_key=None)
        self._seen: list[Any] = []
        self._generation = tree.Generation.value
        self._rows: dict[tuple[sa.Table, Key], dict[int, _Node]] = collections.defaultdict(dict)
        self._parents: dict[tuple[Mapper[Any], str], dict[int, _Node]] = collections.defaultdict(
            dict
        )

    def refresh(self, roots: list[Any], changed: Iterable[tuple[sa.Table, Key]] = ()) -> list[Diff]:
        """The diffs from the last description to ``roots``, as far as the rows ``changed``
        (and the root list itself) can have changed it."""
        out: list[Diff] = []
        if len(roots) != len(self._seen) or not all(map(operator.is_, roots, self._seen)):
            self._slot(self.roots, roots, (), self.spec, out)
            self._seen = list(roots)
        reshaped = tree.Generation.value != self._generation  # a collection was replaced
        self._generation = tree.Generation.value
        for table, key in dict.fromkeys(changed):
            for edge in self.graph.edges_for(table) if reshaped else ():
                for node in list(self._parents.get((edge.parent, edge.key), {}).values()):
                    slot = node.slots[edge.key]
                    current = tree.loaded_value(node.obj, edge.key)
                    if node.alive and current is not slot.held:
                        nested = node.spec[edge.key]
                        self._slot(slot, current, (*node.path, edge.key), nested, out)
            for node in list(self._rows.get((table, key), {}).values()):
                if node.alive:
                    self._update(node, node.obj, None, out)
        return out

    def dump(self) -> list[Diff]:
        """The whole tree as inserted diffs: what a new reader starts from."""
        out: list[Diff] = []
        for i, node in enumerate(self.roots.nodes.values()):
            self._inserted(node, i, out)
        return out

    def _slot(
        self, slot: _Slot, current: Any, prefix: Path, spec: tree.LoadSpec, out: list[Diff]
    ) -> None:
        objects = [] if current is tree.NOT_LOADED else tree.as_list(current)
        slot.held = current
        before = list(slot.nodes.values())
        # The same objects at both ends changed nothing there: only the middle is read (a
        # root moving in a long list costs the stretch it moved across, not the list).
        head = 0
        while head < min(len(before), len(objects)) and before[head].obj is objects[head]:
            head += 1
        tail = 0
        while (
            tail < min(len(before), len(objects)) - head
            and before[-1 - tail].obj is objects[-1 - tail]
        ):
            tail += 1
        old = {node.key: node for node in before[head : len(before) - tail]}
        new: dict[Key, Any] = {}
        for obj in objects[head : len(objects) - tail]:
            key = tree.primary_key(obj)
            if key in old or key not in slot.nodes:  # a row held twice is described once
                new.setdefault(key, obj)
        for key, gone in old.items():
            if key not in new:
                out.append(Diff("removed", gone.path, gone.model, key))
                self._forget(gone)
        # The middle as a reader has it after the removals: the longest run of rows already
        # in the new order stays put, every other row moves right after its new predecessor.
        frame = [key for key in old if key in new]
        stable = _longest_run(frame, list(new))
        cursor = 0  # just after the last row placed, in ``frame``
        middle: list[_Node] = []
        for key, obj in new.items():
            kept = old.get(key)
            if kept is not None and key in stable:
                cursor = frame.index(key, cursor) + 1
                if obj is not kept.obj:  # changed values of the same object: see refresh()
                    self._update(kept, obj, None, out)
                middle.append(kept)
                continue
            if kept is not None:
                at = frame.index(key)
                del frame[at]
                cursor -= at < cursor
            frame.insert(cursor, key)
            index = head + cursor if slot.many else None
            cursor += 1
            if kept is None:
                kept = self._add(obj, (*prefix, key), spec)
                self._inserted(kept, index, out)
            else:
                self._update(kept, obj, index, out)
            middle.append(kept)
        nodes = [*before[:head], *middle, *before[len(before) - tail :]]
        slot.nodes = {node.key: node for node in nodes}

    def _update(self, node: _Node, obj: Any, index: int | None, out: list[Diff]) -> None:
        """Describe what changed on a row still in its place (``index``: where it moved)."""
        values = self._values(obj)
        changed = {k: v for k, v in values.items() if k not in node.values or node.values[k] != v}
        node.values = values
        if changed or index is not None:
            out.append(Diff("updated", node.path, node.model, node.key, changed, index))
        if obj is not node.obj:  # another instance of the row (a reload): read it all again
            node.obj = obj
            for key, nested in node.spec.items():
                slot = node.slots[key]
                self._slot(slot, tree.loaded_value(obj, key), (*node.path, key), nested, out)

    def _add(self, obj: Any, path: Path, spec: tree.LoadSpec) -> _Node:
        mapper = instance_state(obj).mapper
        node = _Node(obj, path, tree.mapped_table(mapper), self._values(obj), spec, {})
        self._rows[(node.table, node.key)][id(node)] = node
        for key, nested in spec.items():
            rel = mapper.relationships[key]
            current = tree.loaded_value(obj, key)
            slot = node.slots[key] = _Slot(current, bool(rel.uselist), {}, (rel.parent, key))
            self._parents[(rel.parent, key)][id(node)] = node
            for child in [] if current is tree.NOT_LOADED else tree.as_list(current):
                child_key = tree.primary_key(child)
                if child_key not in slot.nodes:
                    slot.nodes[child_key] = self._add(child, (*path, key, child_key), nested)
        return node

    def _forget(self, node: _Node) -> None:
        node.alive = False
        self._rows[(node.table, node.key)].pop(id(node), None)
        for slot in node.slots.values():
            if slot.index_key is not None:
                self._parents[slot.index_key].pop(id(node), None)
            for child in slot.nodes.values():
                self._forget(child)

    def _inserted(self, node: _Node, index: int | None, out: list[Diff]) -> None:
        out.append(Diff("inserted", node.path, node.model, node.key, dict(node.values), index))
        for slot in node.slots.values():
            for i, child in enumerate(slot.nodes.values()):
                self._inserted(child, i if slot.many else None, out)

    def _values(self, obj: Any) -> dict[str, Any]:
        """The loaded columns by attribute, but for withheld ones: diffs go to browsers."""
        state = instance_state(obj)
        mapper, data = state.mapper, state.dict
        hidden = self._hidden.get(mapper)
        if hidden is None:
            withheld = self._policy.withheld(tree.mapped_table(mapper))
            hidden = self._hidden[mapper] = frozenset(
                p.key for p in mapper.column_attrs if any(c.name in withheld for c in p.columns)
            )
        return {
            p.key: data[p.key] for p in mapper.column_attrs if p.key in data and p.key not in hidden
        }


# -- the live query ------------------------------------------------------------------------


class _Feed(Subscription):
    """A live query's subscription: each message queued wakes the pump for it."""

    def __init__(self, rs: RowSync, on_put: Callable[[], None]) -> None:
        super().__init__(rs._add, rs.router.remove, rs.queue_size)
        self._on_put = on_put

    def put_all(self, messages: Sequence[Message]) -> None:
        super().put_all(messages)
        self._on_put()


class LiveQuery:
    """A statement's result (``value``), kept current in the background. Create with
    ``rs.live(session_factory, statement, idle_timeout=300.0)``.

    Readers take ``lock`` (or use ``with live.read() as roots:``) while they walk the tree:
    the background thread patches it in place. Read ``value`` each time rather than keeping
    the list: after an idle release, the next read builds a new one.

    A ``(Resync, info)`` message (changes may have been missed) runs the statement again and
    reports what that changed as one batch of diffs; so does a message that fails to apply
    (logged, counted in ``rs.stats["live_errors"]``). If the statement fails too, the tree is
    let go, iterators raise :class:`~rowsync.RowsyncError`, and the next read runs it again.
    """

    def __init__(
        self,
        rs: RowSync,
        session_factory: SessionFactory,
        statement: sa.Select[Any],
        *,
        idle_timeout: float | None = 300.0,
    ) -> None:
        self.rs = rs
        self.statement = statement
        self.idle_timeout = idle_timeout
        """Seconds without a reader after which the tree and subscriptions are let go
        (None: never)."""
        self.lock = threading.RLock()
        """Held by the background thread while it changes the tree; take it to read."""
        self._session_factory = session_factory
        self._plan = _Plan.of(rs, statement)
        self._settled = threading.Condition(self.lock)
        self._value: list[Any] | None = None
        self._roots: list[Any] = []
        """The same objects in the order they came: what ``sync`` is given, so that a root
        moving in the ORDER BY does not make it index the whole tree again."""
        self._sub: _Feed | None = None
        self._mirror: _Mirror | None = None
        self._order: dict[Key, tuple[Any, ...]] = {}
        self._sort_key = ordering.sort_key(self._plan.order)
        self._backlog: collections.deque[Message] = collections.deque()
        self._callbacks: list[Callable[[list[Diff]], Any]] = []
        self._streams: weakref.WeakSet[Changes] = weakref.WeakSet()
        self._last_read = time.monotonic()
        self._stale = 0
        self._reload_needed = False
        self._unranked = False
        """A root was placed without its position (see ``_Plan.in_python``): the statement's
        keys order the roots before the diffs are computed."""
        self._closed = False
        _PUMP.add(self)  # first: messages queued while it loads must wake the pump
        try:
            with self.lock:
                self._build()
        except BaseException:
            _PUMP.discard(self)
            raise

    def __repr__(self) -> str:
        state = "closed" if self._closed else "idle" if self._value is None else "live"
        return f"<LiveQuery {self._plan.mapper.class_.__name__} {state}>"

    # -- reading -----------------------------------------------------------------------

    @property
    def value(self) -> list[Any]:
        """The result: the list of root objects, loaded as the statement loads them. After an
        idle release, reading it runs the statement again (one query)."""
        with self.lock:
            return self._touch()

    def _touch(self) -> list[Any]:
        """A read: the idle clock starts again, and a released tree is built again."""
        self._check_open()
        self._last_read = time.monotonic()
        if self._value is None:
            self._build()
        assert self._value is not None
        return self._value

    @contextlib.contextmanager
    def read(self) -> Iterator[list[Any]]:
        """``with live.read() as roots:``: the tree, unchanged while the block runs."""
        with self.lock:
            yield self.value

    @property
    def active(self) -> bool:
        """Whether it holds a tree and subscriptions now (False after an idle release)."""
        return self._value is not None

    def changes(self, *, initial: bool = False) -> Changes:
        """``async for diffs in live.changes():`` each item is the list of :class:`Diff` one
        message made. Call it in the event loop that iterates; it is registered at once, so
        nothing applied after this call is missed. With ``initial=True`` the first item is
        the whole tree as inserted diffs (a page can be built from diffs alone)."""
        stream = Changes(self, asyncio.get_running_loop())
        with self.lock:
            self._touch()
            assert self._mirror is not None
            if initial:
                stream._queue.put_nowait(self._mirror.dump())
            self._streams.add(stream)
        return stream

    def on_change(self, callback: Callable[[list[Diff]], Any]) -> Callable[[], None]:
        """Call ``callback(diffs)`` for each message that changed the tree, in the background
        thread, with ``lock`` held (keep it quick). Returns a function that unsubscribes."""
        with self.lock:
            self._touch()
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self.lock, contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return unsubscribe

    def flush(self, timeout: float = 5.0) -> None:
        """Return once every change committed before the call is applied to ``value`` (and
        handed to callbacks and iterators): ``rs.flush()``, then the background thread."""
        deadline = time.monotonic() + timeout
        self.rs.flush(timeout)
        with self._settled:
            done = self._settled.wait_for(
                lambda: self._sub is None or not (self._backlog or len(self._sub)),
                max(0.0, deadline - time.monotonic()),
            )
        if not done:
            raise TimeoutError(f"the live query did not apply its messages within {timeout} s")

    # -- letting go --------------------------------------------------------------------

    def release_if_idle(self, now: float | None = None) -> bool:
        """Let go of the tree and subscriptions if nobody read ``value`` for ``idle_timeout``
        seconds and no callback or iterator is registered; True if it did. The background
        thread calls it when a deadline passes (``now``: a ``time.monotonic()`` time)."""
        with self.lock:
            deadline = self._deadline()
            if deadline is None or (time.monotonic() if now is None else now) < deadline:
                return False
            logger.debug("%r: idle for %s s, releasing its tree", self, self.idle_timeout)
            self._release()
            return True

    def _deadline(self) -> float | None:
        """When it may be released, if nothing reads it meanwhile; None: not releasable."""
        if (
            self._value is None
            or self.idle_timeout is None
            or self._callbacks
            or len(self._streams)
        ):
            return None
        return self._last_read + self.idle_timeout

    def close(self) -> None:
        """Let go of the tree and subscriptions for good; iterators end, callbacks stop."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            self._release()
            self._callbacks.clear()
            for stream in list(self._streams):
                stream._put(None)
            self._streams = weakref.WeakSet()
        _PUMP.discard(self)

    def __enter__(self) -> LiveQuery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> LiveQuery:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)  # it may wait for the message being applied

    def _check_open(self) -> None:
        if self._closed:
            raise NotRunningError(f"{self!r} is closed")

    def _release(self) -> None:
        if self._sub is not None:
            self._sub.close()
        self._sub = None
        self._value = None
        self._roots = []
        self._mirror = None
        self._order = {}
        self._backlog.clear()
        self._settled.notify_all()

    def _forget_stream(self, stream: Changes) -> None:
        with self.lock:
            self._streams.discard(stream)

    # -- loading -----------------------------------------------------------------------

    def _build(self) -> None:
        self._value = self._load_all()
        self._roots = list(self._value)
        self._mirror = _Mirror(self.rs.graph, self._plan.spec, self.rs.columns)
        self._mirror.refresh(self._value)  # nobody has been told anything yet
        self._last_read = time.monotonic()

    def _reload(self) -> list[Diff]:
        """Run the statement again (after a Resync); the diffs say what it changed."""
        assert self._value is not None and self._mirror is not None
        self._value[:] = self._load_all()
        self._roots = list(self._value)
        return self._mirror.refresh(self._value)

    def _load_all(self) -> list[Any]:
        """The statement's rows, registered on a new subscription (which replaces the old)
        from a position taken before the query: what commits meanwhile is replayed to it."""
        old = self._sub
        feed = self._sub = self._feed()
        self._backlog.clear()
        self._reload_needed = False
        try:
            position = self._stream_position()
            rows = self._rows(None)
            roots = [obj for obj, _ in rows]
            if roots:
                feed.add(roots, assocs=self._plan.assocs, since=position)
        except BaseException:
            feed.close()
            self._sub = old
            raise
        self._order = {tree.primary_key(obj): order for obj, order in rows}
        if old is not None:
            old.close()  # after the new one holds everything: nothing falls in between
        self._stale = 0
        return roots

    def _feed(self) -> _Feed:
        feed = _Feed(self.rs, functools.partial(_PUMP.wake, self))
        feed.add(self._plan.mapper.class_)
        for table in self._plan.where:
            feed.add(table)
        return feed

    def _stream_position(self) -> Position | None:
        """Where the stream stands, to replay from; None when no listener runs (changes then
        come only from :class:`rowsync.testing.MemoryEvents`, in this thread)."""
        return self.rs.position() if self.rs.running else None

    def _rows(self, where: sa.ColumnElement[bool] | None) -> list[tuple[Any, tuple[Any, ...]]]:
        """Objects of the statement (restricted by ``where``), with their ORDER BY values."""
        statement = self._plan.loading if where is None else self._plan.loading.where(where)
        with self._session_factory() as session:
            return [(row[0], tuple(row[1:])) for row in session.execute(statement).unique()]

    def _keys(self, where: sa.ColumnElement[bool] | None) -> dict[Key, tuple[Any, ...]]:
        """Primary keys of the statement (restricted by ``where``) with their ORDER BY values,
        in the statement's order."""
        statement = self._plan.keys if where is None else self._plan.keys.where(where)
        width = len(self._plan.table.primary_key.columns)
        with self._session_factory() as session:
            return {tuple(row[:width]): tuple(row[width:]) for row in session.execute(statement)}

    # -- applying messages (the pump's thread) ----------------------------------------------

    def _drain(self) -> None:
        """Apply every queued message, each under the lock (readers get in between)."""
        while True:
            with self.lock:
                if self._sub is not None and not self._backlog:
                    self._backlog.extend(self._sub.drain())
                if self._sub is None or not self._backlog:
                    self._backlog.clear()
                    self._settled.notify_all()
                    return
                diffs = self._safely(self._backlog.popleft())
                if diffs:
                    self._emit(diffs)

    def _safely(self, message: Message) -> list[Diff]:
        try:
            return self._apply(message)
        except Exception:
            self.rs.stats["live_errors"] += 1
            logger.exception("%r: applying %r failed; running the query again", self, message)
        try:
            return self._reload()
        except Exception as exc:
            logger.exception("%r: the query failed too; letting go of the tree", self)
            for stream in list(self._streams):
                stream._put(RowsyncError(f"live query lost its tree: {exc}"))
            self._streams = weakref.WeakSet()
            self._release()
            return []

    def _apply(self, message: Message) -> list[Diff]:
        change = message[1]
        if not isinstance(change, Change):  # (Resync, info): changes may have been missed
            return self._reload()
        assert self._value is not None and self._mirror is not None
        table = table_of(change.model)
        key = key_of(table, change.ids)
        changed = [(table, key)]
        if table is self._plan.table:
            self._root_changed(change, key)
        else:
            self._sync(self._roots, change)
            if table in self._plan.where:
                self._reconcile(change)
        if self._reload_needed:
            return self._reload()
        if self._unranked:
            self._rank(self._keys(None))
        return self._mirror.refresh(self._value, changed)

    def _sync(self, roots: list[Any], change: Change) -> None:
        """``rs.sync`` of the rows below the roots (none below an empty list). No rule is
        declared on the list: sync never makes a row a root of it, the statement decides."""
        if roots:
            self.rs.sync(roots, (Sync, change))

    def _root_changed(self, change: Change, key: Key) -> None:
        """A row of the roots' table changed: sync applies it below the roots, then the
        statement restricted to its key says whether (and where) it is a root."""
        assert self._value is not None
        if change.event == "deleted":
            self._sync(self._roots, change)  # gone from its places, and from the roots
            if key in self._order:
                del self._value[self._position(key)]
                del self._order[key]
            return
        self._sync(self._roots, change)
        if key not in self._order:
            self._admit(change, [key])
            return
        found = self._keys(_where_key(self._plan.table, [key])).get(key)
        if found is None:
            self._drop(change, [key])
        elif found != self._order[key]:
            self._place(self._value.pop(self._position(key)), key, found)

    def _reconcile(self, change: Change) -> None:
        """``change`` of a table the WHERE reads: the statement's keys, in its order, say which
        roots there are (one query for the keys, one for the rows that entered)."""
        assert self._value is not None
        found = self._keys(None)
        self._drop(change, [k for k in self._order if k not in found])
        self._order.update((k, v) for k, v in found.items() if k in self._order)
        self._admit(change, [k for k in found if k not in self._order])
        self._rank(found)

    def _rank(self, found: dict[Key, tuple[Any, ...]]) -> None:
        """Order the roots as the statement's keys ``found`` are ordered."""
        assert self._value is not None
        rank = {key: i for i, key in enumerate(found)}
        self._value.sort(key=lambda obj: rank.get(tree.primary_key(obj), len(rank)))
        self._unranked = False

    def _admit(self, change: Change, keys: list[Key]) -> None:
        """Load the rows of ``keys`` the statement returns, as roots in their places, and
        subscribe to them from a position taken before: what commits meanwhile is replayed.
        They join the roots as sync's own roots do (:meth:`Syncer.reroot`): a row the tree
        holds below a root already becomes a root as that instance, given what the statement
        loads on it that it lacks, and each is loaded as a fresh query loads it there."""
        if not keys:
            return
        assert self._value is not None and self._sub is not None
        position = self._stream_position()
        fetched = [
            (obj, order)
            for obj, order in self._rows(_where_key(self._plan.table, keys))
            if tree.primary_key(obj) not in self._order
        ]
        if not fetched:
            return
        admitted = self.rs.syncer.reroot(
            self._roots, change, [obj for obj, _ in fetched], [], self._plan.spec
        )
        for root, (_, order) in zip(admitted, fetched, strict=True):
            self._place(root, tree.primary_key(root), order)
        self._sub.add(admitted, assocs=self._plan.assocs, since=position)

    def _place(self, obj: Any, key: Key, order: tuple[Any, ...]) -> None:
        """Insert a root after every root that sorts before it or ties with it; at the end
        when Python cannot compare the ORDER BY values (the statement ranks it later)."""
        assert self._value is not None
        self._order[key] = order
        if not self._plan.in_python:
            self._value.append(obj)
            self._unranked = True
            return
        at = bisect.bisect_right(
            self._value,
            self._sort_key(order),
            key=lambda o: self._sort_key(self._order[tree.primary_key(o)]),
        )
        self._value.insert(at, obj)

    def _position(self, key: Key) -> int:
        assert self._value is not None
        return next(i for i, obj in enumerate(self._value) if tree.primary_key(obj) == key)

    def _drop(self, change: Change, keys: list[Key]) -> None:
        """Roots left the WHERE. Their interests stay registered (a subscription cannot drop
        one tree's share); after many, the statement runs again with a fresh subscription. A
        row still held below a root stays there, loaded as it is loaded there (as sync's own
        roots leave: :meth:`Syncer.reroot`)."""
        if not keys:
            return
        assert self._value is not None
        dropped = [self._value.pop(self._position(key)) for key in keys]
        for key in keys:
            del self._order[key]
        self.rs.syncer.reroot(self._roots, change, [], dropped, self._plan.spec)
        self._stale += len(keys)
        if self._stale > max(_COMPACT_AFTER, len(self._value)):
            self._reload_needed = True

    def _emit(self, diffs: list[Diff]) -> None:
        for callback in list(self._callbacks):
            try:
                callback(diffs)
            except Exception:
                self.rs.stats["live_callback_errors"] += 1
                logger.exception("%r: callback %r failed", self, callback)
        for stream in list(self._streams):
            stream._put(diffs)


class Changes:
    """``async for diffs in live.changes():`` the diff batches of a live query, each the list
    of :class:`Diff` one message made. Ends when the live query is closed; ``aclose()`` (or
    dropping the iterator) unregisters it."""

    def __init__(self, live: LiveQuery, loop: asyncio.AbstractEventLoop) -> None:
        self._live = live
        self._loop = loop
        self._queue: asyncio.Queue[list[Diff] | BaseException | None] = asyncio.Queue()
        self._ended = False

    def _put(self, item: list[Diff] | BaseException | None) -> None:
        """From the background thread: hand an item to the iterator's event loop."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # its loop is closed: nobody will read it
            self._live._forget_stream(self)

    def __aiter__(self) -> Changes:
        return self

    async def __anext__(self) -> list[Diff]:
        if self._ended:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, list):
            return item
        self._ended = True
        self._live._forget_stream(self)
        if item is None:
            raise StopAsyncIteration
        raise item

    async def aclose(self) -> None:
        """Stop receiving; the iteration ends."""
        self._live._forget_stream(self)
        self._queue.put_nowait(None)


# -- the background thread -----------------------------------------------------------------


class _Pump:
    """The one thread that applies the messages of every live query in the process, and lets
    go of idle ones. It runs while there is a live query, and stops with the last one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._lives: set[LiveQuery] = set()
        self._ready: dict[LiveQuery, None] = {}
        self._thread: threading.Thread | None = None

    def add(self, live: LiveQuery) -> None:
        with self._cond:
            self._lives.add(live)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rowsync-live", daemon=True)
                self._thread.start()
            self._cond.notify()

    def discard(self, live: LiveQuery) -> None:
        with self._cond:
            self._lives.discard(live)
            self._ready.pop(live, None)
            self._cond.notify()

    def wake(self, live: LiveQuery) -> None:
        """A message was queued for ``live`` (called from the listener's thread)."""
        with self._cond:
            if live in self._lives:
                self._ready[live] = None
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ready:
                    if not self._lives:
                        self._thread = None
                        return
                    now = time.monotonic()
                    due = min(_due(live, now) for live in self._lives)
                    if due <= now:
                        break
                    self._cond.wait(None if due == math.inf else due - now)
                ready = list(self._ready)
                self._ready.clear()
                lives = list(self._lives)
            for live in ready:
                try:
                    live._drain()
                except Exception:
                    logger.exception("%r: applying messages failed", live)
            now = time.monotonic()
            for live in lives:
                try:
                    live.release_if_idle(now)
                except Exception:
                    logger.exception("%r: releasing failed", live)


def _due(live: LiveQuery, now: float) -> float:
    """When to look at ``live`` again: its idle deadline, or (while it is read) a period."""
    deadline = live._deadline()
    if deadline is not None:
        return deadline
    return math.inf if live.idle_timeout is None else now + live.idle_timeout


_PUMP = _Pump()
