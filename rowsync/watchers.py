"""Watchers: which tables and events to capture, derived from SQLAlchemy mappers.

A :class:`Watcher` is one trigger to install: a table, an event and the identifying
columns its notifications carry (primary key, foreign keys, ``extra_columns``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import sqlalchemy as sa
from sqlalchemy.ext.associationproxy import AssociationProxy
from sqlalchemy.orm import Mapper, RelationshipProperty, class_mapper
from sqlalchemy.orm.exc import UnmappedClassError
from sqlalchemy.sql.util import find_tables

from rowsync import tree
from rowsync.errors import ConfigurationError
from rowsync.fetch import identity
from rowsync.messages import EVENTS, Event

Assocs: TypeAlias = Sequence["str | Mapping[str, Assocs]"]
"""Relationship names to follow below a model: ``["profile", {"posts": ["tags"]}]``."""

TABLE_SCHEMA = "public"
"""The schema of a table whose SQLAlchemy Table names none."""


@dataclass(frozen=True)
class Watcher:
    """One table and event to capture, and the columns each notification identifies the row by.

    ``model`` is the mapped class of the table, or the :class:`~sqlalchemy.Table` itself for
    a plain association table. It is not part of the watcher's identity.
    """

    schema: str
    table: str
    event: Event
    primary_key: tuple[str, ...]
    """The columns identifying a row: the primary key, or every column of a table without one."""
    columns: tuple[str, ...]
    label: str | None = None
    model: Any = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> tuple[str, str, Event, str | None]:
        """What makes two watchers the same trigger; their columns get merged."""
        return (self.schema, self.table, self.event, self.label)


def watchers(
    model: type[Any],
    assocs: Assocs = (),
    *,
    extra_columns: Iterable[str | sa.ColumnElement[Any] | Any] = (),
    label: str | None = None,
    events: Iterable[Event] = EVENTS,
) -> list[Watcher]:
    """Watchers for ``model``'s table and every table reached through ``assocs``.

    Each table gets one watcher per event. ``extra_columns`` (names or column attributes of
    ``model``) are added to the identifying columns of ``model``'s table, so subscriptions
    can filter on them. Lists returned by several calls can simply be concatenated.
    """
    mapper = _mapper(model)
    events = tuple(events)
    if unknown := set(events) - set(EVENTS):
        raise ConfigurationError(f"unknown events {sorted(unknown)}; use {EVENTS}")
    extra = tuple(_column_name(mapper, c) for c in extra_columns)
    tables: dict[sa.Table, tuple[str, ...]] = {}
    root = _local_table(mapper)
    tables[root] = extra
    for table in _hierarchy(mapper):
        tables.setdefault(table, ())
    for table in _tables_reached(mapper, assocs):
        tables.setdefault(table, ())
    owners = _models_by_table(mapper)
    for table in tables:
        if not table.primary_key.columns and isinstance(owners.get(table), type):
            raise ConfigurationError(
                f"table {table.fullname!r} has no primary key: rowsync follows such a table "
                f"as an association table (secondary=), not mapped to {owners[table].__name__}"
            )
    return [
        Watcher(
            schema=table.schema or TABLE_SCHEMA,
            table=table.name,
            event=event,
            primary_key=primary_key(table),
            columns=identifying_columns(table, mapper, more),
            label=label,
            model=owners.get(table, table),
        )
        for table, more in tables.items()
        for event in events
    ]


def merge(watchers: Iterable[Watcher]) -> list[Watcher]:
    """One watcher per trigger identity, with the union of the columns asked for."""
    merged: dict[tuple[str, str, Event, str | None], Watcher] = {}
    for w in watchers:
        if (seen := merged.get(w.key)) is not None:
            columns = seen.columns + tuple(c for c in w.columns if c not in seen.columns)
            w = Watcher(w.schema, w.table, w.event, w.primary_key, columns, w.label, seen.model)
        merged[w.key] = w
    return list(merged.values())


def primary_key(table: sa.Table) -> tuple[str, ...]:
    """The names of the columns identifying a row (:func:`rowsync.fetch.identity`)."""
    return tuple(c.name for c in identity(table))


def identifying_columns(
    table: sa.Table, mapper: Mapper[Any], extra: Sequence[str] = ()
) -> tuple[str, ...]:
    """Primary key, then every column a relationship joins on or a hierarchy's class is read
    from (its discriminator), then ``extra``; no repeats.

    Relationship columns are taken from foreign keys and from every relationship's join
    condition in the registry, so view-only relationships without a foreign key count too.
    """
    names = list(primary_key(table))
    joined = {c.name for fk in table.foreign_keys for c in [fk.parent]}
    for other in mapper.registry.mappers:
        kind = other.polymorphic_on
        if isinstance(kind, sa.Column) and kind.table is table:
            joined.add(kind.name)  # the class of a row: which places and root lists take it
        for rel in other.relationships:
            for left, right in rel.local_remote_pairs or ():
                for col in (left, right):
                    if isinstance(col, sa.Column) and col.table is table:
                        joined.add(col.name)
    for name in extra:
        if name not in table.c:
            raise ConfigurationError(f"{table.fullname!r} has no column {name!r}")
    names += sorted(joined - set(names))
    names += [n for n in extra if n not in names]
    return tuple(names)


def _mapper(model: Any) -> Mapper[Any]:
    try:
        return class_mapper(model)
    except (UnmappedClassError, sa.exc.ArgumentError) as exc:
        raise ConfigurationError(f"{model!r} is not a mapped SQLAlchemy class") from exc


def _local_table(mapper: Mapper[Any]) -> sa.Table:
    table = mapper.local_table
    if not isinstance(table, sa.Table):
        raise ConfigurationError(f"{mapper.class_.__name__} is not mapped to a table")
    return table


def _hierarchy(mapper: Mapper[Any]) -> tuple[sa.Table, ...]:
    """Every table of ``mapper``'s inheritance hierarchy, after checking rowsync can follow
    it: a row is named by the base table's primary key, its class read from a discriminator
    column of the base table."""
    name = mapper.class_.__name__
    members = list(mapper.base_mapper.self_and_descendants)
    if any(m.concrete for m in members):
        raise ConfigurationError(
            f"{name}: concrete table inheritance is not supported (a row's identity spans "
            "unrelated tables); map the classes separately or use joined/single inheritance"
        )
    if len(members) == 1:
        return (_local_table(mapper),)
    base = _local_table(mapper.base_mapper)
    kind = mapper.base_mapper.polymorphic_on
    if not (isinstance(kind, sa.Column) and kind.table is base):
        raise ConfigurationError(
            f"{name}: inheritance without a polymorphic_on column of {base.name!r} is not "
            "supported (the class of a changed row could not be known)"
        )
    tables = [base]
    base_key = list(base.primary_key.columns)
    for m in members:
        table = _local_table(m)
        if table in tables:
            continue
        key = list(table.primary_key.columns)
        if len(key) != len(base_key) or not all(
            c.references(b) for c, b in zip(key, base_key, strict=True)
        ):
            raise ConfigurationError(
                f"{m.class_.__name__}: the primary key of {table.name!r} must be a foreign key "
                f"to {base.name!r}'s, column for column, for joined-table inheritance"
            )
        tables.append(table)
    return tuple(tables)


def _column_name(mapper: Mapper[Any], column: Any) -> str:
    if isinstance(column, str):
        return column
    if isinstance(column, sa.Column) and column.table is mapper.local_table:
        return column.name
    # A mapped attribute counts only if it is this model's (``Person.name`` is not ``Post.name``).
    owner = getattr(column, "parent", None)
    key = getattr(column, "key", None)
    mine = isinstance(owner, Mapper) and mapper.isa(owner)
    if mine and isinstance(key, str) and key in mapper.columns:
        return str(mapper.columns[key].name)
    owner_class = getattr(column, "class_", None)
    what = f"{owner_class.__name__}.{key}" if owner_class is not None and key else repr(column)
    raise ConfigurationError(f"{what} is not a column of {mapper.class_.__name__}")


def _tables_reached(mapper: Mapper[Any], assocs: Assocs) -> Iterator[sa.Table]:
    """Every table a change in which can alter the named relationships' contents."""
    for name, nested in _items(assocs):
        for rel, sub_nested in _resolve(mapper, name, nested):
            target = rel.mapper
            yield from _hierarchy(target)
            for clause in (rel.secondary, rel.primaryjoin, rel.secondaryjoin):
                if clause is not None:
                    yield from (t for t in find_tables(clause) if isinstance(t, sa.Table))
            yield from _tables_reached(target, sub_nested)


