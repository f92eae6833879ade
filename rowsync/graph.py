"""The relationship graph: every SQLAlchemy relationship as an :class:`Edge`, built once.

An edge is a path ``parent -> [secondary ->] target`` with the key-column pairs of each hop
and, optionally, extra criteria. That is all ``sync`` needs to decide whether a row belongs
in a loaded collection, whatever the relationship kind:

* direct (many-to-one, one-to-many, one-to-one): the target row belongs to a parent when
  its ``remote`` columns equal the parent's ``local`` columns and the criteria hold;
* through an association table or object (``secondary``): a link row pairs a parent key
  with a target key; the criteria are evaluated on the target row;
* anything else (a ``secondary`` that is a join, criteria spanning several tables, an
  ``order_by`` term Python cannot order as Postgres does, see :mod:`rowsync.ordering`):
  ``recompute`` - the membership is re-queried for the affected parents.

Criteria are never evaluated in Python: each is compiled into the listener's row fetch as
a boolean column (``CachedRow.matches``), or evaluated on rows the WAL carried
(:meth:`rowsync.fetch.RowSource.judge`), so Postgres' own semantics (NULLs, collations, casts)
decide.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, cast

import networkx as nx
import sqlalchemy as sa
from sqlalchemy.orm import Mapper, RelationshipProperty, configure_mappers
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BooleanClauseList, ColumnElement
from sqlalchemy.sql.util import find_tables

from rowsync import ordering
from rowsync.ordering import Term
from rowsync.tree import hierarchy_tables, identity_table, mapped_table

Pairs = tuple[tuple[sa.Column[Any], sa.Column[Any]], ...]


@dataclass(frozen=True, eq=False)
class Edge:
    """One relationship, as ``sync`` and the router see it. Compared by identity."""

    parent: Mapper[Any]
    key: str
    target: Mapper[Any]
    uselist: bool
    pairs: Pairs
    """``(parent column, remote column)``: remote is in ``secondary`` when there is one, else
    in the target."""
    secondary: sa.Table | None
    target_pairs: Pairs
    """``(secondary column, target column)``, only with ``secondary``."""
    criteria: str | None
    """Name of the boolean the row fetch computes for the extra criteria, if any."""
    criteria_table: sa.Table | None
    order_by: tuple[Term, ...]
    """The relationship's ``order_by``. Unless the edge recomputes, each term is a column of
    the target's table that Python orders as Postgres does (``order_names``)."""
    recompute: bool
    """Membership or order cannot be read off rows: re-query it for the affected parents."""
    tables: frozenset[sa.Table] = field(repr=False)
    """Every table whose change can alter this relationship's contents."""

    def __repr__(self) -> str:
        return f"<Edge {self.parent.class_.__name__}.{self.key}>"

    @cached_property
    def target_table(self) -> sa.Table:
        return mapped_table(self.target)

    @cached_property
    def target_identity(self) -> sa.Table:
        """The table naming the target's rows in a tree's index (its hierarchy's base)."""
        return identity_table(self.target)

    @cached_property
    def row_tables(self) -> tuple[sa.Table, ...]:
        """Tables whose change of a held target row the edge's own key does not catch: the
        target's table behind an association, the other tables of an inheritance hierarchy."""
        where = self.secondary if self.secondary is not None else self.target_table
        return tuple(t for t in hierarchy_tables(self.target) if t is not where)

    @cached_property
    def by_class(self) -> bool:
        """A single-table subclass shares its table with other classes: a row of it belongs
        only if its discriminator says it is of the target's class."""
        return bool(self.target.single)

    @cached_property
    def parent_table(self) -> sa.Table:
        return mapped_table(self.parent)

    @cached_property
    def order_names(self) -> tuple[str, ...]:
        """The target's columns ``order_by`` orders by, by name (a recomputed edge has none)."""
        if self.recompute:
            return ()
        return tuple(c.name for c in map(ordering.column, self.order_by) if c is not None)

    @cached_property
    def order_is_key(self) -> bool:
        """``order_by`` reads only the target's primary key columns: a held member's place
        never changes, since its key never does (a row whose key changed is another row: the
        old one is deleted, the new one inserted)."""
        return all((c := ordering.column(t)) is not None and c.primary_key for t in self.order_by)

    @cached_property
    def local_is_key(self) -> bool:
        """The parent side is its primary key (one-to-many, many-to-many): a parent's own
        update can never change what it holds. Otherwise (many-to-one) it can."""
        return {c for c, _ in self.pairs} == set(self.parent_table.primary_key.columns)

    @cached_property
    def links_repeat(self) -> bool:
        """Two rows of ``secondary`` may link the same parent and target: no primary key or
        unique constraint lies within the columns of the pair (a table without a primary key,
        or with a surrogate one). A link row then cannot tell alone whether its pair is still
        linked, nor how many times (selectin loads a pair linked twice twice)."""
        if self.secondary is None:
            return False
        pair = {r for _, r in self.pairs} | {s for s, _ in self.target_pairs}
        unique = [set(self.secondary.primary_key.columns)]
        unique += [
            set(c.columns) for c in self.secondary.constraints if isinstance(c, sa.UniqueConstraint)
        ]
        unique += [set(i.columns) for i in self.secondary.indexes if i.unique]
        return not any(columns and columns <= pair for columns in unique)

    @cached_property
    def local_names(self) -> tuple[str, ...]:
        """The parent's columns the edge joins on."""
        return tuple(c.name for c, _ in self.pairs)

    @cached_property
    def remote_names(self) -> tuple[str, ...]:
        """The columns they must equal: in ``secondary`` if there is one, else in the target."""
        return tuple(r.name for _, r in self.pairs)

    def local(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The parent-side key of a parent row given by column name."""
        return tuple(values.get(name) for name in self.local_names)

    def remote(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The parent key a target row (or link row) points to."""
        return tuple([values.get(name) for name in self.remote_names])

    def link_target(self, link: Mapping[str, Any]) -> dict[str, Any]:
        """The target's key columns named in a link row of ``secondary``."""
        return {t.name: link.get(s.name) for s, t in self.target_pairs}


class Graph:
    """Every relationship of a registry, indexed by the tables whose changes concern it."""

    def __init__(self, mappers: Iterable[Mapper[Any]]) -> None:
        configure_mappers()
        self.digraph: nx.MultiDiGraph = nx.MultiDiGraph()
        self.edges: list[Edge] = []
        self.criteria: dict[sa.Table, list[tuple[str, ColumnElement[bool]]]] = defaultdict(list)
        self._by_table: dict[sa.Table, list[Edge]] = defaultdict(list)
        counter = itertools.count()
        made: dict[RelationshipProperty[Any], Edge] = {}
        for mapper in mappers:
            self.digraph.add_node(mapper)
            for rel in mapper.relationships:
                inherited = rel in made  # a subclass's mapper lists its base's relationships
                edge = made[rel] = made[rel] if inherited else _edge(rel, counter)
                # A place holding a class holds its subclasses' rows, and what they hold.
                for owner in mapper.iterate_to_root():
                    self.digraph.add_edge(owner, rel.mapper, key=rel.key, edge=edge)
                if inherited:
                    continue
                self.edges.append(edge)
                if edge.criteria is not None and edge.criteria_table is not None:
                    self.criteria[edge.criteria_table].append((edge.criteria, _criteria(rel)))
                for table in edge.tables:
                    self._by_table[table].append(edge)
        self._reachable = self._tables_below()
        self._hierarchy = {
            table: hierarchy_tables(m) for m in self.digraph.nodes for table in hierarchy_tables(m)
        }

    @classmethod
    def for_models(cls, models: Iterable[Any]) -> Graph:
        """The graph of every mapper in the registries of ``models``."""
        configure_mappers()
        registries = {sa.inspect(m).registry for m in models if not isinstance(m, sa.Table)}
        return cls(m for r in registries for m in r.mappers)

    def edges_for(self, table: sa.Table) -> Sequence[Edge]:
        """Relationships a change of a row of ``table`` can alter."""
        return self._by_table.get(table, ())

    def identity(self, table: sa.Table) -> sa.Table:
        """The table naming ``table``'s rows: the base table of an inheritance hierarchy (the
        primary key of a subclass table is the base's, column for column), else ``table``."""
        return self.hierarchy(table)[0]

    def hierarchy(self, table: sa.Table) -> tuple[sa.Table, ...]:
        """Every table holding a part of ``table``'s rows' objects, the identity table first."""
        return self._hierarchy.get(table, (table,))

    def edge(self, mapper: Mapper[Any], key: str) -> Edge:
        for _, _, k, data in self.digraph.out_edges(mapper, keys=True, data=True):
            if k == key:
                edge: Edge = data["edge"]
                return edge
        raise KeyError(f"{mapper.class_.__name__}.{key}")

    def reachable(self, mapper: Mapper[Any]) -> frozenset[sa.Table]:
        """Tables whose changes can reach a tree rooted at ``mapper``."""
        return self._reachable.get(mapper, frozenset())

    def _tables_below(self) -> dict[Mapper[Any], frozenset[sa.Table]]:
        """Every mapper's reachable tables, in one pass over the strongly connected components
        in reverse topological order: linear in the schema, not in paths or roots x schema."""
        dag = nx.condensation(self.digraph)
        own: dict[int, set[sa.Table]] = {}
        for component in dag.nodes:
            tables = own[component] = set()
            for mapper in dag.nodes[component]["members"]:
                tables.update(hierarchy_tables(mapper))
                for _, _, data in self.digraph.out_edges(mapper, data=True):
                    tables.update(data["edge"].tables)
        below: dict[int, frozenset[sa.Table]] = {}
        for component in reversed(list(nx.topological_sort(dag))):
            below[component] = frozenset(
                own[component].union(*(below[c] for c in dag.successors(component)))
            )
        mapping = dag.graph["mapping"]
        return {mapper: below[mapping[mapper]] for mapper in self.digraph.nodes}


def _conjuncts(clause: ColumnElement[Any] | None) -> list[ColumnElement[Any]]:
    if clause is None:
        return []
    if isinstance(clause, BooleanClauseList) and clause.operator is operators.and_:
        return [c for part in clause.clauses for c in _conjuncts(part)]
    return [clause]


def _is_pair(
    clause: ColumnElement[Any], pairs: Iterable[tuple[ColumnElement[Any], ColumnElement[Any]]]
) -> bool:
    if not (isinstance(clause, BinaryExpression) and clause.operator is operators.eq):
        return False
    sides = {clause.left, clause.right}
    return any(sides == {a, b} for a, b in pairs)


def _extra(rel: RelationshipProperty[Any]) -> list[ColumnElement[Any]]:
    """The conditions of a relationship that are not key equalities."""
    pairs = (
        tuple(rel.local_remote_pairs or ())
        + tuple(rel.synchronize_pairs or ())
        + tuple(rel.secondary_synchronize_pairs or ())
    )
    return [
        c
        for c in _conjuncts(rel.primaryjoin) + _conjuncts(rel.secondaryjoin)
        if not _is_pair(c, pairs)
    ]


def _criteria(rel: RelationshipProperty[Any]) -> ColumnElement[bool]:
    return sa.and_(*_extra(rel))


def _edge(rel: RelationshipProperty[Any], counter: Iterator[int]) -> Edge:
    parent, target = rel.parent, rel.mapper
    target_table = target.local_table
    secondary = rel.secondary if isinstance(rel.secondary, sa.Table) else None
    extra = _extra(rel)
    extra_tables = {t for c in extra for t in find_tables(c, check_columns=True)}
    criteria_table = next(iter(extra_tables)) if len(extra_tables) == 1 else None
    order_by = ordering.terms(rel.order_by or ())
    recompute = (
        (rel.secondary is not None and secondary is None)
        or (bool(extra) and criteria_table not in {target_table, secondary})
        or not all(_in_python(t, target_table) for t in order_by)
    )
    if secondary is not None:
        pairs = _columns(rel.synchronize_pairs)
        target_pairs = tuple((s, t) for t, s in _columns(rel.secondary_synchronize_pairs))
    else:
        pairs, target_pairs = _columns(rel.local_remote_pairs), ()
    tables = {target_table, *extra_tables}
    for clause in (rel.secondary, rel.primaryjoin, rel.secondaryjoin, *(t.expr for t in order_by)):
        if clause is not None:
            tables.update(find_tables(clause))
    if not all(c.table is parent.local_table for c, _ in pairs):
        recompute = True
    if not {c for c, _ in pairs} <= set(mapped_table(parent).primary_key.columns):
        tables.add(parent.local_table)  # many-to-one: the parent's own foreign key picks the target
    return Edge(
        parent=parent,
        key=rel.key,
        target=target,
        uselist=bool(rel.uselist),
        pairs=pairs,
        secondary=secondary,
        target_pairs=target_pairs,
        criteria=f"rowsync_c{next(counter)}" if extra and not recompute else None,
        # Without recompute, the criteria's one table is the target's or the association's.
        criteria_table=cast("sa.Table | None", criteria_table) if extra and not recompute else None,
        order_by=order_by,
        recompute=recompute,
        tables=frozenset(t for t in tables if isinstance(t, sa.Table)),
    )


def _columns(pairs: Iterable[tuple[ColumnElement[Any], ColumnElement[Any]]] | None) -> Pairs:
    """A relationship's key-column pairs. The stubs say column elements; they are the
    tables' own columns, read as such (``.name``, ``.table``) by sync and the router."""
    return cast(Pairs, tuple(pairs or ()))


def _in_python(term: ordering.Term, table: sa.FromClause) -> bool:
    """Whether sync can place a row by this term from the row's own values: a column of the
    target's table, which Python compares as Postgres orders it. Otherwise (an expression, a
    column of another table, a collation Python does not follow) the edge recomputes."""
    column = ordering.column(term)
    return column is not None and column.table is table and ordering.in_python(term)
