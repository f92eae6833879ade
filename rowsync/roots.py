"""Root lists: which rows a list of roots holds, by the rule its subscription declared.

A loaded list is the result of a query rowsync never saw, so ``sync`` cannot know whether
a new row belongs in it: it does not guess. A list grows (and shrinks as rows stop
qualifying) only by a rule the application declared on the list's subscription:

* :class:`Filters`: ``sub.add(Model, "inserted", follow=True, **filters)`` on the list's
  subscription says "the roots are the rows of ``Model`` whose identifying columns equal
  these": that is the statement, and the row's identifying columns decide;
* :class:`Statement`: ``rs.load(session, statement)`` knows the statement itself: the
  statement, restricted to the row's key, decides (one small query, never Python's reading
  of a ``WHERE``), and its ``ORDER BY`` places the row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.orm import Mapper
from sqlalchemy.sql.util import find_tables

from rowsync import tree
from rowsync.errors import ConfigurationError
from rowsync.fetch import _where_key


def whole_result_clauses(statement: sa.Select[Any]) -> list[str]:
    """The clauses of ``statement`` that make a row's membership depend on the other rows
    (``LIMIT``, ``DISTINCT``, ...): no check of one row alone can keep such a result."""
    return [
        name
        for name, present in (
            ("LIMIT", statement._limit_clause is not None),
            ("OFFSET", statement._offset_clause is not None),
            ("FETCH", statement._fetch_clause is not None),
            ("DISTINCT", bool(statement._distinct or statement._distinct_on)),
            ("GROUP BY", bool(statement._group_by_clauses)),
            ("HAVING", bool(statement._having_criteria)),
        )
        if present
    ]


class Rule(Protocol):
    """How a root list changes with the rows of one mapper."""

    @property
    def mapper(self) -> Mapper[Any]: ...

    @property
    def spec(self) -> tree.LoadSpec | None:
        """What a new root comes loaded with, if the rule knows (else: like its siblings)."""
        ...

    def admits(self, key: tuple[Any, ...], values: Mapping[str, Any]) -> bool:
        """Whether the row of primary key ``key`` (current column ``values``) is a root."""
        ...

    def arrange(self, roots: list[Any]) -> None:
        """Put ``roots`` in the rule's order, in place."""
        ...


@dataclass(frozen=True, eq=False)
class Filters:
    """Rows of ``mapper`` whose columns equal ``filters``."""

    mapper: Mapper[Any]
    filters: Mapping[str, Any]
    loaded: tree.LoadSpec | None = None
    """What the list's roots were loaded with when it was subscribed (None: like its roots
    of the moment): a new root is loaded so even once the list was emptied, where nothing
    else (``preloads`` cannot say ``noload``) tells."""

    @property
    def spec(self) -> tree.LoadSpec | None:
        return self.loaded

    @classmethod
    def of(cls, mapper: Mapper[Any], filters: Mapping[str, Any], roots: list[Any]) -> Filters:
        """The rule of ``roots``, a subscribed list: rows of ``mapper`` matching ``filters``,
        loaded as its first root is when it is one of ``mapper``'s."""
        same = roots and tree.identity_table(tree.entity(roots[0])) is tree.identity_table(mapper)
        return cls(mapper, filters, tree.own_spec(roots[0]) if same else None)

    def admits(self, key: tuple[Any, ...], values: Mapping[str, Any]) -> bool:
        """The filters hold, and the row is of the mapper's class (a single-table subclass
        shares its table: the discriminator says)."""
        return tree.isa(tree.row_mapper(self.mapper, values), self.mapper) and all(
            name in values and values[name] == v for name, v in self.filters.items()
        )

    def arrange(self, roots: list[Any]) -> None:
        """No order is declared: rows stay in the order they came."""


@dataclass(frozen=True, eq=False)
class Statement:
    """The rows ``statement`` returns, in its order."""

    mapper: Mapper[Any]
    statement: sa.Select[Any]
    engine: sa.Engine

    @classmethod
    def of(cls, statement: sa.Select[Any], engine: sa.Engine) -> Statement:
        """The rule of ``select(Model)...``; refused when a row's membership would depend on
        other rows or tables (those need :meth:`RowSync.live`, which re-checks on every
        change of them)."""
        described = statement.column_descriptions
        entity = described[0].get("entity") if len(described) == 1 else None
        if entity is None or described[0].get("expr") is not entity:
            raise ConfigurationError("rs.load runs select(Model): one mapped class, whole rows")
        mapper: Mapper[Any] = sa.inspect(entity)
        table = tree.mapped_table(mapper)
        refused = whole_result_clauses(statement)
        keys = statement.with_only_columns(*table.primary_key.columns, maintain_column_froms=True)
        read = {t for t in find_tables(keys, check_columns=True) if isinstance(t, sa.Table)}
        # annotated copies compare equal; a joined subclass reads its base table too
        others = {t.fullname for t in read} - {t.fullname for t in tree.hierarchy_tables(mapper)}
        if refused or others:
            what = ", ".join(refused + sorted(f"a read of {name}" for name in others))
            raise ConfigurationError(
                f"rs.load cannot keep a statement with {what} current from its own rows: "
                "use rs.live(...), which re-checks the statement when those change"
            )
        return cls(mapper, statement, engine)

    @property
    def spec(self) -> tree.LoadSpec | None:
        return tree.options_spec(self.mapper, self.statement._with_options)

    def admits(self, key: tuple[Any, ...], values: Mapping[str, Any]) -> bool:
        table = tree.mapped_table(self.mapper)
        probe = self.statement.with_only_columns(sa.literal(1), maintain_column_froms=True).where(
            _where_key(table, [key])
        )
        with self.engine.connect() as conn:
            return conn.execute(probe.limit(1)).first() is not None

    def arrange(self, roots: list[Any]) -> None:
        """Sort by the rank the statement gives each key (one query for the keys only)."""
        if not self.statement._order_by_clauses or len(roots) < 2:
            return
        table = tree.mapped_table(self.mapper)
        keys = self.statement.with_only_columns(
            *table.primary_key.columns, maintain_column_froms=True
        )
        with self.engine.connect() as conn:
            rank = {tuple(row): i for i, row in enumerate(conn.execute(keys))}
        roots.sort(key=lambda obj: rank.get(tree.primary_key(obj), len(rank)))