def _items(assocs: Assocs) -> Iterator[tuple[str, Assocs]]:
    if isinstance(assocs, (str, Mapping)):
        assocs = [assocs]
    for item in assocs:
        if isinstance(item, str):
            yield item, ()
        elif isinstance(item, Mapping):
            yield from item.items()
        else:
            raise ConfigurationError(
                f"assocs items are names or {{name: nested}} dicts, not {item!r}"
            )


def _resolve(
    mapper: Mapper[Any], name: str, nested: Assocs
) -> Iterator[tuple[RelationshipProperty[Any], Assocs]]:
    """The relationship called ``name``; an association proxy stands for the two it spans.
    A subclass's relationship counts too: a place holding the base class holds subclass rows,
    loaded with their own relationships (``of_type``, ``with_polymorphic``)."""
    for m in mapper.self_and_descendants:
        if name in m.relationships:
            yield m.relationships[name], nested
            return
    proxy = mapper.all_orm_descriptors.get(name)
    if isinstance(proxy, AssociationProxy):
        via = mapper.relationships[proxy.target_collection]
        yield (
            via,
            [{proxy.value_attr: nested}]
            if proxy.value_attr in via.mapper.relationships
            else nested,
        )
        return
    known = ", ".join(sorted(mapper.relationships.keys())) or "none"
    raise ConfigurationError(
        f"{mapper.class_.__name__} has no relationship {name!r}; known: {known}"
    )


def resolve_assocs(
    mapper: Mapper[Any], assocs: Assocs
) -> list[tuple[RelationshipProperty[Any], Assocs]]:
    """Validate ``assocs`` against ``mapper`` and pair each relationship with what follows it."""
    return [pair for name, nested in _items(assocs) for pair in _resolve(mapper, name, nested)]


def assocs_spec(mapper: Mapper[Any], assocs: Assocs) -> dict[str, Any]:
    """``assocs`` as a LoadSpec (relationship keys, each with what is below it); an
    association proxy stands for the relationships it spans."""
    spec: dict[str, Any] = {}
    for rel, nested in resolve_assocs(mapper, assocs):
        spec = tree.merge_specs(spec, {rel.key: assocs_spec(rel.mapper, nested)})
    return spec


def spec_assocs(spec: tree.LoadSpec) -> list[Any]:
    """A LoadSpec as the ``assocs`` of ``subscribe``."""
    return [{key: spec_assocs(nested)} if nested else key for key, nested in spec.items()]


def _models_by_table(mapper: Mapper[Any]) -> dict[sa.Table, Any]:
    """The class mapped to each table; a table mapped by no class stands for itself."""
    owners: dict[sa.Table, Any] = {}
    for m in mapper.registry.mappers:
        if isinstance(m.local_table, sa.Table) and not m.single:  # not a table's subclass
            owners.setdefault(m.local_table, m.class_)
    return owners
