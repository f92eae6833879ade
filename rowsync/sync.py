"""``sync``: patch a loaded object tree from one change message, instead of re-querying.

One mechanism serves every relationship kind. A change of a row of table ``T`` concerns
the edges :meth:`Graph.edges_for` returns; for each edge loaded somewhere in the tree, the
row's place is recomputed from where ``T`` sits on the edge's path:

* ``T`` is the target of a direct edge: the row belongs to a parent when its remote
  columns equal the parent's local ones and the edge's criteria hold;
* ``T`` is an association table: a link row pairs one parent with one target;
* ``T`` is the target of an association: deleted -> gone everywhere; moved into or out of
  the criteria -> its links decide (one shared query, only when it moves in);
* ``T`` is the parent of a many-to-one: its own foreign key picks the target;
* the edge cannot be read off rows (``recompute``): re-query it for the parents in the tree.

Then :meth:`_Patch.ensure` makes the collection (or reference) hold the row or not.
Everything is idempotent (present stays present, absent stays absent) and attribute patches
carry the change's ``ref``, so an older change never overwrites a newer one.
"""

from __future__ import annotations

import bisect
import functools
import logging
import operator
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.base import instance_dict, instance_state

from rowsync import ordering, tree
from rowsync.cache import GONE, CachedRow
from rowsync.fetch import RowSource, key_of, table_of
from rowsync.graph import Edge, Graph
from rowsync.messages import Change, Sync
from rowsync.roots import Rule
from rowsync.watchers import Assocs, assocs_spec

logger = logging.getLogger(__name__)

Parents = Mapping[int, Any]
"""The parents having an edge loaded, by ``id``."""

Preloads = Mapping[Any, Assocs]
"""``{Model: assocs}``: what new objects of ``Model`` come back with loaded."""

_REF = "rowsync_ref"

_T = TypeVar("_T")


