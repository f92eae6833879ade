"""Where rows come from: batched reads by primary key, through the bounded cache.

Every read is keyed by the change it serves (``ref``), so N subscribers handling one
change share one query (single-flight), and a change that only needs rows already
fetched by the listener issues none.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import functools
import json
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from psycopg import sql
from psycopg.adapt import Transformer
from psycopg.pq import Format
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import (
    Load,
    Mapper,
    Session,
    immediateload,
    joinedload,
    lazyload,
    selectinload,
    subqueryload,
    with_polymorphic,
)
from sqlalchemy.orm.strategy_options import _AbstractLoad
from sqlalchemy.sql import visitors

from rowsync import tree
from rowsync.cache import GONE, CachedRow, RowCache
from rowsync.columns import ColumnPolicy
from rowsync.errors import ConfigurationError
from rowsync.graph import Edge, Graph
from rowsync.listener import Carried, Layout
from rowsync.pgoutput import UNCHANGED
from rowsync.position import Position

logger = logging.getLogger(__name__)

BATCH = 1000
_LOADERS = {"selectin": selectinload, "joined": joinedload, "subquery": subqueryload}

SNAPSHOT = "SELECT pg_current_snapshot()::text"
_TEXT = 25
"""The oid of ``text``: its loader decodes a text form as the engine's connections do."""


def key_of(table: sa.Table, values: Mapping[str, Any]) -> tuple[Any, ...]:
    """The identity of a row given as a mapping of column names (see :func:`identity`)."""
    names = key_names(table)
    if len(names) == 1:  # most keys: 5x cheaper than building a list
        return (values.get(names[0]),)
    return tuple([values.get(name) for name in names])


@functools.cache
def identity(table: sa.Table) -> tuple[sa.Column[Any], ...]:
    """The columns that identify a row of ``table``: its primary key, or every column of a
    table without one (an association table such as ``followers``). Equal rows of such a
    table are one identity: a change of any column makes the row another one.

    Every column of a table without a primary key must then be compared with ``=`` in SQL
    and hashed in Python, so a type that cannot be (json, arrays) is refused by name.
    """
    if table.primary_key.columns:
        return tuple(table.primary_key.columns)
    if unfit := [c.name for c in table.columns if not _comparable(c.type)]:
        raise ConfigurationError(
            f"table {table.fullname!r} has no primary key, and its columns {unfit} cannot "
            "identify a row (no equality in SQL, or unhashable values): give it a primary key"
        )
    return tuple(table.columns)


def _comparable(kind: sa.types.TypeEngine[Any]) -> bool:
    if isinstance(kind, sa.TypeDecorator):
        kind = kind.impl_instance
    return not isinstance(kind, sa.JSON | sa.ARRAY | sa.PickleType | postgresql.HSTORE)


@functools.cache
def key_names(table: sa.Table) -> tuple[str, ...]:
    """Identifying column names, read once per table: every change and every sync asks."""
    return tuple(c.name for c in identity(table))


@functools.cache
def _python_types(table: sa.Table) -> dict[str, type]:
    """The Python type of each column of ``table`` that declares one, read once per table."""
    found = {}
    for key, column in table.c.items():
        try:
            found[key] = column.type.python_type
        except NotImplementedError:
            continue
    return found


@functools.cache
def _key_types(table: sa.Table) -> tuple[tuple[str, type | None, bool, int], ...]:
    """``(name, Python type or None, nullable, integer bound)`` of each identifying column:
    an integer column holds values whose magnitude is below the bound."""
    types = _python_types(table)
    return tuple(
        (c.name, types.get(c.key), _nullable(c), _integer_bound(c.type)) for c in identity(table)
    )


def _integer_bound(kind: sa.types.TypeEngine[Any]) -> int:
    if isinstance(kind, sa.TypeDecorator):
        kind = kind.impl_instance
    if isinstance(kind, sa.SmallInteger):
        return 1 << 15
    if isinstance(kind, sa.BigInteger) or not isinstance(kind, sa.Integer):
        return 1 << 63
    return 1 << 31


def _nullable(column: sa.Column[Any]) -> bool:
    """Whether an identifying column may hold NULL (one of a table without a primary key)."""
    return bool(column.nullable) and not column.primary_key


