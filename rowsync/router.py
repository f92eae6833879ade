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

import functools
import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, TypeAlias

import sqlalchemy as sa
from sqlalchemy.orm import Mapper

from rowsync import tree
from rowsync.fetch import key_names, key_of
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

    def concerned(self, tables: Iterable[sa.Table]) -> list[Subscription]:
        """Subscriptions that a change of any row of ``tables`` may concern, whatever the
        row (a TRUNCATE deletes rows nothing names): every one with an interest in a table
        of their inheritance hierarchies (a row held, a relationship followed into one,
        an association table's links included), and every model subscription of one of
        them that takes deletes."""
        wanted = {part for table in tables for part in self.graph.hierarchy(table)}
        with self._lock:
            found = dict.fromkeys(
                sub for key, subs in self._index.items() if key[0] in wanted for sub in subs
            )
            for table in wanted:
                for sub in self._models.get(table, ()):
                    if any(m[0] in wanted and m[1] in (None, "deleted") for m in sub.models):
                        found[sub] = None
            return list(found)

    def spec(self, mapper: Mapper[Any], assocs: Assocs) -> Spec:
        """Validate ``assocs`` against ``mapper`` (clear error for unknown names)."""
        return tuple(
            (self.graph.edge(rel.parent, rel.key), self.spec(rel.mapper, nested))
            for rel, nested in resolve_assocs(mapper, assocs)
        )

    # -- registering -------------------------------------------------------------------

    def add_model(
        self,
        sub: Subscription,
        table: sa.Table,
        event: str | None,
        filters: dict[str, Any],
        follow: Spec | None = None,
        mapper: Mapper[Any] | None = None,
    ) -> None:
        """A model-level interest; with ``follow``, each inserted row is then held with that spec
        (a root list that sync grows with inserts keeps receiving its new rows' changes).
        ``mapper``: the model (a subclass takes only the rows its discriminator names)."""
        with self._lock:
            self._subscriptions[sub.id] = sub
            if (table, event, filters, follow, mapper) not in sub.models:
                sub.models.append((table, event, filters, follow, mapper))
            self._models[table].add(sub)

    def add_tree(self, sub: Subscription, objects: Iterable[Any], spec: Spec) -> None:
        with self._lock:
            self._subscriptions[sub.id] = sub
            for obj in objects:
                values = self._values_of(obj, spec)
                for key in self._row_keys(tree.identity_table(sa.inspect(obj).mapper), values):
                    self._bump(sub, key, (None, spec), +1)
                self._hold(sub, values, spec, +1, obj)

    def _row_keys(self, table: sa.Table, values: Values) -> list[Interest]:
        """The keys of a row of ``table`` in every table of its inheritance hierarchy: a
        change of any of them is a change of the row's object."""
        key = key_of(table, values)
        return [_key_in(t, key) for t in self.graph.hierarchy(table)]

    def remove(self, sub: Subscription) -> None:
        with self._lock:
            self._subscriptions.pop(sub.id, None)
            for key in list(sub.interests):
                self._drop_key(sub, key)
            sub.interests.clear()
            sub.below.clear()
            for table in [t for t, subs in self._models.items() if sub in subs]:
                self._models[table].discard(sub)
            sub.models.clear()

    def _bump(self, sub: Subscription, key: Interest, reason: Reason, sign: int) -> int:
        """Count one more (or one less) reason for ``key``; return the reason's new count."""
        reasons = sub.interests.get(key)
        if reasons is None:
            if sign < 0:
                return 0
            reasons = sub.interests[key] = Counter()
            self._index[key].add(sub)
            self._shapes[key[0]][key[1]] += 1
        count = reasons[reason] = reasons[reason] + sign
        if count <= 0:
            del reasons[reason]
        if not reasons:
            del sub.interests[key]
            self._drop_key(sub, key)
        return max(count, 0)

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

    def _hold(
        self, sub: Subscription, values: Values, spec: Spec, sign: int, obj: Any = None
    ) -> None:
        """Register (or, with ``sign=-1``, drop) the interests of a row held with ``spec``.

        Below each edge, the rows it holds are remembered (``sub.below``) with the values
        they were registered with, so dropping undoes exactly what holding did, at any depth.
        With the loaded object at hand its loaded relationships say what lies below; without
        it (a row that just entered) the resolver reads it, so nothing is missed.
        """
        for edge, nested in spec:
            reason = (edge, nested)
            if edge.recompute:
                for table in edge.tables:
                    self._bump(sub, (table, (), ()), reason, sign)
                continue
            local = edge.local(values)
            if any(v is None for v in local):
                continue
            key = _edge_key(edge, local)
            count = self._bump(sub, key, reason, sign)
            if not nested and not edge.row_tables:
                continue
            # Held again (a tree registered once more, as after a resync): what its loaded
            # object holds and is not followed yet is entered (``_enter`` skips the rest).
            if sign > 0 and (count == 1 or obj is not None):
                for child_values, child in self._children(edge, local, obj, nested):
                    self._enter(sub, key, edge, nested, child_values, child)
            elif sign < 0 and count == 0:
                for child_key in list(sub.below.get((key, reason), ())):
                    self._leave(sub, key, edge, nested, child_key)

    def _enter(
        self,
        sub: Subscription,
        key: Interest,
        edge: Edge,
        nested: Spec,
        values: Values,
        obj: Any = None,
    ) -> None:
        """A row joined the rows ``edge`` holds under ``key``: follow it (once)."""
        below = sub.below.setdefault((key, (edge, nested)), {})
        child_key = key_of(edge.target_table, values)
        if child_key in below:
            return
        below[child_key] = values
        for table in edge.row_tables:
            self._bump(sub, _key_in(table, child_key), (edge, nested), +1)
        self._hold(sub, values, nested, +1, obj)

    def _leave(
        self, sub: Subscription, key: Interest, edge: Edge, nested: Spec, child_key: tuple[Any, ...]
    ) -> None:
        """A row left: undo its registration with the values it was registered with."""
        below = sub.below.get((key, (edge, nested)))
        values = None if below is None else below.pop(child_key, None)
        if below is not None and not below:
            del sub.below[(key, (edge, nested))]
        if values is None:
            return
        for table in edge.row_tables:
            self._bump(sub, _key_in(table, child_key), (edge, nested), -1)
        self._hold(sub, values, nested, -1)

    def _children(
        self, edge: Edge, local: tuple[Any, ...], obj: Any, nested: Spec
    ) -> list[tuple[Values, Any]]:
        if obj is not None and not (edge.secondary is not None and edge.criteria):
            loaded = tree.loaded_value(obj, edge.key)
            if loaded is tree.NOT_LOADED:
                return []
            return [(self._values_of(child, nested), child) for child in tree.as_list(loaded)]
        return [(values, None) for values in self.resolver.members(edge, local)]

    def _values_of(self, obj: Any, spec: Spec) -> Values:
        """The column values of a loaded object that its edges join on. A column the query
        left unloaded (``load_only``, ``defer``: a foreign key under a loaded many-to-one)
        is read from the row, so that what hangs below the object is followed all the same."""
        values = tree.column_values(obj)
        needed = {name for edge, _ in spec if not edge.recompute for name in edge.local_names}
        if needed <= values.keys():
            return values
        key = tree.primary_key(obj)
        for table in tree.unloaded_tables(obj):
            if (row := self.resolver.row_values(table, key)) is not None:
                values = {**row, **values}
        return values

    # -- routing -----------------------------------------------------------------------

    def route(
        self,
        table: sa.Table,
        event: str,
        new: Values | None,
        old: Values | None,
        only: Subscription | None = None,
    ) -> list[Subscription]:
        """Subscriptions concerned by a change (each once), after updating their interests.

        ``new`` is None for a delete, ``old`` None for an insert. With ``only``, just that
        subscription is considered (a change replayed to it alone).
        """
        # An update that kept its identifying columns moves no row in or out of anything
        # followed: no interest changes (the common case, and the one fan-out must keep cheap).
        same = new is not None and old is not None and (new is old or new == old)
        upkeep = not (event == "updated" and same)
        sources = [v for v in (new, old) if v is not None]
        if same:
            del sources[1:]
        with self._lock:
            matched: dict[Subscription, list[Interest]] = {}
            for cols in list(self._shapes.get(table, ())):
                for values in sources:
                    key = (table, cols, _project(values, cols))
                    subs = self._index.get(key)
                    if not subs:
                        continue
                    if only is not None:
                        if only not in subs:
                            continue
                        subs = {only}
                    if not upkeep:
                        matched.update(dict.fromkeys(subs, _NO_KEYS))
                        continue
                    for sub in subs:
                        keys = matched.setdefault(sub, [])
                        if key not in keys:
                            keys.append(key)
            if upkeep:
                for sub, keys in matched.items():
                    for key in keys:
                        for (edge, nested), _count in list(sub.interests.get(key, {}).items()):
                            self._upkeep(sub, key, edge, nested, event, new, old)
            result = list(matched)
            for sub in self._models.get(table, ()):
                if only is not None and sub is not only:
                    continue
                hit, follow = _model_match(sub, table, event, new, old)
                if not hit:
                    continue
                if sub not in matched:
                    result.append(sub)
                if follow is not None and new is not None:
                    for key in self._row_keys(table, new):
                        self._bump(sub, key, (None, follow), +1)
                    self._hold(sub, self._whole(table, new), follow, +1)
            return result

    def _whole(self, table: sa.Table, values: Values) -> Values:
        """A row of a subclass table with its base table's row: the columns its relationships
        join on may be in either."""
        identity = self.graph.identity(table)
        if identity is table:
            return values
        base = self.resolver.row_values(identity, key_of(table, values))
        return values if base is None else {**base, **values}

    def _upkeep(
        self,
        sub: Subscription,
        key: Interest,
        edge: Edge | None,
        nested: Spec,
        event: str,
        new: Values | None,
        old: Values | None,
    ) -> None:
        """Keep a subscription's interests in step with a change that matched ``key``."""
        table, cols, values = key
        if not cols:
            return  # a table-wide interest (re-queried relationship): nothing to follow
        inside_new = new is not None and tuple(new.get(c) for c in cols) == values
        inside_old = old is not None and tuple(old.get(c) for c in cols) == values
        if edge is None:  # a root row
            if event == "deleted":
                self._hold(sub, old or {}, nested, -1)
                if any(m[0] is table and m[3] is not None for m in sub.models):
                    while self._bump(sub, key, (None, nested), -1):
                        pass  # a followed model brings the row back if it is inserted again
                # else the key stays: a query for this row returns it again if it comes back
            elif event == "inserted" and new is not None:
                self._hold(sub, new, nested, +1)
            elif old is not None and new is not None and old != new:
                self._hold(sub, old, nested, -1)
                self._hold(sub, new, nested, +1)
            return
        if table is not _edge_key_table(edge):
            return  # a held row's own key (behind an association, or of a subclass table)
        if not nested and not edge.row_tables:
            return  # nothing is followed below this edge's rows
        reason_key = key
        if inside_old and old is not None and (not inside_new or old != new):
            child_key = self._child_key(edge, old)
            if not (edge.links_repeat and self._still_linked(edge, old, child_key)):
                self._leave(sub, reason_key, edge, nested, child_key)
        if inside_new and new is not None and (not inside_old or old != new):
            self._enter(sub, reason_key, edge, nested, self._child_values(edge, new, nested))

    def _child_key(self, edge: Edge, values: Values) -> tuple[Any, ...]:
        if edge.secondary is None:
            return key_of(edge.target_table, values)
        return key_of(edge.target_table, edge.link_target(values))

    def _still_linked(self, edge: Edge, link: Values, child_key: tuple[Any, ...]) -> bool:
        """Whether another link row still pairs the parent and target ``link`` paired."""
        members = self.resolver.members(edge, edge.remote(link))
        return any(key_of(edge.target_table, row) == child_key for row in members)

    def _child_values(self, edge: Edge, values: Values, nested: Spec) -> Values:
        """The row an edge's change brings in: the row itself, or a link's target."""
        if edge.secondary is None:
            return values
        target = edge.link_target(values)
        if nested:
            row = self.resolver.row_values(edge.target_table, key_of(edge.target_table, target))
            if row is not None:
                return row
        return target