class Syncer:
    """Applies messages to trees; holds what every call shares (graph, row source)."""

    def __init__(self, graph: Graph, rows: RowSource, index_cache: int = 1024) -> None:
        self.graph = graph
        self.rows = rows
        self._indexes: OrderedDict[int, _CachedIndex] = OrderedDict()
        """Indexes by ``id`` of the tree's value, least recently used first."""
        self._index_cache = index_cache
        self._lock = threading.Lock()
        self._rules: dict[int, list[tuple[list[Any], Rule, object]]] = {}
        """Root lists by ``id``, with the rules their subscriptions declared and who did."""
        tree.watch_mutations(graph.digraph.nodes)

    def index(self, value: Any, roots: list[Any]) -> tree.Index:
        """The index of a tree, walked once and then kept current by the syncs that reshape
        the tree, so that a message costs what it touches, not the size of the tree.

        It is walked again when something else reshaped the tree: its root list was changed
        by hand, the application appended, removed, assigned or expired a relationship
        (SQLAlchemy events: every index is stale, see :class:`tree.Generation`), or a sync of
        another tree reshaped objects this one shares (:meth:`forget`).
        """
        if not roots:
            return tree.Index.of(roots)
        with self._lock:
            cached = self._indexes.get(id(value))
            if cached is not None:
                self._indexes.move_to_end(id(value))
        if (
            cached is not None
            and cached.value is value
            and cached.index.generation == tree.Generation.outside
            and cached.holds(roots)
        ):
            return cached.index
        index = tree.Index.of(roots)
        for root in roots:  # read before a patch changes what is loaded on them
            tree.keep_declared_spec(root)
        with self._lock:
            self._indexes[id(value)] = _CachedIndex.of(value, roots, index)
            self._indexes.move_to_end(id(value))
            while len(self._indexes) > self._index_cache:
                self._indexes.popitem(last=False)
        return index

    def declare(self, roots: list[Any], rule: Rule, owner: object) -> None:
        """Rows join and leave ``roots`` by ``rule`` (declared by ``owner``, a subscription)."""
        with self._lock:
            self._rules.setdefault(id(roots), []).append((roots, rule, owner))

    def undeclare(self, owner: object) -> None:
        """Forget the rules ``owner`` declared (it is closed)."""
        with self._lock:
            for key, entries in list(self._rules.items()):
                kept = [e for e in entries if e[2] is not owner]
                if kept:
                    self._rules[key] = kept
                else:
                    del self._rules[key]

    def rule(self, roots: list[Any], table: sa.Table) -> Rule | None:
        """The rule ``roots`` change by, for rows of ``table`` (or of any table of its
        inheritance hierarchy); None: they do not grow."""
        with self._lock:
            entries = self._rules.get(id(roots))
            if not entries:  # no subscription declared one for this list
                return None
            identity = self.graph.identity(table)
            for held, rule, _ in entries:
                if held is roots and tree.identity_table(rule.mapper) is identity:
                    return rule
        return None

    def forget(self, objects: list[Any], keep: tree.Index | None = None) -> None:
        """Drop the cached indexes, other than ``keep``, that hold any of ``objects``: what
        those objects hold changed (through ``keep``, which followed). Trees sharing none
        keep theirs."""
        ids = {id(o) for o in objects}
        with self._lock:
            stale = [
                k
                for k, c in self._indexes.items()
                if c.index is not keep and c.index.holds_any(ids)
            ]
            for key in stale:
                del self._indexes[key]

    def _rerooted(self, value: Any, roots: list[Any], index: tree.Index) -> None:
        """The sync through ``index`` changed the root list: the cached copy follows."""
        with self._lock:
            cached = self._indexes.get(id(value))
            if cached is not None and cached.index is index:
                self._indexes[id(value)] = _CachedIndex.of(value, roots, index)

    def _drop(self, value: Any) -> None:
        with self._lock:
            self._indexes.pop(id(value), None)

    def sync(self, value: Any, message: Any, preloads: Preloads | None = None) -> Any:
        """Return ``value`` with ``message`` applied (the same list/object, patched in place).

        ``value`` is None, a model object or a list of them; anything else, and any message
        other than ``(Sync, Change)``, comes back unchanged.
        """
        if not (isinstance(message, tuple) and len(message) == 2 and message[0] is Sync):
            return value
        change = message[1]
        if not isinstance(change, Change):
            return value
        if value is None:
            roots: list[Any] = []
        elif isinstance(value, list):
            roots = value
            if roots and not tree.is_model(roots[0]):
                return value
        elif tree.is_model(value):
            roots = [value]
        else:
            return value
        table = table_of(change.model)
        if roots and table not in self.graph.reachable(instance_state(roots[0]).mapper):
            return value
        rule = self.rule(value, table) if isinstance(value, list) else None
        patch = _Patch(self, value, roots, change, table, preloads or {}, rule)
        self._run(value, roots, patch, patch.apply)
        if isinstance(value, list):
            return value
        return roots[0] if roots else None

    def reroot(
        self,
        roots: list[Any],
        change: Change,
        joined: list[Any],
        left: list[Any],
        spec: tree.LoadSpec,
    ) -> list[Any]:
        """``change``'s step on the roots, when the caller decides it (a live query runs its
        statement where :meth:`sync` would read a rule): each object of ``joined``, as a query
        of the roots loaded it with ``spec``, becomes a root; ``left`` are roots no more. The
        tree changes as a sync changes it (:meth:`_Patch.reroot`), its kept index with it.
        Returns the new roots, in the order of ``joined``."""
        patch = _Patch(self, roots, roots, change, table_of(change.model), {})
        return self._run(roots, roots, patch, functools.partial(patch.reroot, joined, left, spec))

    def _run(self, value: Any, roots: list[Any], patch: _Patch, step: Callable[[], _T]) -> _T:
        """``step`` of ``patch``, then the cached copy of a root list it changed follows."""
        try:
            result = step()
        except BaseException:
            self._drop(value)  # half applied: its index may not describe it
            raise
        if patch.rerooted:
            self._rerooted(value, roots, patch.index)
        return result

    def resync(self, value: Any) -> Any:
        """``value`` re-read from the database by primary key, loaded as it was loaded.

        Roots deleted meanwhile are gone; rows inserted meanwhile cannot be known from the
        tree (re-run the query for those). Lists are updated in place.
        """
        roots = value if isinstance(value, list) else tree.as_list(value)
        if not roots or not tree.is_model(roots[0]):
            return value
        groups: dict[Any, list[Any]] = {}
        for obj in roots:  # by the mapper they were queried as: their class may have changed
            groups.setdefault(tree.entity(obj), []).append(obj)
        fresh: dict[tuple[Any, tuple[Any, ...]], Any] = {}
        for mapper, objs in groups.items():
            spec = tree.own_spec(objs[0])
            found = self.rows.objects(mapper, [tree.primary_key(o) for o in objs], spec)
            for key, obj in found.items():
                tree.remember_spec(obj, spec)
                tree.remember_entity(obj, mapper)
                fresh[(mapper, key)] = obj
        result = [
            fresh[key]
            for key in ((tree.entity(o), tree.primary_key(o)) for o in roots)
            if key in fresh
        ]
        if isinstance(value, list):
            value[:] = result
            return value
        return result[0] if result else None