def coerce(table: sa.Table, values: Mapping[str, Any]) -> dict[str, Any]:
    """JSON values from a payload as the Python values SQLAlchemy would load (UUIDs, dates…)."""
    result = dict(values)
    types = _python_types(table)
    for name, value in values.items():
        python_type = types.get(name)
        if python_type is None or value is None:
            continue
        if isinstance(value, python_type) and not isinstance(value, bool) or python_type is bool:
            continue
        convert = _FROM_JSON.get(python_type)
        if convert is not None:
            with contextlib.suppress(TypeError, ValueError, ArithmeticError):
                result[name] = convert(value)
    return result


def usable_key(table: sa.Table, values: Mapping[str, Any]) -> bool:
    """Whether ``values`` hold an identity of the right types, that a query can bind (anyone
    may NOTIFY on a channel: a forged or damaged event must not reach a query, let alone a
    tree, nor make the read of the other rows of its batch fail)."""
    for name, python_type, nullable, bound in _key_types(table):
        value = values.get(name)
        if value is None:
            if nullable:  # a column of a table without a primary key
                continue
            return False
        if isinstance(value, bool) and python_type is not bool:
            return False
        if python_type is not None and not isinstance(value, python_type):
            return False
        if isinstance(value, int) and not -bound <= value < bound:
            return False
        if isinstance(value, str) and "\x00" in value:  # no text in Postgres holds one
            return False
    return True


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"not an integer: {value!r}")
    return int(value)


def _to_float(value: Any) -> float:
    """JSON writes a whole float without its fraction (``1``), and NaN or infinity as text."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


_FROM_JSON: dict[type, Any] = {
    uuid.UUID: uuid.UUID,
    datetime.datetime: datetime.datetime.fromisoformat,
    datetime.date: datetime.date.fromisoformat,
    datetime.time: datetime.time.fromisoformat,
    decimal.Decimal: lambda v: decimal.Decimal(str(v)),
    int: _to_int,
    float: _to_float,
}


JSON_TYPES = frozenset({*_FROM_JSON, str, bool, list, dict})
"""Types of the values :func:`coerce` makes of a payload's: a row's value of one of them can
be compared with the payload's."""


def table_of(model: Any) -> sa.Table:
    if isinstance(model, sa.Table):
        return model
    if isinstance(model, type):
        return _class_table(model)
    return tree.mapped_table(sa.inspect(model))


@functools.cache
def _class_table(model: type) -> sa.Table:
    """A mapped class's table, inspected once (every message names its model)."""
    return tree.mapped_table(sa.inspect(model))


def qualified_name(table: sa.Table) -> tuple[str, str]:
    """``(schema, table)`` as events name it (the schema defaults to ``public``)."""
    return (table.schema or "public", table.name)


def _where_key(
    entity: sa.Table | Mapper[Any], keys: Sequence[tuple[Any, ...]]
) -> sa.ColumnElement[bool]:
    """Rows of a table, or objects of a mapper (by its identity's key), whose key is in
    ``keys``."""
    pk = list(entity.primary_key.columns if isinstance(entity, sa.Table) else entity.primary_key)
    return _key_in(pk, keys)


def _key_in(
    columns: Sequence[sa.ColumnElement[Any]], keys: Sequence[tuple[Any, ...]]
) -> sa.ColumnElement[bool]:
    """Whether the identifying ``columns`` hold one of ``keys``."""
    if len(columns) == 1:
        return columns[0].in_([k[0] for k in keys])
    return sa.tuple_(*columns).in_(keys)


@functools.cache
def whole(mapper: Mapper[Any]) -> Any:
    """An entity loading each row of ``mapper`` as its own class with every column of that
    class (a joined subclass's table joined, a single-table subclass's columns selected), and
    reaching each subclass's relationships (``entity.Engineer.machines``): what a user's
    ``with_polymorphic``/``of_type`` loads, and rowsync cannot tell from a loaded object
    which of them loaded it, so it loads every object whole wherever it is. Flat: it may be
    joined below another entity (a ``joinedload``) of the same table."""
    return with_polymorphic(mapper, "*", flat=True)


def _parts(mapper: Mapper[Any], entity: Any) -> list[tuple[Mapper[Any], Any]]:
    """``(mapper, entity)`` of every class ``entity`` (:func:`whole` of ``mapper``) loads."""
    rest = list(mapper.self_and_descendants)[1:]
    return [(mapper, entity), *((m, getattr(entity, m.class_.__name__)) for m in rest)]


