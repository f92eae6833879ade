"""Testing helpers for applications that use rowsync: a pytest plugin and in-memory events.

The pytest plugin (entry point ``pytest11``, so it is active in every pytest session where
rowsync is installed; ``-p no:rowsync`` turns it off) provides fixtures named ``rowsync_*``.
Your ``conftest.py`` says what to watch by overriding ``rowsync_watchers`` (and, if the
watched models' metadata is not all you need, ``rowsync_metadata``); the server comes from
``$ROWSYNC_TEST_DSN`` or the ``rowsync_test_dsn`` ini option. Each test that uses them gets
a database of its own, created by pytest-postgresql's janitor and dropped afterwards.

:class:`MemoryEvents` needs no database: it makes up row changes and hands them to a
RowSync's dispatcher as the listener hands it real ones, so an application can test the
code that consumes subscriptions and calls ``rs.sync``. Whatever rowsync would have to read
from the database instead (a row the change does not carry, a relationship re-queried on
each change) raises :class:`NeedsDatabase`, saying what to give it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeAlias, TypeVar

import pytest
import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.orm import ColumnProperty, Mapper, RelationshipProperty

from rowsync import tree
from rowsync.app import RowSync
from rowsync.cache import CachedRow
from rowsync.errors import ConfigurationError, RowsyncError
from rowsync.fetch import RowSource, key_of, qualified_name, table_of, usable_key
from rowsync.graph import Edge
from rowsync.listener import Notice, send_flush
from rowsync.messages import Change, Event, Message, Sync
from rowsync.position import Position
from rowsync.watchers import Assocs, Watcher, assocs_spec

__all__ = ["MemoryEvents", "NeedsDatabase", "Recorder", "WaitFor", "loaded", "one_batch"]

T = TypeVar("T")

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
"""The server used when neither ``$ROWSYNC_TEST_DSN`` nor the ``rowsync_test_dsn`` ini
option names one."""

WaitFor: TypeAlias = Callable[..., Change]
"""``wait_for(model, event=None, *, timeout=5.0, **ids) -> Change``"""


class NeedsDatabase(RowsyncError):
    """rowsync had to read something only the database has, but its rows come from memory."""


# -- waiting for a change -------------------------------------------------------------


class Recorder:
    """Every change ``rs`` delivers from now on, kept until a test waits for it.

    One subscription to every watched table is opened at once, so a change committed
    before :meth:`wait_for` is called is still there when it is. Use it as a context
    manager, or :meth:`close` it.
    """

    def __init__(self, rs: RowSync) -> None:
        self.rs = rs
        models = list(dict.fromkeys(w.model for w in rs.watchers))
        self.sub = rs.subscribe(models[0])
        for model in models[1:]:
            self.sub.add(model)
        self.pending: list[Message] = []
        """Messages received and not taken by a ``wait_for`` yet, oldest first."""

    def wait_for(
        self, model: Any, event: Event | None = None, *, timeout: float = 5.0, **ids: Any
    ) -> Change:
        """The oldest change of ``model`` (and ``event``) whose ids include ``ids``, taken
        from what arrived; waits up to ``timeout`` seconds for it.

        With a started RowSync it flushes first: a change committed before the call is
        there as soon as the flush returns. Raises ``TimeoutError`` listing what arrived
        instead.
        """
        # rowsync's own checks (a watched model, a known event, identifying columns only);
        # the interest adds nothing: every change of the model already arrives here.
        self.sub.add(model, event, **ids)
        table = table_of(model)
        deadline = time.monotonic() + timeout
        if self.rs.running:
            self.rs.flush(timeout)
        self.pending += self.sub.drain()
        while True:
            for i, message in enumerate(self.pending):
                change = message[1]
                if (
                    message[0] is Sync
                    and isinstance(change, Change)
                    and table_of(change.model) is table
                    and event in (None, change.event)
                    and all(change.ids.get(k, _ABSENT) == v for k, v in ids.items())
                ):
                    del self.pending[i]
                    return change
            try:
                self.pending.append(self.sub.get(max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                wanted = " ".join([table.name, event or "changed", *_show(ids)])
                seen = "; ".join(_describe(m) for m in self.pending[-10:]) or "nothing"
                raise TimeoutError(f"no {wanted} within {timeout} s; pending: {seen}") from None

    def close(self) -> None:
        self.sub.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


_ABSENT = object()
_SETTLE = 5.0
"""Seconds an event made up in memory waits for authorizers to rule on it."""


def _show(values: Mapping[str, Any]) -> list[str]:
    return [f"{k}={v!r}" for k, v in values.items()]


def _describe(message: Message) -> str:
    kind, info = message
    if isinstance(info, Change):
        return " ".join([table_of(info.model).name, info.event, *_show(info.ids)])
    return f"{kind!r}({info[0]})"


# -- changes made up in memory --------------------------------------------------------


class MemoryEvents:
    """Row changes made up in memory, delivered to the subscriptions of ``rs`` exactly as
    the listener delivers those of the database, and rows served to ``rs.sync`` from memory.

    ``rs`` is not started, and never reads the database while this object feeds it::

        events = MemoryEvents(rs)
        sub = rs.subscribe(person, assocs=["posts"])
        events.updated(person.posts[0], title="Hello")           # a row of the tree
        events.inserted(Post(id=10, title="New", person_id=1))   # a new row, whole
        events.deleted(Post, id=10, person_id=1)                 # by its identifying columns
        for message in sub.drain():
            person = rs.sync(person, message)

    A row is given as a model object (its loaded column values, then ``values`` over them)
    or as a model (or ``Table``) with ``values`` by attribute or column name. Each event
    carries the identifying columns a trigger would send, so they must be known; the other
    columns of an insert default to NULL (server defaults are not applied). Rows given,
    and the rows loaded below objects given, are remembered as the database's current rows.

    What needs the database raises :class:`NeedsDatabase`: a row joining a tree that loads
    relationships below it (give the object with them loaded: ``Post(..., tags=[])``), a
    change naming a row never given (:meth:`seed` it), a relationship rowsync re-queries
    on each change (a ``secondary`` join, criteria over several tables), and ``rs.resync``.
    Rows of a table that relationships filter with extra criteria say which criteria they
    meet: ``within=[Person.published_posts]`` (or ``within=()``), because rowsync evaluates
    those in SQL.
    """

    def __init__(self, rs: RowSync) -> None:
        if rs.running:
            raise ConfigurationError(
                "MemoryEvents stands in for the database: give it a RowSync that is not started"
            )
        self.rs = rs
        self.rows = _MemoryRows.install(rs)

    def inserted(
        self,
        row: Any,
        /,
        *,
        origin: str | None = None,
        within: Iterable[Any] | None = None,
        **values: Any,
    ) -> None:
        """A row was inserted. Columns not given are NULL."""
        self._emit("inserted", row, origin, within, values)

    def updated(
        self,
        row: Any,
        /,
        *,
        origin: str | None = None,
        within: Iterable[Any] | None = None,
        **values: Any,
    ) -> None:
        """A row was updated to ``values``; given as an object, its loaded values are the
        row before the update (so a foreign key changed by ``values`` moves it)."""
        self._emit("updated", row, origin, within, values)

    def deleted(self, row: Any, /, *, origin: str | None = None, **values: Any) -> None:
        """A row was deleted."""
        self._emit("deleted", row, origin, (), values)

    def seed(self, *objects: Any, within: Iterable[Any] | None = None) -> None:
        """Rows that exist without an event: the database's rows before the test's changes,
        read when a change needs a row it does not carry (the tag a new link points at)."""
        for obj in objects:
            self.rows.remember(obj, self._matches(tree.mapped_table(_mapper(obj)), within))

    def resync(self, reason: str = "reconnect") -> None:
        """Every subscription receives ``(Resync, ResyncInfo(reason, since))``, as after a
        reconnect of the listener."""
        self.rs.dispatcher.gap(reason)
        self.rs.dispatcher.authorizers.wait(_SETTLE)

    def _emit(
        self,
        event: Event,
        row: Any,
        origin: str | None,
        within: Iterable[Any] | None,
        values: Mapping[str, Any],
    ) -> None:
        table = _table(row)
        before, after = self._values(event, table, row, values)
        watcher = self._watcher(table, event)
        ids = _identifying(watcher, after, event)
        old = None
        if event == "updated" and before is not None and set(watcher.columns) <= set(before):
            old = {c: before[c] for c in watcher.columns}
            if old == ids:
                old = None  # as the trigger sends it: identifying columns unchanged
        if not usable_key(table, ids) or (old is not None and not usable_key(table, old)):
            raise ConfigurationError(
                f"{table.name} {' '.join(_show(ids))}: no usable primary key (None, or not of "
                "the column's type); the listener would skip this event"
            )
        if event == "deleted":
            self.rows.forget(table, key_of(table, ids))
        else:
            if old is not None and key_of(table, old) != key_of(table, ids):
                self.rows.forget(table, key_of(table, old))
            self.rows.put(table, after, self._matches(table, within))
            if tree.is_model(row):
                self.rows.remember(row, None, top_row=False)
        schema, name = qualified_name(table)
        notice = Notice(
            ref=next(self.rows.refs),
            schema=schema,
            table=name,
            event=event,
            new=ids,
            old=old,
            label=watcher.label,
            origin=origin,
        )
        self.rs.dispatcher.batch([notice])
        self.rs.dispatcher.authorizers.wait(_SETTLE)  # delivered when this returns, as documented

    def _values(
        self, event: Event, table: sa.Table, row: Any, values: Mapping[str, Any]
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """The row before the event (when known) and after it (for a delete: as it was)."""
        given = _by_column(table, row, values)
        before: dict[str, Any] | None = None
        if tree.is_model(row):
            before = tree.column_values(row)
        elif event != "inserted" and (known := self.rows.current(table, given)) is not None:
            before = dict(known.values)
        if event == "updated" and before is None:
            raise ConfigurationError(
                f"{table.name} {' '.join(_show(given))}: the row before the update decides who "
                "loses it, and it is unknown: pass the object, or seed the row first"
            )
        after = {**(before or {}), **given}
        if event == "inserted":
            after = {c.name: after.get(c.name) for c in table.columns}
        return before, after

    def _watcher(self, table: sa.Table, event: Event) -> Watcher:
        for w in self.rs.watchers:
            if (w.schema, w.table, w.event) == (*qualified_name(table), event):
                return w
        raise ConfigurationError(f"{table.name} {event} is not watched: no trigger would report it")

    def _matches(self, table: sa.Table, within: Iterable[Any] | None) -> frozenset[str] | None:
        """The criteria a row of ``table`` meets (by edge name); None when that is unknown
        and matters."""
        graph = self.rs.graph
        if within is None:
            return None if self.rows.criteria_of(table) else frozenset()
        names = set()
        for attribute in within:
            prop = getattr(attribute, "property", None)
            if not isinstance(prop, RelationshipProperty):
                raise ConfigurationError(f"within takes relationships, not {attribute!r}")
            edge = graph.edge(prop.parent, prop.key)
            if edge.criteria is not None and edge.criteria_table is table:
                names.add(edge.criteria)
        return frozenset(names)


@contextlib.contextmanager
def one_batch(rs: RowSync, timeout: float = 5.0) -> Iterator[None]:
    """Make every change committed in the block reach ``rs``'s dispatch as one batch, then
    wait until it has been dispatched.

    The listener normally hands over whatever has arrived: two back-to-back commits are one
    batch or two depending on timing, and the two paths differ (in one batch, every row is
    read after the last commit). A test that must take one path holds the dispatch::

        with rowsync.testing.one_batch(rs):
            write(move_child)
            write(delete_child)
        # both commits were resolved together; their messages are queued
    """
    with rs.dispatcher.holding() as held:
        yield
        token = uuid.uuid4().hex
        send_flush(rs.connect, rs.channel, token)
        if not held.wait(token, timeout):
            raise TimeoutError(f"the block's commits did not reach the listener in {timeout} s")
    rs.flush(timeout)


def loaded(value: T, assocs: Assocs = ()) -> T:
    """Declare that objects built in memory stand for a query's result loaded with these
    relationships (as ``selectinload`` options would say), and return them.

    ``sync`` gives rows joining a tree what their siblings' loader options load; objects
    built by hand have no loader options, and what is loaded on them (back-references
    included) is a poor guide. ``loaded(people, [{"posts": ["tags"]}])`` says it.
    """
    for obj in tree.as_list(value):
        spec = assocs_spec(_mapper(obj), assocs)
        if missing := _missing(obj, spec):
            raise ConfigurationError(
                f"{obj!r} has {missing} not loaded, which these options load: set it "
                "(an empty list or None if there is nothing)"
            )
        tree.remember_spec(obj, spec)
    return value


def _table(row: Any) -> sa.Table:
    if tree.is_model(row):
        return tree.mapped_table(_mapper(row))
    try:
        return table_of(row)
    except sa.exc.NoInspectionAvailable:
        raise ConfigurationError(f"{row!r} is not a model object, a model or a table") from None


def _mapper(obj: Any) -> Mapper[Any]:
    mapper: Mapper[Any] = sa.inspect(obj).mapper
    return mapper


def _by_column(table: sa.Table, row: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` keyed by column name (attribute names of a mapped class are translated)."""
    mapper = None if isinstance(row, sa.Table) else _mapper(row)
    result = {}
    for key, value in values.items():
        prop = mapper.attrs.get(key) if mapper is not None else None
        if isinstance(prop, ColumnProperty) and isinstance(prop.columns[0], sa.Column):
            result[prop.columns[0].name] = value
        elif key in table.c:
            result[key] = value
        else:
            raise ConfigurationError(f"{table.name!r} has no column or attribute {key!r}")
    return result