_OBJECT_EQ: Any = object.__eq__


@dataclass(frozen=True, slots=True)
class _CachedIndex:
    """A tree's index, with what it was built from: the value and a copy of its roots."""

    value: Any
    roots: list[Any]
    by_identity: bool
    """A class whose instances can be in the list (a root's class or a subclass of it)
    defines ``__eq__``: roots are compared by identity, element by element."""
    index: tree.Index

    @classmethod
    def of(cls, value: Any, roots: list[Any], index: tree.Index) -> _CachedIndex:
        kinds = {type(r) for r in roots}
        mappers = {m for kind in kinds for m in sa.inspect(kind).self_and_descendants}
        plain = all(m.class_.__eq__ is _OBJECT_EQ for m in mappers)
        return cls(value, list(roots), not plain, index)

    def holds(self, roots: list[Any]) -> bool:
        """Whether ``roots`` are still the very objects the index was built from. Without a
        custom ``__eq__`` on any class a root can have, list equality is identity, compared in
        C (~1 ns a root, where a tuple of ids costs ~70 us for 1,000 roots, the bulk of a
        sync): no user ``__eq__`` can run."""
        if len(roots) != len(self.roots):
            return False
        if self.by_identity:
            return all(map(operator.is_, self.roots, roots))
        return self.roots == roots