def _key_columns(mapper: Mapper[Any], entity: Any) -> list[sa.ColumnElement[Any]]:
    """``mapper``'s identifying columns as ``entity`` selects them."""
    return [getattr(entity, mapper.get_property_by_column(c).key) for c in mapper.primary_key]


def _unloaded(mapper: Mapper[Any], entity: Any, policy: ColumnPolicy) -> list[_AbstractLoad]:
    """Options leaving the withheld columns of every class ``entity`` loads unloaded."""
    return [option for m, part in _parts(mapper, entity) for option in policy.defer(m, part)]


def _options(
    mapper: Mapper[Any], entity: Any, spec: tree.LoadSpec, policy: ColumnPolicy
) -> list[_AbstractLoad]:
    """Options below ``entity`` (:func:`whole` of ``mapper``) loading exactly a LoadSpec, so
    new objects look like their siblings: each relationship of the spec that ``mapper`` or a
    subclass of it has (a spec names the relationships of every class a place holds) with
    selectinload, its objects loaded whole, with the withheld columns of every level
    unloaded; one it never fills with ``noload``, as the user's own option or default did.
    Every other relationship loads as if by no option, except that an eager ``lazy=``
    default does not load: the spec holds the defaults a query's own options left on."""
    options: list[_AbstractLoad] = []
    for owner, part in _parts(mapper, entity):
        for rel in owner.relationships:
            if owner is not mapper and rel.parent is not owner:
                continue  # reached through the class that declares it
            attribute = getattr(part, rel.key)
            if spec.get(rel.key) is tree.NEVER_FILLED:
                options.append(_noload(part, attribute))
            elif rel.key in spec:
                options.append(_loaded(selectinload, attribute, rel.mapper, spec[rel.key], policy))
            elif rel.lazy in tree.EAGER:
                options.append(lazyload(attribute))
    return options


def _noload(entity: Any, attribute: Any) -> _AbstractLoad:
    """``noload(attribute)`` without the deprecation warning SQLAlchemy 2.1 gives each call of
    the public function: the user chose the strategy, rowsync repeats it where it loads."""
    return Load(entity)._set_relationship_strategy(attribute, {"lazy": "noload"})


def _loaded(
    loader: Any, attribute: Any, target: Mapper[Any], spec: tree.LoadSpec, policy: ColumnPolicy
) -> _AbstractLoad:
    """``loader`` of the relationship ``attribute``, its objects (of ``target``) loaded whole
    with ``spec`` below them."""
    entity = whole(target)
    option: _AbstractLoad = loader(attribute.of_type(entity))
    return option.options(
        *_unloaded(target, entity, policy), *_options(target, entity, spec, policy)
    )


@dataclass(frozen=True)
class _RowQuery:
    """The listener's read of one table, built and compiled once: its columns, then one
    boolean per criteria, for a list of identities bound as one parameter."""

    statement: sa.Select[Any]
    names: tuple[str, ...]
    """Column names of the selected columns, in order."""
    criteria: tuple[str, ...]
    """Names of the criteria booleans that follow them."""
    single: bool
    """A one-column key: bound as a list of values, else as a list of tuples."""
    nullable: tuple[sa.Column[Any], ...] = ()
    """The identity of a table without a primary key, some of whose columns may be NULL
    (where ``=`` never holds): then ``statement`` has no WHERE, :meth:`select` adds one."""

    @classmethod
    def of(cls, table: sa.Table, policy: ColumnPolicy, graph: Graph) -> _RowQuery:
        columns = policy.columns(table)
        criteria = graph.criteria.get(table, ())
        pk = list(identity(table))
        single = len(pk) == 1
        statement = sa.select(*columns, *(clause.label(name) for name, clause in criteria))
        names = tuple(c.name for c in columns)
        if any(_nullable(c) for c in pk):
            return cls(statement, names, tuple(name for name, _ in criteria), single, tuple(pk))
        where: sa.ColumnElement[bool]
        if single and _array_safe(pk[0].type):  # one parameter: one statement, prepared once
            where = pk[0] == sa.any_(sa.bindparam("keys", type_=postgresql.ARRAY(pk[0].type)))
        elif single:
            where = pk[0].in_(sa.bindparam("keys", expanding=True))
        else:
            where = sa.tuple_(*pk).in_(sa.bindparam("keys", expanding=True))
        return cls(statement.where(where), names, tuple(name for name, _ in criteria), single)

    def select(self, keys: list[tuple[Any, ...]]) -> tuple[sa.Select[Any], dict[str, Any]]:
        """The statement reading ``keys``, and its parameters."""
        if not self.nullable:
            return self.statement, {"keys": [k[0] for k in keys] if self.single else keys}
        exact = [k for k in keys if all(v is not None for v in k)]
        where: list[sa.ColumnElement[bool]] = (
            [sa.tuple_(*self.nullable).in_(exact)] if exact else []
        )
        for key in keys:
            if any(v is None for v in key):
                pairs = zip(self.nullable, key, strict=True)
                where.append(sa.and_(*(c.is_(None) if v is None else c == v for c, v in pairs)))
        return self.statement.where(sa.or_(*where)), {}