def _identifying(watcher: Watcher, row: Mapping[str, Any], event: Event) -> dict[str, Any]:
    if missing := [c for c in watcher.columns if c not in row]:
        raise ConfigurationError(
            f"{watcher.table} {event} events carry {list(watcher.columns)}; {missing} unknown: "
            "give the row as an object, or these columns as keywords"
        )
    return {c: row[c] for c in watcher.columns}


def _missing(obj: Any, spec: tree.LoadSpec) -> str | None:
    """The first relationship path of ``spec`` not loaded on ``obj`` or below it, if any."""
    for key, nested in spec.items():
        value = tree.loaded_value(obj, key)
        if value is tree.NOT_LOADED:
            return key
        for child in tree.as_list(value):
            if (below := _missing(child, nested)) is not None:
                return f"{key}.{below}"
    return None


def _paths(spec: tree.LoadSpec, prefix: str = "") -> list[str]:
    paths = []
    for key, nested in spec.items():
        paths.append(prefix + key)
        paths += _paths(nested, f"{prefix}{key}.")
    return paths


class _MemoryRows(RowSource):
    """Where ``rs`` reads rows while :class:`MemoryEvents` feeds it: from the rows given.

    It replaces the RowSync's row source wherever that is held (dispatcher, router,
    ``sync``), so each read is answered from memory or refused, never sent to a database.
    """

    def __init__(self, rs: RowSync) -> None:
        super().__init__(rs.engine, rs.graph, rs.cache, rs.columns)
        self.known: dict[tuple[sa.Table, tuple[Any, ...]], CachedRow | None] = {}
        """The current row by table and primary key; None once deleted."""
        self.given: dict[tuple[sa.Table, tuple[Any, ...]], Any] = {}
        """Objects given with relationships loaded, for rows joining a tree below them."""
        self.refs = itertools.count(1)

    @classmethod
    def install(cls, rs: RowSync) -> _MemoryRows:
        if isinstance(rs.rows, _MemoryRows):
            return rs.rows
        rows, replaced = cls(rs), rs.rows
        for holder in (rs, *vars(rs).values()):
            for name, value in list(getattr(holder, "__dict__", {}).items()):
                if value is replaced:
                    setattr(holder, name, rows)
        return rows

    # -- what MemoryEvents gives -------------------------------------------------------

    def put(
        self, table: sa.Table, values: Mapping[str, Any], matches: frozenset[str] | None
    ) -> None:
        if matches is None:
            raise ConfigurationError(
                f"{', '.join(self.criteria_of(table))} filter {table.name} rows with criteria "
                "rowsync evaluates in SQL: say which this row meets, within=[...] (or within=())"
            )
        withheld = self.policy.withheld(table)
        kept = {k: v for k, v in values.items() if k not in withheld}
        self.known[(table, key_of(table, kept))] = CachedRow(kept, matches)

    def remember(self, obj: Any, matches: frozenset[str] | None, *, top_row: bool = True) -> None:
        """``obj``'s row (unless ``top_row`` is false) and the rows loaded below it, and every
        one of these objects that has relationships loaded. Below the top, a row of a table
        with criteria is not kept: which criteria it meets is unknown."""
        seen: set[int] = set()

        def walk(node: Any, top: bool) -> None:
            if id(node) in seen:
                return
            seen.add(id(node))
            mapper = _mapper(node)
            table = tree.mapped_table(mapper)
            if top and top_row:
                self.put(table, tree.column_values(node), matches)
            elif not top and not self.criteria_of(table):
                self.put(table, tree.column_values(node), frozenset())
            loaded = [r for r in mapper.relationships if r.key in sa.inspect(node).dict]
            if loaded:
                self.given[(table, tree.primary_key(node))] = node
            for rel in loaded:
                for child in tree.as_list(tree.loaded_value(node, rel.key)):
                    walk(child, False)

        walk(obj, True)

    def forget(self, table: sa.Table, key: tuple[Any, ...]) -> None:
        self.known[(table, key)] = None
        self.given.pop((table, key), None)

    def current(self, table: sa.Table, values: Mapping[str, Any]) -> CachedRow | None:
        """The row given before with the primary key in ``values``, if any."""
        return self.known.get((table, key_of(table, values)))

    def criteria_of(self, table: sa.Table) -> list[str]:
        """The relationships whose extra criteria are evaluated on rows of ``table``."""
        return [
            f"{edge.parent.class_.__name__}.{edge.key}"
            for edge in self.graph.edges
            if edge.criteria is not None and edge.criteria_table is table
        ]

    # -- what rowsync reads ------------------------------------------------------------

    def fetch(
        self, table: sa.Table, keys: Iterable[tuple[Any, ...]], *, hold: bool = False
    ) -> dict[tuple[Any, ...], CachedRow]:
        found = {}
        for key in keys:
            if (table, key) not in self.known:
                raise NeedsDatabase(
                    f"the {table.name} row {key} was never given: seed it (events.seed(obj)) "
                    "or make it with an event"
                )
            if (row := self.known[(table, key)]) is not None:
                found[key] = row
        return found

    def readable(self, table: sa.Table) -> bool:
        return True  # memory refuses no key

    def snapshot(self) -> Position | None:
        return None  # no database: no position can be replayed past a made-up gap

    def row_values(self, table: sa.Table, key: tuple[Any, ...]) -> Mapping[str, Any] | None:
        found = self.fetch(table, [key]).get(key)
        return None if found is None else found.values

    def load(self, mapper: Mapper[Any], key: tuple[Any, ...], spec: tree.LoadSpec, ref: int) -> Any:
        table = tree.mapped_table(mapper)
        if (table, key) in self.known and self.known[(table, key)] is None:
            return None  # deleted: a query would find nothing
        obj = self.given.get((table, key))
        if obj is None or _missing(obj, spec) is not None:
            name, paths = mapper.class_.__name__, _paths(spec)
            raise NeedsDatabase(
                f"{name} {key} joins a tree that loads {', '.join(paths[:4])}"
                f"{', …' if len(paths) > 4 else ''} on it: give the object with those loaded, "
                f"e.g. {name}(..., {paths[0]}=[]) (a tree built in memory: say what a query "
                "would load on it with rowsync.testing.loaded(tree, assocs))"
            )
        copy = tree.clone(obj)
        if (row := self.known.get((table, key))) is not None:
            tree.patch(copy, row.values)
        return copy

    def members(self, edge: Edge, local: tuple[Any, ...]) -> list[Mapping[str, Any]]:
        parent = tree.mapped_table(edge.parent)
        for (table, _), obj in self.given.items():
            if table is parent and edge.local(tree.column_values(obj)) == local:
                value = tree.loaded_value(obj, edge.key)
                if value is not tree.NOT_LOADED:
                    return [tree.column_values(child) for child in tree.as_list(value)]
        name = edge.parent.class_.__name__
        raise NeedsDatabase(
            f"a {name} joined a subscription that follows {name}.{edge.key}: give the object "
            f"with {edge.key} loaded, e.g. {name}(..., {edge.key}=[])"
        )

    def links(self, edge: Edge, target: tuple[Any, ...], ref: int) -> frozenset[tuple[Any, ...]]:
        raise NeedsDatabase(
            f"a {edge.target.class_.__name__} entered the criteria of "
            f"{edge.parent.class_.__name__}.{edge.key}: who links to it is read from the database"
        )

    def reload(
        self,
        edge: Edge,
        parents: Sequence[tuple[Any, ...]],
        spec: tree.LoadSpec,
        strategy: str,
        ref: int,
    ) -> dict[tuple[Any, ...], list[Any]]:
        raise NeedsDatabase(
            f"{edge.parent.class_.__name__}.{edge.key} cannot be decided from one row: "
            "rowsync re-queries it on each change"
        )

    def objects(
        self, mapper: Mapper[Any], keys: Sequence[tuple[Any, ...]], spec: tree.LoadSpec
    ) -> dict[tuple[Any, ...], Any]:
        raise NeedsDatabase("rs.resync re-reads trees from the database")