class _Patch:
    """One message applied to one tree."""

    def __init__(
        self,
        syncer: Syncer,
        value: Any,
        roots: list[Any],
        change: Change,
        table: sa.Table,
        preloads: Preloads,
        rule: Rule | None = None,
    ) -> None:
        self.syncer = syncer
        self.rule = rule
        self.growing = value is None
        """``sync(None, insert)``: not a root list, a wait for a row; the row is the result."""
        self.graph = syncer.graph
        self.rows = syncer.rows
        self.roots = roots
        self.change = change
        self.table = table
        self.identity = self.graph.identity(table)
        """The table naming the row's object: its hierarchy's base (the key is the same)."""
        self.key = key_of(table, change.ids)
        self.deleted = change.event == "deleted"
        self.preloads = preloads
        self.index = syncer.index(value, roots)
        self.touched: list[Any] = []
        """Objects a change put in a new place or took from one: they must look loaded as a
        fresh query would load them where they now are."""
        self.reshaped: list[Any] = []
        """Objects of the tree whose relationships this change set or unloaded (or whose
        place among the roots changed): other trees' cached indexes holding one are stale."""
        self.rerooted = False
        """Whether the root list changed (members or order)."""
        self.requery: dict[Edge, dict[int, Any]] = {}
        """Parents whose collection only a query can tell (by edge, then ``id``)."""
        self.row: CachedRow | None = None
        if not self.deleted:
            found = self.rows.row(table, self.key, change.ref)
            if found is GONE:
                # Deleted before its batch was read. The delete's own message may never come:
                # it is routed by where the row was last, which may be outside this tree.
                self.deleted = True
            else:
                self.row = found
        self.row_class = self._row_class()
        """The mapper the changed row loads as now (see :meth:`_row_class`)."""

    def apply(self) -> None:
        if self.row is not None:
            ref = self.change.ref
            for obj in self.index.instances(self.identity, self.key):
                info = instance_state(obj).info
                if info.get(_REF, 0) < ref:  # never older over newer, never twice
                    tree.patch(obj, self.row.values, self.table)
                    info[_REF] = ref
            if (kind := self.row_class) is not None:
                for obj in list(self.index.instances(self.identity, self.key)):
                    mapper = instance_state(obj).mapper
                    if mapper is not kind and mapper.base_mapper is kind.base_mapper:
                        self.reclass(obj, kind)
        for edge in self.graph.edges_for(self.table):
            parents = self.index.loaded.get((edge.parent, edge.key))
            if not parents:
                continue
            if edge.recompute:
                self.recompute(edge, list(parents.values()))
                continue
            if self.table is edge.target_table:
                if edge.secondary is None:
                    self.direct(edge, parents)
                else:
                    self.association_target(edge, parents)
            if self.table is edge.secondary:
                self.link(edge, parents)
            if self.table is edge.parent_table and not edge.local_is_key and not self.deleted:
                self.repoint(edge, parents)
        for edge, stale in self.requery.items():
            self.recompute(edge, list(stale.values()))
        self.root()
        self.finish()

    def finish(self) -> None:
        """What every change of the tree ends with: what no root reaches any more is
        forgotten, what moved is loaded as a fresh query loads it where it now is, and the
        other trees' indexes holding what changed shape are dropped."""
        self.index.settle()
        if self.touched:
            self.conform()
        if self.reshaped:
            self.syncer.forget(self.reshaped, self.index)

    def _row_class(self) -> Mapper[Any] | None:
        """The mapper the changed row loads as now, read from its discriminator; None for a
        delete, a row without a class to read (a plain table, a model outside a polymorphic
        hierarchy), or a subclass table's row (its base row says)."""
        model: Any = self.change.model
        if self.row is None or self.table is not self.identity or isinstance(model, sa.Table):
            return None
        mapper = _polymorphic(model)
        return None if mapper is None else tree.row_mapper(mapper, self.row.values)

    def admits(self, edge: Edge) -> bool:
        """Whether the changed row is of a class ``edge`` holds (a relationship to a
        single-table subclass holds only the rows its discriminator names)."""
        kind = self.row_class
        return not edge.by_class or (kind is not None and tree.isa(kind, edge.target))

    def reclass(self, old: Any, kind: Mapper[Any]) -> None:
        """The row's class changed: an object of the new class, loaded as ``old`` was, takes
        every place of ``old`` (then the places that do not hold that class drop it)."""
        spec = tree.expected_spec(old)
        fetched = self.rows.load(kind, self.key, spec, self.change.ref)
        if fetched is None:
            return  # changed again, or deleted, before it could be read: a later change says
        places = list(self.index.places(old))
        # a copy of its own (the tree's instance of the row is ``old``), sharing what is below
        new = tree.clone(
            fetched,
            {},
            lambda row: None if row is fetched else self.own(row),
            self.index.set,
        )
        instance_state(new).info[_REF] = self.change.ref
        tree.remember_spec(new, spec)
        tree.remember_entity(new, tree.entity(old))
        for parent, key in places:
            if parent is None:
                self.roots[:] = [new if r is old else r for r in self.roots]
                self.index.leave(old)
                self.index.join(new)
                self.rerooted = True
                continue
            edge = self.graph.edge(instance_state(parent).mapper, key or "")
            value = tree.loaded_value(parent, edge.key)
            if edge.uselist:
                self.assign(parent, edge, [new if o is old else o for o in tree.as_list(value)])
            else:
                self.assign(parent, edge, new)
        self.index.settle()  # ``old`` is found no more: the row's instance is ``new``
        self.touched += [old, new]
        self.reshaped += [old, new]
        tree.Generation.bump()

    # -- where the changed row sits on the edge --------------------------------------

    def local(self, parent: Any, edge: Edge) -> tuple[Any, ...]:
        """The columns ``parent`` joins ``edge`` on. One the query left unloaded
        (``load_only``, ``defer``: a foreign key under a loaded many-to-one) is the row's."""
        names = edge.local_names
        local = tree.values_of(parent, names)
        if None not in local:
            return local
        values = tree.column_values(parent)  # a None may be a value or a column not loaded
        if all(n in values for n in names):
            return local
        key = tree.primary_key(parent)
        for table in tree.unloaded_tables(parent):
            found = self.rows.row(table, key, self.change.ref)
            if found is not GONE:
                values = {**found.values, **values}
        return tuple(values.get(n) for n in names)

    def direct(self, edge: Edge, parents: Parents) -> None:
        row = self.row
        remote = edge.remote(row.values) if row else None
        wanted = (
            row is not None
            and (edge.criteria is None or edge.criteria in row.matches)
            and self.admits(edge)
        )
        for parent in self.candidates(edge, parents, remote):
            self.ensure(parent, edge, self.key, wanted and self.local(parent, edge) == remote, row)

    def candidates(
        self, edge: Edge, parents: Parents, *locals_: tuple[Any, ...] | None
    ) -> list[Any]:
        """Parents whose membership can change: those holding the row now, and those whose
        local columns are one of ``locals_``. Found through the index when the local columns
        are a primary key (they never change); otherwise every parent is looked at."""
        if not edge.local_is_key:
            return list(parents.values())
        found: dict[int, Any] = {}
        by_local = self.index.by_local(edge.parent, edge.key, edge.local_names)
        for local in locals_:
            if local is not None:
                for parent in by_local.get(local, ()):
                    found[id(parent)] = parent
        for obj in self.index.instances(edge.target_identity, self.target_key(edge)):
            for parent in self.index.held_by(obj, edge.parent, edge.key):
                found[id(parent)] = parent
        return list(found.values())

    def target_key(self, edge: Edge) -> tuple[Any, ...]:
        """The key of the target row this change is about (for a link row: its target's)."""
        if self.table is not edge.secondary:
            return self.key
        values = self.change.ids
        return key_of(edge.target_table, edge.link_target(values))

    def association_target(self, edge: Edge, parents: Parents) -> None:
        if self.deleted:
            for parent in self.candidates(edge, parents):
                self.ensure(parent, edge, self.key, False)
            return
        assert self.row is not None
        if edge.criteria is None or edge.criteria not in self.row.matches:
            for parent in self.candidates(edge, parents):
                self.ensure(parent, edge, self.key, False if edge.criteria else None)
            return
        target = tuple(self.row.values.get(t.name) for _, t in edge.target_pairs)
        linked = self.rows.links(edge, target, self.change.ref)
        if edge.links_repeat:
            self.relink(edge, parents, list(linked))
            return
        for parent in self.candidates(edge, parents, *linked):
            self.ensure(
                parent,
                edge,
                self.key,
                True if self.local(parent, edge) in linked else None,
                self.row,
            )

    def link(self, edge: Edge, parents: Parents) -> None:
        new = None if self.deleted or self.row is None else self.row.values
        old = self.change.ids if self.deleted else (self.row.old if self.row else None)
        pairs = []
        if old is not None:
            pairs.append((old, False))
        if new is not None:
            pairs.append((new, True))
        if edge.links_repeat:
            self.relink(edge, parents, [edge.remote(values) for values, _ in pairs])
            return
        for values, present in pairs:
            local = edge.remote(values)
            target = key_of(edge.target_table, edge.link_target(values))
            row = None
            if present and edge.criteria is not None:
                found = self.rows.row(edge.target_table, target, self.change.ref)
                present = found is not GONE and edge.criteria in found.matches
                row = found if found is not GONE else None
            for parent in self.candidates(edge, parents, local):
                if self.local(parent, edge) == local:
                    self.ensure(parent, edge, target, present, row)

    def relink(self, edge: Edge, parents: Parents, locals_: list[tuple[Any, ...]]) -> None:
        """The links of parents whose local columns are one of ``locals_``, re-read: where a
        pair may be linked several times, only SQLAlchemy's loader knows what it holds."""
        wanted = set(locals_)
        found = self.candidates(edge, parents, *wanted)
        if group := [p for p in found if self.local(p, edge) in wanted]:
            self.recompute(edge, group)

    def repoint(self, edge: Edge, parents: Parents) -> None:
        """A many-to-one whose foreign key lives on the changed row: follow the key."""
        remote = [r for _, r in edge.pairs]
        by_target_key = set(remote) == set(edge.target_table.primary_key.columns)
        for parent in list(self.index.instances(self.identity, self.key)):
            if id(parent) not in parents:
                continue
            if not by_target_key or edge.uselist:
                self.recompute(edge, [parent])
                continue
            local = self.local(parent, edge)
            current = tree.loaded_value(parent, edge.key)
            if any(v is None for v in local):
                if current is not None:
                    self.assign(parent, edge, None)
                continue
            target = key_of(
                edge.target_table, {r.name: v for r, v in zip(remote, local, strict=True)}
            )
            self.ensure(parent, edge, target, True)

    def recompute(self, edge: Edge, parents: list[Any]) -> None:
        """Re-query the relationship for these parents: SQLAlchemy's own answer, duplicates
        included."""
        by_strategy: dict[str, list[Any]] = {}
        for parent in parents:
            by_strategy.setdefault(tree.strategy(parent, edge.key), []).append(parent)
        memo: dict[int, Any] = {}
        for strategy, group in by_strategy.items():
            keys = [tree.primary_key(p) for p in group]
            spec = _child_spec(group[0], edge)
            fresh = self.rows.reload(edge, keys, spec, strategy, self.change.ref)
            for parent, key in zip(group, keys, strict=True):
                items = [self.reuse(o, memo) for o in fresh.get(key, [])]
                for obj in items:
                    if not self.index.instances(_table(obj), tree.primary_key(obj)):
                        # new to the tree: what joins below it later is loaded as it was
                        tree.remember_spec(obj, spec)
                self.assign(parent, edge, items if edge.uselist else (items[0] if items else None))

    def root(self) -> None:
        """The roots themselves. A deleted root leaves. Otherwise the list's rule (declared
        by its subscription: :mod:`rowsync.roots`) says whether the row is a root now, and
        where; a list without one never gains a row it cannot know its query returns, and
        loses one no longer of its class (its discriminator changed)."""
        if self.roots and _table(self.roots[0]) is not self.identity:
            return  # a row of another table: never one of these roots
        entity = self.entity
        if entity is None:
            return
        held = [
            r for r in self.index.instances(self.identity, self.key) if id(r) in self.index.roots
        ]
        if self.deleted:
            self.leave(held)
            return
        if self.row is None:
            return
        if self.rule is None:
            kind = self.row_class
            if kind is not None and not tree.isa(kind, entity):
                self.leave(held)
            elif self.growing and self.change.event == "inserted":
                self.join(entity, None)
            return
        wanted = self.rule.admits(self.key, self.row.values)
        if wanted and not held:
            self.join(self.rule.mapper, self.rule.spec)
            self.rule.arrange(self.roots)
        elif held and not wanted:
            self.leave(held)
        elif held and self.change.event == "updated":
            self.rule.arrange(self.roots)
            self.rerooted = True

    def join(self, mapper: Mapper[Any], spec: tree.LoadSpec | None) -> None:
        """The changed row becomes a root of ``mapper`` (the class the list was queried as),
        loaded like its sibling roots (or as ``spec`` says); held below already (it entered
        a collection first), that instance joins the roots."""
        if spec is None and self.roots:
            spec = tree.own_spec(self.roots[0])
        obj = self.instance(mapper, self.key, self.row, spec)
        if obj is not None:
            self.enter(obj, mapper, spec)

    def enter(self, obj: Any, mapper: Mapper[Any], spec: tree.LoadSpec | None) -> None:
        """``obj``, the tree's instance of its row, becomes a root of ``mapper`` loaded with
        ``spec`` (held below already, it had another)."""
        if spec is not None:
            tree.remember_root_spec(obj, spec)
        tree.remember_entity(obj, mapper)
        self.roots.append(obj)
        self.index.join(obj)
        self.rerooted = True
        self.touched.append(obj)
        self.reshaped.append(obj)
        tree.Generation.bump()

    def reroot(self, joined: list[Any], left: list[Any], spec: tree.LoadSpec) -> list[Any]:
        """The roots as the caller decided them (see :meth:`Syncer.reroot`). A joined row the
        tree holds below already joins as that instance, given what ``spec`` loads that it
        lacks; ``left`` that a sync took out already (deleted) are left as they are."""
        memo: dict[int, Any] = {}  # rows shared by the new roots stay shared
        entered = []
        for fetched in joined:
            new = not self.index.instances(_table(fetched), tree.primary_key(fetched))
            obj = self.reuse(fetched, memo)
            if new:  # what joins below it later is loaded as it was
                tree.remember_spec(obj, spec)
            self.enter(obj, tree.entity(fetched), spec)
            entered.append(obj)
        self.leave([obj for obj in left if id(obj) in self.index.roots])
        self.finish()
        return entered

    def leave(self, gone: list[Any]) -> None:
        if not gone:
            return
        gone_ids = {id(r) for r in gone}
        self.roots[:] = [r for r in self.roots if id(r) not in gone_ids]
        for obj in gone:
            self.index.leave(obj)
        self.rerooted = True
        self.touched += gone
        self.reshaped += gone
        tree.Generation.bump()

    @functools.cached_property
    def entity(self) -> Mapper[Any] | None:
        """The mapper the roots were queried as; for an emptied list, the model ``preloads``
        names in the changed row's hierarchy (None if it names none), else the change's."""
        if self.roots:
            return tree.entity(self.roots[0])
        models = [m for m in self.preloads if not isinstance(m, sa.Table)] or [self.change.model]
        mappers: list[Mapper[Any]] = [sa.inspect(m) for m in models if not isinstance(m, sa.Table)]
        return next((m for m in mappers if tree.identity_table(m) is self.identity), None)

    # -- making a collection hold a row, or not ---------------------------------------

    def ensure(
        self,
        parent: Any,
        edge: Edge,
        target: tuple[Any, ...],
        present: bool | None,
        row: CachedRow | None = None,
    ) -> None:
        """``present``: True -> hold it, False -> drop it, None -> leave membership, fix order."""
        current = tree.loaded_value(parent, edge.key)
        if current is tree.NOT_LOADED:
            return  # expired since the tree was indexed: nothing loaded to keep current
        if not edge.uselist:
            held = current is not None and tree.primary_key(current) == target
            if present and not held:
                obj = self.instance(edge.target, target, row, _child_spec(parent, edge))
                if obj is not None:
                    self.assign(parent, edge, obj)
            elif present is False and held:
                self.assign(parent, edge, None)
            return
        items = tree.as_list(current)
        known = self.index.instances(edge.target_identity, target)
        at = tree.find(items, known)
        held = at >= 0
        if (
            held
            and tree.keyed(current)
            and (present is False or not tree.placed(parent, edge.key, current, items[at]))
        ):
            # leaving its key (or re-keyed) may uncover a row that key hid: ask the database
            self.requery.setdefault(edge, {})[id(parent)] = parent
            return
        if present and not held:
            # the tree's own instance when it has one (a move), as ``instance`` would give
            obj = (
                known[0]
                if known
                else self.instance(edge.target, target, row, _child_spec(parent, edge))
            )
            if obj is None:
                return
            items = _inserted(edge, items, obj)
        elif present is False and held:
            gone = {id(o) for o in known}
            items = [o for o in items if id(o) not in gone]
        elif not (held and edge.order_by) or edge.order_is_key:
            return  # not held, unordered, or held where it stays (ordered by its key)
        elif _in_place(edge, items, at):
            return  # still between its neighbours: an update that moved nothing
        else:
            ordered = sorted(items, key=_order_key(edge))
            if all(map(operator.is_, ordered, items)):
                return
            items = ordered
        self.assign(parent, edge, items)

    def assign(self, parent: Any, edge: Edge, value: Any) -> None:
        """Set a relationship as if loaded (nothing marked dirty), noting who came and went."""
        lost, gained = self.index.set(parent, edge.key, value)
        self.touched += lost
        self.touched += gained
        self.reshaped.append(parent)
        tree.Generation.bump()

    def instance(
        self,
        mapper: Mapper[Any],
        key: tuple[Any, ...],
        row: CachedRow | None,
        spec: tree.LoadSpec | None,
    ) -> Any:
        """The object for a row joining the tree: the tree's own if it holds one, else new,
        loaded as a fresh query would load it there: like its parent's loader options say,
        or like its sibling roots; with nothing to go by (an empty root), as ``preloads`` says."""
        table = tree.identity_table(mapper)
        existing = self.index.instances(table, key)
        if existing:
            return existing[0]
        if spec is None:
            spec = _preload_spec(mapper, self.preloads) or {}
        if spec or len(tree.hierarchy_tables(mapper)) > 1:
            # An object spanning several tables is read whole, as its class, by the ORM.
            loaded = self.rows.load(mapper, key, spec, self.change.ref)
            obj = None if loaded is None else self.reuse(loaded, {})
        else:
            if row is None or key_of(table, row.values) != key:
                found = self.rows.row(table, key, self.change.ref)
                row = None if found is GONE else found
            kind = None if row is None else tree.row_mapper(mapper, row.values)
            obj = None
            if row is not None and kind is not None and tree.isa(kind, mapper):
                obj = tree.build(kind, row.values)
        if obj is not None:
            instance_state(obj).info[_REF] = self.change.ref
            tree.remember_spec(obj, spec)
            self.index.adopt(obj)
        return obj

    @functools.cached_property
    def root_spec(self) -> tree.LoadSpec | None:
        """What the roots' loader options load (read before any root changed)."""
        return tree.declared_spec(self.roots[0]) if self.roots else None

    def conform(self) -> None:
        """Make each moved object loaded as a fresh query would load it where it now is: the
        union of what its places' loader options load. What none of them loads is unloaded
        (it would go stale: nobody follows it any more), what one loads and it lacks is loaded."""
        done: set[int] = set()
        for obj in self.touched:
            self._conform(obj, done)

    def _conform(self, obj: Any, done: set[int]) -> None:
        if id(obj) in done:
            return
        done.add(id(obj))
        index = self.index
        if not index.holds(obj):
            # Gone from the tree: what it held may have lost a place (or its last one).
            for rel in instance_state(obj).mapper.relationships:
                value = tree.loaded_value(obj, rel.key)
                for child in tree.as_list(None if value is tree.NOT_LOADED else value):
                    self._conform(child, done)
            return
        spec: dict[str, Any] = {}
        root = id(obj) in index.roots
        read_below = False  # by a loader that queries its row at a place below the roots
        for parent, key in list(index.places(obj)):
            if parent is None:
                declared = self.root_spec
                if declared is None:
                    declared = _preload_spec(instance_state(obj).mapper, self.preloads)
            else:
                declared = tree.places_spec(parent)
            if declared is None:
                return  # a place loaded without options: what is loaded is all we know
            here = declared if parent is None else declared.get(key or "", {})
            if root and tree.looked_up(here):
                continue  # its loader finds the root, loaded first, in the session
            read_below = read_below or parent is not None
            spec = tree.merge_specs(spec, here)
        tree.remember_places_spec(obj, spec)
        if root and read_below:
            # that query fills the columns the roots' options left unloaded (load_only)
            for table in tree.unloaded_tables(obj):
                found = self.rows.row(table, tree.primary_key(obj), self.change.ref)
                if found is not GONE:
                    tree.patch(obj, found.values, table)
        state = instance_state(obj)
        data = instance_dict(obj)
        unloaded = []
        for rel in state.mapper.relationships:
            if rel.key in data and rel.key not in spec:
                unloaded += tree.as_list(data[rel.key])
                index.unset(obj, rel.key)  # as a fresh query leaves it
                self.reshaped.append(obj)
        if unloaded:
            index.settle()
        missing = {
            k: v for k, v in spec.items() if k not in data and k in state.mapper.relationships
        }
        if missing:
            self.reshaped.append(obj)
            fetched = self.rows.load(state.mapper, tree.primary_key(obj), missing, self.change.ref)
            memo: dict[int, Any] = {}
            for key in missing:
                value = None if fetched is None else tree.loaded_value(fetched, key)
                rel = state.mapper.relationships[key]
                items = [
                    self.reuse(o, memo)
                    for o in tree.as_list(value if value is not tree.NOT_LOADED else None)
                ]
                index.set(obj, key, items if rel.uselist else (items[0] if items else None))
        for key in spec:
            for child in tree.as_list(tree.loaded_value(obj, key)):
                if len(index.places(child)) == 1:
                    self._conform(child, done)
        for child in unloaded:  # a place less: gone, or loaded for its other places only
            self._conform(child, done)

    def reuse(self, fetched: Any, memo: dict[int, Any]) -> Any:
        """The tree's own instance of a fetched row when it has one, else a private copy;
        likewise for every row loaded below it (one instance per row, as one session gives)."""
        return tree.clone(fetched, memo, self.own, self.index.set)

    def own(self, fetched: Any) -> Any:
        """The tree's instance of the row ``fetched`` holds, if it has one."""
        state = instance_state(fetched)
        table = tree.identity_table(state.mapper)
        existing = self.index.instances(table, tree.primary_key(fetched))
        if not existing:
            return None
        # clone may load what it lacks: its shape changes, and what it holds is decided again
        self.reshaped.append(existing[0])
        self.touched.append(existing[0])
        return existing[0]