_NO_MATCHES: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class _Judge:
    """A table's criteria evaluated by Postgres on rows given as values, not read from the
    table: each row a JSON object of the text forms of the columns the criteria read, made a
    row of the table's own type by ``json_populate_record`` (each text through its type's
    input function, as the row was stored), the criteria adapted to that row. One statement
    per table, for any number of rows: the same semantics as the read's (NULLs, collations,
    casts, operators of the column types), no query of the table."""

    statement: sa.Select[*tuple[Any, ...]]
    """One row per given row, in their order: the criteria booleans."""
    criteria: tuple[str, ...]
    """Names of the criteria booleans, in the order of the statement's columns."""
    columns: frozenset[str]
    """Columns of the table the criteria read."""

    @classmethod
    def of(
        cls, table: sa.Table, criteria: Sequence[tuple[str, sa.ColumnElement[bool]]]
    ) -> _Judge | None:
        """None when a criterion needs more than the row's own values: a subquery (other
        rows), text or a column that is not one of ``table``'s (what it names is unknown)."""
        read: set[str] = set()
        for _, clause in criteria:
            for element in visitors.iterate(clause):
                if isinstance(element, sa.Column) and element.table is table:
                    read.add(element.name)
                elif isinstance(element, _NOT_JUDGED):
                    return None
        rows = sa.cast(sa.bindparam("rows", type_=sa.Text), postgresql.JSON)
        given = sa.func.json_array_elements(rows).table_valued("value", with_ordinality="n")
        given = given.render_derived()
        typed: sa.ColumnElement[Any] = sa.literal_column(
            sql.SQL("NULL::{}").format(_identifier(table)).as_string()
        )  # a NULL of the table's row type: json_populate_record makes rows of that type
        row = sa.func.json_populate_record(typed, given.c.value)
        record = row.table_valued(*(sa.column(c.name, c.type) for c in table.columns)).lateral()

        def adapted(element: Any, **kw: Any) -> Any:
            if isinstance(element, sa.Column) and element.table is table:
                return record.c[element.name]
            return None

        statement = (
            sa.select(
                *(visitors.replacement_traverse(c, {}, adapted).label(n) for n, c in criteria)
            )
            .select_from(given.join(record, sa.true()))
            .order_by(given.c.n)
        )
        return cls(statement, tuple(name for name, _ in criteria), frozenset(read))


_NOT_JUDGED = (
    sa.sql.expression.ColumnClause,  # after the table's own columns: any other column
    sa.sql.expression.TextClause,
    sa.sql.expression.FromClause,
    sa.sql.expression.SelectBase,
    sa.sql.expression.ScalarSelect,
)
"""Elements a criterion may hold that the row's own values cannot evaluate."""


def _identifier(table: sa.Table) -> sql.Identifier:
    """``table`` named as SQLAlchemy names it in a query (unqualified without a schema)."""
    return (
        sql.Identifier(table.name)
        if table.schema is None
        else sql.Identifier(table.schema, table.name)
    )


_JSON_BASED = """
    WITH RECURSIVE t(oid, base) AS (
        SELECT oid, oid FROM pg_type WHERE oid = ANY(%s)
        UNION ALL
        SELECT t.oid, p.typbasetype FROM t JOIN pg_type p ON p.oid = t.base WHERE p.typtype = 'd'
    )
    SELECT oid FROM t WHERE base IN ('json'::regtype, 'jsonb'::regtype)
"""
"""Which of a list of type oids are json or jsonb, or domains over them: ``json_populate_record``
takes their values as JSON, not as text for the type's input function."""