# -- the pytest plugin ----------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "rowsync_test_dsn",
        "PostgreSQL server on which rowsync's fixtures create a database per test "
        "($ROWSYNC_TEST_DSN wins over it)",
        default=DEFAULT_SERVER,
    )


@pytest.fixture
def rowsync_watchers() -> list[Watcher]:
    """What your application watches. Override it in ``conftest.py``::

    @pytest.fixture
    def rowsync_watchers():
        return rowsync.watchers(Person, assocs=["posts"])
    """
    pytest.fail(
        "rowsync's fixtures need your watchers: define a `rowsync_watchers` fixture in "
        "conftest.py returning rowsync.watchers(YourModel, ...)",
        pytrace=False,
    )


@pytest.fixture
def rowsync_metadata(rowsync_watchers: list[Watcher]) -> list[sa.MetaData]:
    """The tables created in each test database: by default the metadata of the watched
    models. Override it to return your own ``MetaData`` (or a list of them)."""
    return list(dict.fromkeys(table_of(w.model).metadata for w in rowsync_watchers))


@pytest.fixture
def rowsync_options() -> dict[str, Any]:
    """Keyword arguments for ``rowsync_app``'s RowSync (``{"capture": "durable"}``…)."""
    return {}


@pytest.fixture(scope="session")
def rowsync_server(pytestconfig: pytest.Config) -> str:
    """libpq URL of the server: ``$ROWSYNC_TEST_DSN``, else the ``rowsync_test_dsn`` ini
    option, else ``postgresql://postgres@127.0.0.1:5432/postgres``."""
    return os.environ.get("ROWSYNC_TEST_DSN") or str(pytestconfig.getini("rowsync_test_dsn"))