def _child_spec(parent: Any, edge: Edge) -> tree.LoadSpec:
    spec: tree.LoadSpec = tree.expected_spec(parent)
    return spec.get(edge.key, {})


def state_class(obj: Any) -> Any:
    return instance_state(obj).class_


def _table(obj: Any) -> sa.Table:
    return tree.identity_table(instance_state(obj).mapper)


def _in_place(edge: Edge, items: list[Any], at: int) -> bool:
    """Whether the row at ``items[at]`` is still in ``order_by`` order with its neighbours."""
    names = edge.order_names
    here = tree.values_of(items[at], names)
    if at > 0 and ordering.compare(edge.order_by, tree.values_of(items[at - 1], names), here) > 0:
        return False
    last = len(items) - 1
    return at == last or (
        ordering.compare(edge.order_by, here, tree.values_of(items[at + 1], names)) <= 0
    )


def _order_key(edge: Edge) -> Callable[[Any], Any]:
    """A sort key ordering a collection's objects as ``edge``'s ``order_by`` does."""
    names, key = edge.order_names, ordering.sort_key(edge.order_by)
    return lambda obj: key(tree.values_of(obj, names))


def _inserted(edge: Edge, items: list[Any], obj: Any) -> list[Any]:
    """``items`` (in ``order_by`` order) with ``obj`` where a fresh query puts it: after the
    rows it ties with, as a stable sort of ``[*items, obj]`` would (only the new row's place
    is searched for, not every pair compared again). The search reads each member it looks
    at as how it compares with ``obj`` (-1, 0, 1: in order along the list)."""
    if not edge.order_by:
        return [*items, obj]
    names, order = edge.order_names, edge.order_by
    here = tree.values_of(obj, names)
    at = bisect.bisect_right(
        items, 0, key=lambda o: ordering.compare(order, tree.values_of(o, names), here)
    )
    return [*items[:at], obj, *items[at:]]


@functools.cache
def _polymorphic(model: Any) -> Mapper[Any] | None:
    """The mapper of a model class whose rows' class its discriminator names, else None."""
    mapper: Mapper[Any] = sa.inspect(model)
    return None if mapper.polymorphic_on is None else mapper


def _preload_spec(mapper: Mapper[Any], preloads: Preloads) -> dict[str, Any] | None:
    """What ``preloads`` says objects of ``mapper`` come loaded with, if it names them."""
    assocs = preloads.get(mapper.class_)
    return None if assocs is None else assocs_spec(mapper, assocs)