_NO_KEYS: list[Interest] = []


def _project(values: Values, cols: tuple[str, ...]) -> tuple[Any, ...]:
    if len(cols) == 1:  # most keys: 5x cheaper than building a list
        return (values.get(cols[0]),)
    return tuple([values.get(c) for c in cols])


def _key_in(table: sa.Table, key: tuple[Any, ...]) -> Interest:
    """The interest in the row of ``table`` whose key is ``key``."""
    return (table, key_names(table), key)


def _edge_key_table(edge: Edge) -> sa.Table:
    """The table holding the columns that say which parent a row belongs to."""
    return edge.secondary if edge.secondary is not None else edge.target_table


def _edge_key(edge: Edge, local: tuple[Any, ...]) -> Interest:
    return (_edge_key_table(edge), edge.remote_names, local)


@functools.cache
def _classes(mapper: Mapper[Any], table: sa.Table) -> tuple[str, frozenset[Any]] | None:
    """For a subclass whose discriminator is a column of ``table``: its name, and the values
    naming ``mapper`` or a subclass of it (a row of ``table`` may be of another class)."""
    column = mapper.polymorphic_on
    if mapper.inherits is None or not isinstance(column, sa.Column) or column.table is not table:
        return None
    return column.name, frozenset(m.polymorphic_identity for m in mapper.self_and_descendants)


def _model_match(
    sub: Subscription, table: sa.Table, event: str, new: Values | None, old: Values | None
) -> tuple[bool, Spec | None]:
    """Whether a model-level interest of ``sub`` matches, and the spec to follow the row with
    when it entered the model: inserted, or its discriminator changed to the model's class."""
    hit, spec = False, None
    values = new if new is not None else old
    for model_table, wanted, filters, follow, mapper in sub.models:
        if model_table is not table or (wanted is not None and wanted != event):
            continue
        classes = None if mapper is None else _classes(mapper, table)
        if classes is not None and (values is None or values.get(classes[0]) not in classes[1]):
            continue
        if all(
            any(v is not None and k in v and v[k] == f for v in (new, old))
            for k, f in filters.items()
        ):
            hit = True
            entered = event == "inserted" or (
                classes is not None and old is not None and old.get(classes[0]) not in classes[1]
            )
            spec = follow if follow is not None and entered else spec
    return hit, spec
