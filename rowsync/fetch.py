"""Where rows come from: batched reads by primary key, through the bounded cache.

Every read is keyed by the change it serves (``ref``), so N subscribers handling one
change share one query (single-flight), and a change that only needs rows already
fetched by the listener issues none.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapper, Session, immediateload, joinedload, selectinload, subqueryload
from sqlalchemy.orm.strategy_options import _AbstractLoad

from rowsync import tree
from rowsync.cache import GONE, CachedRow, RowCache
from rowsync.columns import ColumnPolicy
from rowsync.graph import Edge, Graph
from rowsync.messages import Change

logger = logging.getLogger(__name__)

BATCH = 1000
_LOADERS = {"selectin": selectinload, "joined": joinedload, "subquery": subqueryload}


def key_of(table: sa.Table, values: Mapping[str, Any]) -> tuple[Any, ...]:
    """The primary key tuple of a row given as a mapping of column names."""
    return tuple(values.get(c.name) for c in table.primary_key.columns)


def coerce(table: sa.Table, values: Mapping[str, Any]) -> dict[str, Any]:
    """JSON values from a payload as the Python values SQLAlchemy would load (UUIDs, dates…)."""
    result = dict(values)
    for name, value in values.items():
        column = table.c.get(name)
        if column is None or value is None:
            continue
        try:
            python_type = column.type.python_type
        except NotImplementedError:
            continue
        if isinstance(value, python_type) and not isinstance(value, bool) or python_type is bool:
            continue
        convert = _FROM_JSON.get(python_type)
        if convert is not None:
            with contextlib.suppress(TypeError, ValueError, ArithmeticError):
                result[name] = convert(value)
    return result


def usable_key(table: sa.Table, values: Mapping[str, Any]) -> bool:
    """Whether ``values`` hold a primary key of the right types (anyone may NOTIFY on a
    channel: a forged or damaged event must not reach a query, let alone a tree)."""
    for column in table.primary_key.columns:
        value = values.get(column.name)
        if value is None or (isinstance(value, bool) and not _is_bool(column)):
            return False
        try:
            python_type = column.type.python_type
        except NotImplementedError:
            continue
        if not isinstance(value, python_type):
            return False
    return True


def _is_bool(column: sa.Column[Any]) -> bool:
    try:
        return column.type.python_type is bool
    except NotImplementedError:
        return False


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"not an integer: {value!r}")
    return int(value)


_FROM_JSON: dict[type, Any] = {
    uuid.UUID: uuid.UUID,
    datetime.datetime: datetime.datetime.fromisoformat,
    datetime.date: datetime.date.fromisoformat,
    datetime.time: datetime.time.fromisoformat,
    decimal.Decimal: lambda v: decimal.Decimal(str(v)),
    int: _to_int,
}


def table_of(model: Any) -> sa.Table:
    return model if isinstance(model, sa.Table) else tree.mapped_table(sa.inspect(model))


def qualified_name(table: sa.Table) -> tuple[str, str]:
    """``(schema, table)`` as events name it (the schema defaults to ``public``)."""
    return (table.schema or "public", table.name)


def _where_key(table: sa.Table, keys: Sequence[tuple[Any, ...]]) -> sa.ColumnElement[bool]:
    pk = list(table.primary_key.columns)
    if len(pk) == 1:
        return pk[0].in_([k[0] for k in keys])
    return sa.tuple_(*pk).in_(keys)


def _options(mapper: Mapper[Any], spec: tree.LoadSpec, policy: ColumnPolicy) -> list[_AbstractLoad]:
    """selectinload options reproducing a LoadSpec, so new objects look like their siblings,
    with the withheld columns of every level left unloaded."""
    options: list[_AbstractLoad] = []
    for key, nested in spec.items():
        rel = mapper.relationships[key]
        option = selectinload(getattr(mapper.class_, key))
        sub = [*policy.defer(rel.mapper), *_options(rel.mapper, nested, policy)]
        options.append(option.options(*sub) if sub else option)
    return options


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

    # -- the listener: one query per table per batch -----------------------------------

    def fetch(
        self, table: sa.Table, keys: Iterable[tuple[Any, ...]]
    ) -> dict[tuple[Any, ...], CachedRow]:
        """Current rows of ``table`` for ``keys``, with their criteria computed; missing keys
        are absent."""
        criteria = self.graph.criteria.get(table, ())
        labels = [clause.label(name) for name, clause in criteria]
        wanted = list(dict.fromkeys(keys))
        found: dict[tuple[Any, ...], CachedRow] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(wanted), BATCH):
                chunk = wanted[start : start + BATCH]
                self.queries["rows"] += 1
                columns = self.policy.columns(table)
                stmt = sa.select(*columns, *labels).where(_where_key(table, chunk))
                for row in conn.execute(stmt).mappings():
                    values = {c.name: row[c] for c in columns}
                    matches = frozenset(name for name, _ in criteria if row[name])
                    found[key_of(table, values)] = CachedRow(values, matches)
        return found

    # -- sync and the router: single-flight through the cache --------------------------

    def change_row(self, change: Change) -> CachedRow | Any:
        """The row a change left behind (``GONE`` when it no longer exists)."""
        table = table_of(change.model)
        return self.row(table, key_of(table, change.ids), change.ref)

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
            self.queries["objects"] += 1
            with Session(self.engine, expire_on_commit=False) as session:
                pk = tree.mapped_table(mapper).primary_key.columns
                stmt = sa.select(mapper).where(*(c == v for c, v in zip(pk, key, strict=False)))
                options = [*self.policy.defer(mapper), *_options(mapper, spec, self.policy)]
                return session.scalars(stmt.options(*options)).one_or_none()

        return self.cache.load(("object", mapper, key, _freeze(spec), ref), fetch)

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
            option = loader(getattr(mapper.class_, edge.key))
            if sub := [*self.policy.defer(edge.target), *_options(edge.target, spec, self.policy)]:
                option = option.options(*sub)
            with Session(self.engine, expire_on_commit=False) as session:
                where = _where_key(tree.mapped_table(mapper), parents)
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
                self.queries["objects"] += 1
                where = _where_key(tree.mapped_table(mapper), keys[start : start + BATCH])
                stmt = sa.select(mapper).where(where)
                options = [*self.policy.defer(mapper), *_options(mapper, spec, self.policy)]
                for obj in session.scalars(stmt.options(*options)).unique():
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


def _freeze(spec: tree.LoadSpec) -> tuple[Any, ...]:
    return tuple(sorted((k, _freeze(v)) for k, v in spec.items()))
