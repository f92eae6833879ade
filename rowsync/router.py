"""Routing: which subscriptions a change concerns, kept current as their trees change.

A subscription's interests are keys ``(table, columns, values)``: "rows of ``table`` whose
``columns`` equal ``values``, before or after the change". A loaded object registers its
primary key; each relationship followed below it registers the key its related rows
carry (``posts.person_id = 5``, ``post_tags.post_id = 7``, ``persons.id = <the fk>``). A
change is matched by projecting its identifying columns, old and new, onto the shapes
registered for its table: one dict lookup per shape, whatever the number of subscribers.

Each key remembers why it was registered (the edge and what to follow below it), so when
a change brings a row into a subscriber's tree (insert, link, move in) the router registers
that row's own interests at once, in the listener thread - a row linked and then changed
in quick succession is not missed - and drops them when the row leaves.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeAlias

import sqlalchemy as sa
from sqlalchemy.orm import Mapper

from rowsync import tree
from rowsync.graph import Edge, Graph
from rowsync.subscription import Subscription
from rowsync.watchers import Assocs, resolve_assocs

logger = logging.getLogger(__name__)

Spec: TypeAlias = tuple[tuple[Edge, "Spec"], ...]
"""What to follow below a row: edges, each with its own spec."""
Interest: TypeAlias = tuple[sa.Table, tuple[str, ...], tuple[Any, ...]]
Reason: TypeAlias = tuple[Edge | None, Spec]
Values: TypeAlias = Mapping[str, Any]


class Resolver(Protocol):
    """Reads what the router needs but no change carried: rows reached through an edge."""

    def members(self, edge: Edge, local: tuple[Any, ...]) -> list[Values]:
        """Current target rows of ``edge`` for a parent whose local columns are ``local``
        (criteria ignored: a row outside them today may enter tomorrow)."""
        ...

    def row_values(self, table: sa.Table, key: tuple[Any, ...]) -> Values | None:
        """The current row of ``table`` with primary key ``key``, if any."""
        ...


class Router:
    """The interest index of every subscription, guarded by one lock."""

    def __init__(self, graph: Graph, resolver: Resolver) -> None:
        self.graph = graph
        self.resolver = resolver
        self._lock = threading.RLock()
        self._index: dict[Interest, set[Subscription]] = defaultdict(set)
        self._shapes: dict[sa.Table, Counter[tuple[str, ...]]] = defaultdict(Counter)
        self._models: dict[sa.Table, set[Subscription]] = defaultdict(set)
        self._subscriptions: dict[int, Subscription] = {}

    def subscriptions(self) -> list[Subscription]:
        with self._lock:
            return list(self._subscriptions.values())

    def spec(self, mapper: Mapper[Any], assocs: Assocs) -> Spec:
        """Validate ``assocs`` against ``mapper`` (clear error for unknown names)."""
        return tuple(
            (self.graph.edge(mapper, rel.key), self.spec(rel.mapper, nested))
            for rel, nested in resolve_assocs(mapper, assocs)
        )

    # -- registering -------------------------------------------------------------------

    def add_model(self, sub: Subscription, table: sa.Table, event: str | None, filters: dict[str, Any]) -> None:
        with self._lock:
            self._subscriptions[sub.id] = sub
            if (table, event, filters) not in sub.models:
                sub.models.append((table, event, filters))
            self._models[table].add(sub)

    def add_tree(self, sub: Subscription, objects: Iterable[Any], spec: Spec) -> None:
        with self._lock:
            self._subscriptions[sub.id] = sub
            for obj in objects:
                mapper = sa.inspect(obj).mapper
                values = tree.column_values(obj)
                self._bump(sub, _row_key(mapper.local_table, values), (None, spec), +1)
                self._hold(sub, values, spec, +1, obj)

    def remove(self, sub: Subscription) -> None:
        with self._lock:
            self._subscriptions.pop(sub.id, None)
            for key in list(sub.interests):
                self._drop_key(sub, key)
            sub.interests.clear()
            for table in [t for t, subs in self._models.items() if sub in subs]:
                self._models[table].discard(sub)
            sub.models.clear()

    def _bump(self, sub: Subscription, key: Interest, reason: Reason, sign: int) -> None:
        reasons = sub.interests.get(key)
        if reasons is None:
            if sign < 0:
                return
            reasons = sub.interests[key] = Counter()
            self._index[key].add(sub)
            self._shapes[key[0]][key[1]] += 1
        reasons[reason] += sign
        if reasons[reason] <= 0:
            del reasons[reason]
        if not reasons:
            del sub.interests[key]
            self._drop_key(sub, key)

    def _drop_key(self, sub: Subscription, key: Interest) -> None:
        subs = self._index.get(key)
        if subs is not None and sub in subs:
            subs.discard(sub)
            if not subs:
                del self._index[key]
            shapes = self._shapes[key[0]]
            shapes[key[1]] -= 1
            if shapes[key[1]] <= 0:
                del shapes[key[1]]

    def _hold(self, sub: Subscription, values: Values, spec: Spec, sign: int, obj: Any = None) -> None:
        """Register (or, with ``sign=-1``, drop) the interests of a row held with ``spec``.

        With the loaded object at hand its loaded relationships say what lies below;
        without it (a row that just entered) the resolver reads it, so nothing is missed.
        Dropping without the object goes one level deep: what is left over only means a
        few messages that ``sync`` will find nothing to do with.
        """
        for edge, nested in spec:
            if edge.recompute:
                for table in edge.tables:
                    self._bump(sub, (table, (), ()), (edge, nested), sign)
                continue
            local = tuple(values.get(c.name) for c, _ in edge.pairs)
            if any(v is None for v in local):
                continue
            self._bump(sub, _edge_key(edge, local), (edge, nested), sign)
            if not nested and edge.secondary is None:
                continue
            for child_values, child in self._children(edge, local, obj, sign):
                if edge.secondary is not None:
                    self._bump(sub, _row_key(edge.target_table, child_values), (None, nested), sign)
                self._hold(sub, child_values, nested, sign, child)

    def _children(self, edge: Edge, local: tuple[Any, ...], obj: Any, sign: int) -> list[tuple[Values, Any]]:
        if obj is not None and not (edge.secondary is not None and edge.criteria):
            loaded = tree.loaded_value(obj, edge.key)
            if loaded is tree.NOT_LOADED:
                return []
            return [(tree.column_values(child), child) for child in tree.as_list(loaded)]
        if sign < 0:
            return []
        return [(values, None) for values in self.resolver.members(edge, local)]

    # -- routing -----------------------------------------------------------------------

    def route(self, table: sa.Table, event: str, new: Values | None, old: Values | None) -> list[Subscription]:
        """Subscriptions concerned by a change (each once), after updating their interests.

        ``new`` is None for a delete, ``old`` None for an insert.
        """
        with self._lock:
            matched: dict[Subscription, list[Interest]] = {}
            for cols in list(self._shapes.get(table, ())):
                for values in (new, old):
                    if values is None:
                        continue
                    key = (table, cols, tuple(values.get(c) for c in cols))
                    for sub in self._index.get(key, ()):
                        keys = matched.setdefault(sub, [])
                        if key not in keys:
                            keys.append(key)
            for sub, keys in matched.items():
                for key in keys:
                    for (edge, nested), _count in list(sub.interests.get(key, {}).items()):
                        self._upkeep(sub, key, edge, nested, event, new, old)
            result = list(matched)
            for sub in self._models.get(table, ()):
                if sub not in matched and _model_match(sub, table, event, new, old):
                    result.append(sub)
            return result

    def _upkeep(
        self, sub: Subscription, key: Interest, edge: Edge | None, nested: Spec,
        event: str, new: Values | None, old: Values | None,
    ) -> None:
        table, cols, values = key
        if not cols:
            return  # a table-wide interest (re-queried relationship): nothing to follow
        inside_new = new is not None and tuple(new.get(c) for c in cols) == values
        inside_old = old is not None and tuple(old.get(c) for c in cols) == values
        if edge is None:  # the row itself is held
            if event == "deleted":
                self._hold(sub, old or {}, nested, -1)
                self._bump(sub, key, (None, nested), -sub.interests.get(key, Counter())[(None, nested)])
            elif old is not None and new is not None and old != new:
                self._hold(sub, old, nested, -1)
                self._hold(sub, new, nested, +1)
            return
        if edge.secondary is not None and table is edge.secondary:
            for values_, sign in ((new, +1), (old, -1)):
                if values_ is not None and (inside_new, inside_old) == ((True, False) if sign > 0 else (False, True)):
                    target = {t.name: values_.get(s.name) for s, t in edge.target_pairs}
                    self._bump(sub, _row_key(edge.target_table, target), (None, nested), sign)
                    if nested:
                        pk = tuple(target.get(c.name) for c in edge.target_table.primary_key.columns)
                        row = self.resolver.row_values(edge.target_table, pk) if sign > 0 else target
                        if row is not None:
                            self._hold(sub, row, nested, sign)
            return
        if not nested:
            return
        if inside_new and not inside_old and new is not None:
            self._hold(sub, new, nested, +1)
        elif inside_old and not inside_new and old is not None:
            self._hold(sub, old, nested, -1)
        elif inside_new and inside_old and old is not None and new is not None and old != new:
            self._hold(sub, old, nested, -1)
            self._hold(sub, new, nested, +1)


def _row_key(table: Any, values: Values) -> Interest:
    cols = tuple(c.name for c in table.primary_key.columns)
    return (table, cols, tuple(values.get(c) for c in cols))


def _edge_key(edge: Edge, local: tuple[Any, ...]) -> Interest:
    where = edge.secondary if edge.secondary is not None else edge.target_table
    return (where, tuple(r.name for _, r in edge.pairs), local)


def _model_match(sub: Subscription, table: sa.Table, event: str, new: Values | None, old: Values | None) -> bool:
    for model_table, wanted, filters in sub.models:
        if model_table is not table or (wanted is not None and wanted != event):
            continue
        if all(any(v is not None and k in v and v[k] == f for v in (new, old)) for k, f in filters.items()):
            return True
    return False