@dataclass(frozen=True, slots=True)
class _Plan:
    """What :meth:`RowSource.built` needs to build one table's rows from one layout."""

    complete: bool
    """False: the rows cannot be built (criteria that need the table), they are read."""
    columns: tuple[tuple[str, int, Callable[[bytes], Any], Callable[[Any], Any] | None], ...]
    """Each readable column carried: name, index in the carried values, text loader, result
    processor."""
    missing: tuple[str, ...]
    """Readable columns not carried (not published): known only from an earlier row."""
    judge: _Judge | None = None
    """The table's criteria, evaluated on the carried rows (:meth:`RowSource.judge`)."""
    judged: tuple[tuple[str, int, bool], ...] = ()
    """Each column the criteria read: its name as a JSON string followed by ``:``, its index
    in the carried values, and whether its type is json-based (its text is then JSON)."""


def _array_safe(kind: Any) -> bool:
    """Key types that travel as one array parameter as is (an Enum, say, is bound one by one:
    an array of it needs its own type in the database)."""
    return isinstance(kind, sa.Integer | sa.Uuid) or (
        isinstance(kind, sa.String) and not isinstance(kind, sa.Enum)
    )


class RowSource:
    """Reads rows for the listener, the router and ``sync``, counting queries."""

    def __init__(
        self, engine: sa.Engine, graph: Graph, cache: RowCache, policy: ColumnPolicy
    ) -> None:
        self.engine = engine
        self.graph = graph
        self.cache = cache
        self.policy = policy
        self.queries: Counter[str] = Counter()
        self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        """Row reads are single statements: in autocommit, one round trip each, where a
        transaction would add a BEGIN and a ROLLBACK."""
        self._row_queries: dict[sa.Table, _RowQuery] = {}
        self._text_loaders: dict[int, Callable[[bytes], Any]] = {}
        self._plans: dict[tuple[sa.Table, Layout], _Plan] = {}
        self._judges: dict[sa.Table, _Judge | None] = {}
        self._held: sa.Connection | None = None
        self._holding = threading.Lock()

    # -- the listener: one query per table per batch -----------------------------------

    def fetch(
        self, table: sa.Table, keys: Iterable[tuple[Any, ...]], *, hold: bool = False
    ) -> dict[tuple[Any, ...], CachedRow]:
        """Current rows of ``table`` for ``keys``, with their criteria computed; missing keys
        are absent.

        ``hold``: read on a connection kept from call to call (the listener's batches: a
        pool checkout each, with its pre-ping round trip, would be most of a small batch's
        latency). It is dropped after any error, so the next call starts on a sound one,
        and given back by :meth:`release`.
        """
        with self._reading(hold) as conn:
            return self._fetch(conn, table, keys)

    @contextlib.contextmanager
    def _reading(self, hold: bool) -> Iterator[sa.Connection]:
        """A connection of the reader: the held one (see :meth:`fetch`), or one of its own."""
        if not hold:
            with self._reader.connect() as conn:
                yield conn
            return
        with self._holding:
            if self._held is None:
                self._held = self._reader.connect()
            try:
                yield self._held
            except Exception:
                held, self._held = self._held, None
                with contextlib.suppress(Exception):
                    held.invalidate()
                    held.close()
                raise

    def readable(self, table: sa.Table) -> bool:
        """Whether the listener's read of ``table`` runs at all, for no key: when it does, a
        read that failed was refused one of its keys (the dispatcher then finds which)."""
        query = self._row_query(table)
        try:
            with self._reader.connect() as conn:
                conn.execute(query.statement.limit(0), {} if query.nullable else {"keys": []})
        except (sa.exc.ProgrammingError, sa.exc.DataError):
            return False
        return True

    def snapshot(self) -> Position | None:
        """A snapshot taken now, or None when the database cannot give one."""
        try:
            with self.engine.connect() as conn:
                return Position.of(conn.execute(sa.text(SNAPSHOT)).scalar_one())
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("cannot take a snapshot: %s", exc)
            return None

    def release(self, timeout: float = 5.0) -> None:
        """Give back the held connection (unless a fetch still runs on it after ``timeout``
        seconds: then it goes when that fetch ends in an error, or with the next release)."""
        if not self._holding.acquire(timeout=timeout):
            return
        try:
            held, self._held = self._held, None
            if held is not None:
                held.close()
        finally:
            self._holding.release()

    def _fetch(
        self, conn: sa.Connection, table: sa.Table, keys: Iterable[tuple[Any, ...]]
    ) -> dict[tuple[Any, ...], CachedRow]:
        query = self._row_query(table)
        names, criteria = query.names, query.criteria
        width = len(names)
        wanted = list(dict.fromkeys(keys))
        found: dict[tuple[Any, ...], CachedRow] = {}
        for start in range(0, len(wanted), BATCH):
            chunk = wanted[start : start + BATCH]
            self.queries["rows"] += 1
            # all(): one fetch from the driver, where iterating fetches row by row
            for row in conn.execute(*query.select(chunk)).all():
                values = dict(zip(names, row, strict=False))
                matches = (
                    frozenset(name for name, hit in zip(criteria, row[width:], strict=True) if hit)
                    if criteria
                    else _NO_MATCHES
                )
                found[key_of(table, values)] = CachedRow(values, matches)
        return found

    def _row_query(self, table: sa.Table) -> _RowQuery:
        query = self._row_queries.get(table)
        if query is None:
            query = self._row_queries[table] = _RowQuery.of(table, self.policy, self.graph)
        return query

    # -- rows the WAL carried ----------------------------------------------------------

    def built(
        self, table: sa.Table, carried: Carried, earlier: Mapping[str, Any] | None = None
    ) -> CachedRow | None:
        """The row :meth:`fetch` would read, from a row the WAL carried (Postgres' text form),
        with no query; None when that cannot be told without one: a readable column neither
        carried nor in ``earlier`` (values already loaded), or criteria that need the table
        (:class:`_Judge`) or a value not carried. The criteria it meets are not in it: they
        are evaluated for every row of a batch at once (:meth:`judge`).

        Each value goes through the two steps a query's result takes: the loader psycopg
        picks for its type on the engine's connections (the engine's adapters, its sessions'
        time zone), then the column type's result processor, as SQLAlchemy applies it (enums,
        ``TypeDecorator`` types, arrays, JSON). Withheld columns are never loaded. Which
        column of the carried row each readable one is, with its loader and processor, is
        worked out once per table and layout (:meth:`_plan`): this runs for every change."""
        plan = self._plans.get((table, carried.layout))
        if plan is None:
            plan = self._plans[(table, carried.layout)] = self._plan(table, carried.layout)
        if not plan.complete:
            return None
        texts = carried.values
        for _, i, json_based in plan.judged:
            text = texts[i]
            if text is UNCHANGED:
                return None  # not sent: its text is not known
            if json_based and isinstance(text, bytes) and text.strip() == b"null":
                return None  # a JSON null: json_populate_record would take it for NULL
        values: dict[str, Any] = {}
        for name in plan.missing:
            if earlier is None or name not in earlier:
                return None
            values[name] = earlier[name]
        for name, i, load, process in plan.columns:
            text = texts[i]
            if text is UNCHANGED:
                if earlier is None or name not in earlier:
                    return None
                values[name] = earlier[name]
                continue
            value = None if text is None else load(text)  # type: ignore[arg-type]
            values[name] = value if process is None else process(value)
        return CachedRow(values, _NO_MATCHES)

    def _plan(self, table: sa.Table, layout: Layout) -> _Plan:
        """How :meth:`built` makes ``table``'s readable columns from rows of ``layout``: each
        carried one's index in the values, its text loader and the result processor
        SQLAlchemy applies for that column type and oid; the names of those not carried."""
        index = {name: i for i, name in enumerate(layout.names)}
        judge = judged = None
        if criteria := self.graph.criteria.get(table):
            if table not in self._judges:
                self._judges[table] = _Judge.of(table, criteria)
            judge = self._judges[table]
            if judge is None or not judge.columns <= index.keys():
                return _Plan(False, (), ())
            judged = self._judged_columns(layout, [index[n] for n in sorted(judge.columns)])
        columns = []
        missing = []
        for column in self.policy.columns(table):
            i = index.get(column.name)
            if i is None:
                missing.append(column.name)
                continue
            load, process = self._steps(column, layout.oids[i])
            columns.append((column.name, i, load, process))
        return _Plan(True, tuple(columns), tuple(missing), judge, judged or ())

    def _steps(
        self, column: sa.Column[Any], oid: int
    ) -> tuple[Callable[[bytes], Any], Callable[[Any], Any] | None]:
        """The two steps a query's result takes for ``column`` sent as type ``oid``: the text
        loader psycopg picks on the engine's connections, then the result processor
        SQLAlchemy applies for the column's type (None: none)."""
        process = column.type._cached_result_processor(self.engine.dialect, oid)
        return self._text_loader(oid), process

    def loaders(self, table: sa.Table, layout: Layout) -> tuple[Callable[[bytes], Any], ...]:
        """For each column of ``layout``, what makes its text the value a read of ``table``
        gives (:meth:`_steps`; a column ``table`` does not map: its text loader alone). The
        WAL's identifying values are loaded with them, so a change routes with the values
        its row has, whether that row is built or read."""
        columns = {c.name: c for c in table.columns}
        found: list[Callable[[bytes], Any]] = []
        for name, oid in zip(layout.names, layout.oids, strict=True):
            column = columns.get(name)
            if column is None:
                found.append(self._text_loader(oid))
                continue
            load, process = self._steps(column, oid)
            found.append(load if process is None else functools.partial(_processed, load, process))
        return tuple(found)

    def _judged_columns(
        self, layout: Layout, indexes: list[int]
    ) -> tuple[tuple[str, int, bool], ...]:
        """:attr:`_Plan.judged` of the columns at ``indexes`` of ``layout``."""
        with self._reader.connect() as conn:
            found = conn.exec_driver_sql(_JSON_BASED, ([layout.oids[i] for i in indexes],))
            json_based = {oid for (oid,) in found}
        return tuple(
            (json.dumps(layout.names[i]) + ":", i, layout.oids[i] in json_based) for i in indexes
        )

    def has_criteria(self, table: sa.Table) -> bool:
        """Whether rows of ``table`` built from the WAL need :meth:`judge`."""
        return table in self.graph.criteria

    def judge(self, table: sa.Table, carried: Sequence[Carried]) -> list[frozenset[str]] | None:
        """Which criteria each of ``carried`` (rows :meth:`built` could build) meets, in one
        query that reads no table (:class:`_Judge`); None when Postgres refused it (a text
        its column's type no longer takes, a criterion failing on a value): the rows are
        then read, and the read tells what is wrong, as in the other modes."""
        parts = []
        text = self._text_loader(_TEXT)
        for row in carried:
            plan = self._plans[(table, row.layout)]
            values = row.values
            members = [
                prefix + (text(value) if json_based else json.dumps(text(value)))
                for prefix, i, json_based in plan.judged
                if isinstance(value := values[i], bytes)  # NULL: left out (never UNCHANGED here)
            ]
            parts.append("{" + ",".join(members) + "}")
        judge = self._judges[table]
        assert judge is not None
        self.queries["criteria"] += 1
        try:
            with self._reading(True) as conn:
                found = conn.execute(judge.statement, {"rows": "[" + ",".join(parts) + "]"}).all()
        except (sa.exc.ProgrammingError, sa.exc.DataError) as exc:
            logger.warning(
                "cannot evaluate criteria of %s on rows: %s", table.name, exc.orig or exc
            )
            return None
        if len(found) != len(carried):
            return None
        names = judge.criteria
        return [
            frozenset(name for name, hit in zip(names, verdict, strict=True) if hit)
            for verdict in found
        ]

    def _text_loader(self, oid: int) -> Callable[[bytes], Any]:
        load = self._text_loaders.get(oid)
        if load is None:
            with self._reader.connect() as conn:
                driver = conn.connection.driver_connection
                load = Transformer(driver).get_loader(oid, Format.TEXT).load
            self._text_loaders[oid] = load
        return load

    # -- sync and the router: single-flight through the cache --------------------------

    def row(self, table: sa.Table, key: tuple[Any, ...], ref: int) -> CachedRow | Any:
        def load() -> CachedRow | Any:
            return self.fetch(table, [key]).get(key, GONE)

        return self.cache.load((table, key, ref), load)

    def links(self, edge: Edge, target: tuple[Any, ...], ref: int) -> frozenset[tuple[Any, ...]]:
        """Parent keys linked to a target row through ``edge``'s association table."""
        assert edge.secondary is not None

        def load() -> frozenset[tuple[Any, ...]]:
            where = [s == v for (s, _), v in zip(edge.target_pairs, target, strict=True)]
            stmt = sa.select(*(r for _, r in edge.pairs)).where(*where)
            self.queries["links"] += 1
            with self.engine.connect() as conn:
                return frozenset(tuple(r) for r in conn.execute(stmt))

        return self.cache.load(("links", edge, target, ref), load)

    def load(self, mapper: Mapper[Any], key: tuple[Any, ...], spec: tree.LoadSpec, ref: int) -> Any:
        """A detached object with ``spec`` loaded, fetched once per change; callers clone it."""

        def fetch() -> Any:
            with Session(self.engine, expire_on_commit=False) as session:
                found = self._load(session, mapper, [key], spec)
                return found[0] if found else None

        return self.cache.load(("object", mapper, key, _freeze(spec), ref), fetch)

    def _load(
        self,
        session: Session,
        mapper: Mapper[Any],
        keys: Sequence[tuple[Any, ...]],
        spec: tree.LoadSpec,
    ) -> list[Any]:
        """The rows ``keys`` as a query of ``mapper`` returns them (a row of another class of
        its hierarchy is not one of them), each as its own class, loaded whole with ``spec``
        (see :func:`whole`)."""
        self.queries["objects"] += 1
        entity = whole(mapper)
        stmt = sa.select(entity).where(_key_in(_key_columns(mapper, entity), keys))
        options = [
            *_unloaded(mapper, entity, self.policy),
            *_options(mapper, entity, spec, self.policy),
        ]
        return list(session.scalars(stmt.options(*options)).unique())

    def reload(
        self,
        edge: Edge,
        parents: Sequence[tuple[Any, ...]],
        spec: tree.LoadSpec,
        strategy: str,
        ref: int,
    ) -> dict[tuple[Any, ...], list[Any]]:
        """``edge``'s collection for each parent key, exactly as SQLAlchemy loads it with
        ``strategy`` (selectin keeps a row reached twice twice; joined and lazy do not)."""

        def fetch() -> dict[tuple[Any, ...], list[Any]]:
            self.queries["reload"] += 1
            mapper = edge.parent
            loader = _LOADERS.get(strategy, immediateload)
            attribute = getattr(mapper.class_, edge.key)
            option = _loaded(loader, attribute, edge.target, spec, self.policy)
            with Session(self.engine, expire_on_commit=False) as session:
                where = _where_key(mapper, parents)
                stmt = sa.select(mapper).where(where).options(*self.policy.defer(mapper), option)
                found = session.scalars(stmt).unique()
                return {
                    tree.primary_key(p): tree.as_list(tree.loaded_value(p, edge.key)) for p in found
                }

        return self.cache.load(
            ("reload", edge, tuple(parents), _freeze(spec), strategy, ref), fetch
        )

    def objects(
        self, mapper: Mapper[Any], keys: Sequence[tuple[Any, ...]], spec: tree.LoadSpec
    ) -> dict[tuple[Any, ...], Any]:
        """Detached objects by primary key with ``spec`` loaded, ``BATCH`` keys per query."""
        found: dict[tuple[Any, ...], Any] = {}
        with Session(self.engine, expire_on_commit=False) as session:
            for start in range(0, len(keys), BATCH):
                for obj in self._load(session, mapper, keys[start : start + BATCH], spec):
                    found[tree.primary_key(obj)] = obj
        return found

    # -- the router's Resolver ---------------------------------------------------------

    def members(self, edge: Edge, local: tuple[Any, ...]) -> list[Mapping[str, Any]]:
        target = edge.target_table
        stmt = sa.select(*self.policy.columns(target))
        if edge.secondary is not None:
            on = sa.and_(*(s == t for s, t in edge.target_pairs))
            stmt = stmt.select_from(edge.secondary.join(target, on))
        stmt = stmt.where(*(r == v for (_, r), v in zip(edge.pairs, local, strict=True)))
        self.queries["members"] += 1
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def row_values(self, table: sa.Table, key: tuple[Any, ...]) -> Mapping[str, Any] | None:
        found = self.fetch(table, [key]).get(key)
        return None if found is None else found.values


def _processed(load: Callable[[bytes], Any], process: Callable[[Any], Any], text: bytes) -> Any:
    return process(load(text))


def _freeze(spec: tree.LoadSpec) -> tuple[Any, ...]:
    return tuple(
        sorted((k, None if v is tree.NEVER_FILLED else _freeze(v)) for k, v in spec.items())
    )