_databases = itertools.count(1)


@pytest.fixture
def rowsync_dsn(rowsync_server: str) -> Iterator[str]:
    """libpq URL of a fresh, empty database for this test, dropped afterwards (after the
    connections left open to it are ended)."""
    try:
        from pytest_postgresql.janitor import DatabaseJanitor
    except ImportError:
        pytest.fail(
            "rowsync's database fixtures need pytest-postgresql: pip install 'rowsync[test]'"
        )
    server = conninfo_to_dict(rowsync_server)
    host = str(server.get("host") or "127.0.0.1")
    name = f"rowsync_{os.getpid()}_{next(_databases)}"
    janitor = DatabaseJanitor(
        user=str(server.get("user") or "postgres"),
        host=host,
        port=int(server.get("port") or 5432),
        dbname=name,
        maintenance_dbname=str(server.get("dbname") or "postgres"),
        password=str(server["password"]) if server.get("password") else None,
    )
    with janitor:
        socket_dir = host.startswith("/")  # goes in the query, a URL's host cannot hold it
        yield sa.URL.create(
            "postgresql",
            username=janitor.user,
            password=janitor.password,
            host=None if socket_dir else host,
            port=int(janitor.port),
            database=name,
            query={"host": host} if socket_dir else {},
        ).render_as_string(hide_password=False)


@pytest.fixture
def rowsync_engine(rowsync_dsn: str, rowsync_metadata: Any) -> Iterator[sa.Engine]:
    """A SQLAlchemy engine (psycopg 3) on this test's database, with ``rowsync_metadata``'s
    tables created; disposed afterwards."""
    engine = sa.create_engine(sa.make_url(rowsync_dsn).set(drivername="postgresql+psycopg"))
    metadata = [rowsync_metadata] if isinstance(rowsync_metadata, sa.MetaData) else rowsync_metadata
    try:
        for each in metadata:
            each.create_all(engine)
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def rowsync_app(
    rowsync_engine: sa.Engine, rowsync_watchers: list[Watcher], rowsync_options: dict[str, Any]
) -> Iterator[RowSync]:
    """A RowSync on this test's database: triggers installed, listener started; stopped
    after the test."""
    rs = RowSync(rowsync_engine, rowsync_watchers, **rowsync_options)
    rs.install()
    with rs:
        yield rs


@pytest.fixture
def rowsync_wait_for(rowsync_app: RowSync) -> Iterator[WaitFor]:
    """``wait_for(model, event=None, *, timeout=5.0, **ids) -> Change`` on ``rowsync_app``
    (see :meth:`Recorder.wait_for`); it hears every change from the test's start."""
    with Recorder(rowsync_app) as recorder:
        yield recorder.wait_for
