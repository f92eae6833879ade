"""Loaded object trees: walking what is loaded (never triggering a lazy load), and
building or cloning detached instances whose attributes look freshly loaded."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any, Final, cast

import sqlalchemy as sa
from sqlalchemy.orm import (
    Mapper,
    MapperProperty,
    RelationshipProperty,
    attributes,
    make_transient_to_detached,
)
from sqlalchemy.orm.base import instance_dict, instance_state, manager_of_class
from sqlalchemy.orm.collections import InstrumentedList
from sqlalchemy.orm.path_registry import PathRegistry


class _NotLoaded:
    def __repr__(self) -> str:
        return "NOT_LOADED"


NOT_LOADED: Final = _NotLoaded()

LoadSpec = Mapping[str, "LoadSpec"]
"""Relationship keys loaded on an object, each with what is loaded below it."""


class _NeverFilled(Mapping[str, Any]):
    """The LoadSpec of a relationship a query sets empty without reading it (the ``noload``
    strategy): loaded, and empty whatever the database holds, so no row ever joins it."""

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "NEVER_FILLED"


NEVER_FILLED: Final = _NeverFilled()


class LookedUp(dict[str, Any]):
    """The LoadSpec below a many-to-one that an ``immediateload`` reads by primary key.
    SQLAlchemy's lazy loader looks the row up in the session before it queries, so an object
    the query loaded before that loader ran gets nothing from this place (the loader options
    chained below it apply only to a row it had to fetch). Every root is such an object: a
    query loads its roots before any immediate loader runs."""


def looked_up(spec: LoadSpec | None) -> bool:
    """Whether ``spec`` is the LoadSpec of a place whose loader looks its row up in the
    session first (:class:`LookedUp`)."""
    return isinstance(spec, LookedUp)


NOLOAD: Final = frozenset({"noload", "None"})
"""The names of SQLAlchemy's ``noload`` strategy as :func:`strategy` reads them
(``lazy=None`` is one)."""


def mapped_table(mapper: Mapper[Any]) -> sa.Table:
    """The table ``mapper`` maps. The stubs say any ``FromClause``; rowsync reads mappers as
    mapped to a :class:`~sqlalchemy.Table` (``watchers()`` refuses a model mapped otherwise)."""
    return cast(sa.Table, mapper.local_table)


@cache
def identity_table(mapper: Mapper[Any]) -> sa.Table:
    """The table that names a row of ``mapper``'s hierarchy: its base mapper's. A subclass
    row of joined-table inheritance is one object whatever table of it changes, as in
    SQLAlchemy's identity map (a subclass table's primary key is the base's)."""
    return mapped_table(mapper.base_mapper)


@cache
def hierarchy_tables(mapper: Mapper[Any]) -> tuple[sa.Table, ...]:
    """Every table of ``mapper``'s inheritance hierarchy, the identity table first: a change of
    any of them is a change of one of the hierarchy's objects."""
    tables: list[sa.Table] = []
    for m in mapper.base_mapper.self_and_descendants:  # the base first
        if isinstance(m.local_table, sa.Table) and m.local_table not in tables:
            tables.append(m.local_table)
    return tuple(tables)


def row_mapper(mapper: Mapper[Any], values: Mapping[str, Any]) -> Mapper[Any]:
    """The mapper a row of ``mapper``'s hierarchy loads as, from its discriminator in the base
    table's ``values``; ``mapper`` itself outside a polymorphic hierarchy."""
    column = mapper.base_mapper.polymorphic_on
    if not isinstance(column, sa.Column) or column.name not in values:
        return mapper
    found = mapper.polymorphic_map.get(values[column.name])
    return mapper if found is None else found


def isa(mapper: Mapper[Any], other: Mapper[Any]) -> bool:
    """Whether objects of ``mapper`` belong where ``other`` is expected (a subclass does)."""
    return mapper is other or mapper.isa(other)


def is_model(obj: Any) -> bool:
    try:
        instance_state(obj)
    except Exception:  # noqa: BLE001 - SQLAlchemy raises several kinds for non-instances
        return False
    return True


def as_list(value: Any) -> list[Any]:
    """The objects in a relationship value or a root list: a collection, one object, or None.

    A loaded collection is read through its SQLAlchemy adapter, as the ORM itself reads it:
    that is the collection class's own iterator (a dict collection's values, a custom class's
    ``@collection.iterator``), whatever the class."""
    if value is None:
        return []
    if type(value) is InstrumentedList:  # SQLAlchemy's own list iterates as a list does
        return list(value)
    adapter = getattr(value, "_sa_adapter", None)
    if adapter is not None:
        return list(iter(adapter))  # not list(adapter): its len() walks the collection once more
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def collection(obj: Any, key: str, members: Iterable[Any]) -> Any:
    """A new collection of the class the relationship ``key`` of ``obj`` is mapped with,
    holding ``members`` as a load builds it: each goes through the class's appender (a dict
    collection keys it by its values then). Not set on ``obj``: ``set_committed_value`` given
    the list of members builds the same collection and sets it."""
    state = instance_state(obj)
    impl: Any = state.manager[key].impl
    adapter, data = state.manager.initialize_collection(key, state, impl.collection_factory)
    adapter.append_multiple_without_event(members)
    return data


def keyed(value: Any) -> bool:
    """Whether a collection holds its members by key (a mapping): one member a key, so a row
    loaded under a key another row took is not among its members, and the key's next holder
    can only be known from the database."""
    return not isinstance(value, list) and isinstance(value, Mapping)  # a list: most, and fast


def placed(obj: Any, key: str, value: Any, member: Any) -> bool:
    """Whether ``value``, the loaded collection ``key`` of ``obj``, holds ``member`` where its
    class would put it now. Only a keyed collection places a member by its values (a dict
    keyed by an attribute that an update of the member changed); a list or a set holds it
    wherever it is, its order being ``order_by``'s concern."""
    if not keyed(value):
        return True
    return all(value.get(k) is member for k in collection(obj, key, [member]))


def loaded_value(obj: Any, key: str) -> Any:
    """A relationship's value when it is loaded, else ``NOT_LOADED`` (never loads it)."""
    return instance_dict(obj).get(key, NOT_LOADED)


@cache
def _columns(mapper: Mapper[Any]) -> tuple[tuple[str, str, sa.Table], ...]:
    """``(attribute key, column name, table)`` of every column of the mapper's tables (a
    joined-table subclass maps its base's too; their shared primary key is in both)."""
    tables = set(mapper.tables)
    return tuple(
        (prop.key, col.name, col.table)
        for prop in mapper.column_attrs
        for col in prop.columns
        if isinstance(col, sa.Column) and col.table in tables
    )


@cache
def _attribute_keys(mapper: Mapper[Any]) -> dict[str, str]:
    """Column name -> attribute key, for the mapper's tables."""
    keys: dict[str, str] = {}
    for key, name, _ in _columns(mapper):
        keys.setdefault(name, key)
    return keys


@cache
def _class_attribute_keys(class_: type) -> dict[str, str]:
    """:func:`_attribute_keys` of a mapped class's mapper, found by the class alone (one
    lookup): a sync reads a few values of every object it compares."""
    return _attribute_keys(manager_of_class(class_).mapper)


def mapper_of(obj: Any) -> Mapper[Any]:
    """``instance_state(obj).mapper``, read off the object's class: in a large tree the
    object's own state is likely out of the CPU's caches, its class is not."""
    mapper: Mapper[Any] = manager_of_class(type(obj)).mapper
    return mapper


def values_of(obj: Any, columns: tuple[str, ...]) -> tuple[Any, ...]:
    """The values of a few columns of ``obj``, read straight from its loaded state."""
    keys = _class_attribute_keys(obj.__class__)
    data = instance_dict(obj)
    try:
        if len(columns) == 1:  # most keys: 5x cheaper than building a list
            return (data[keys[columns[0]]],)
        return tuple([data[keys[c]] for c in columns])
    except KeyError:
        values = column_values(obj)  # expired or primary key only: the slow, complete way
        return tuple(values.get(c) for c in columns)


class Generation:
    """Counters of structural changes to loaded trees: ``value`` counts them all, made by
    rowsync or by the application (relationship appends, removals, assignments, expiry);
    ``outside`` only the application's, which cannot tell whose tree they touched. A cached
    :class:`Index` built before an outside change is rebuilt: it may no longer describe its
    tree (rowsync's own changes invalidate just the indexes holding what they changed)."""

    value = 0
    outside = 0
    _ours = threading.local()

    @classmethod
    def bump(cls, *args: Any, **kwargs: Any) -> None:
        cls.value += 1

    @classmethod
    def bump_outside(cls, *args: Any, **kwargs: Any) -> None:
        cls.value += 1
        if not getattr(cls._ours, "active", False):
            cls.outside += 1

    @classmethod
    @contextlib.contextmanager
    def ours(cls) -> Iterator[None]:
        """What fires in here is rowsync's own doing on objects no tree holds yet (a new
        instance's attributes expired as it is made detached), not the application's."""
        before = getattr(cls._ours, "active", False)
        cls._ours.active = True
        try:
            yield
        finally:
            cls._ours.active = before


_watched: set[Any] = set()


def watch_mutations(mappers: Any) -> None:
    """Listen, once per mapper, for what changes the shape of a tree behind rowsync's back."""
    for mapper in mappers:
        if mapper in _watched:
            continue
        _watched.add(mapper)
        for event in ("expire", "refresh", "refresh_flush"):
            sa.event.listen(mapper, event, Generation.bump_outside)
        for rel in mapper.relationships:
            for event in ("append", "remove", "set", "bulk_replace"):
                sa.event.listen(rel.class_attribute, event, Generation.bump_outside)


def column_values(obj: Any) -> dict[str, Any]:
    """The loaded column values of ``obj`` by column name; the primary key even when expired."""
    state = instance_state(obj)
    values: dict[str, Any] = {}
    for key, name, _ in _columns(state.mapper):
        if key in state.dict:
            values.setdefault(name, state.dict[key])
    if state.key is not None:
        pk = identity_table(state.mapper).primary_key.columns
        for col, value in zip(pk, state.key[1], strict=False):
            values.setdefault(col.name, value)
    return values


def unloaded_tables(obj: Any) -> list[sa.Table]:
    """The tables of ``obj``'s columns that are not loaded on it (``load_only``, ``defer``)."""
    state = instance_state(obj)
    return list(dict.fromkeys(t for key, _, t in _columns(state.mapper) if key not in state.dict))


def primary_key(obj: Any) -> tuple[Any, ...]:
    state = instance_state(obj)
    if state.key is not None:
        return state.key[1]
    values = column_values(obj)
    return tuple(values.get(c.name) for c in identity_table(state.mapper).primary_key.columns)


def find(objects: list[Any], instances: list[Any]) -> int:
    """The position of the first of a row's ``instances`` among ``objects``, or -1.

    ``instances``: those a tree's index holds, which are every instance of the row the tree
    has (the index's invariant). Looked for by identity, which reads no object: in a large
    tree a collection's members are likely out of the CPU's caches."""
    for i, obj in enumerate(objects):
        for instance in instances:
            if obj is instance:
                return i
    return -1


def patch(obj: Any, values: Mapping[str, Any], table: sa.Table | None = None) -> None:
    """Set column attributes as if loaded: nothing is marked dirty, a flush writes nothing.
    ``values`` are a row of ``table`` (default: any of the object's tables, by column name).

    On an object with nothing pending, expired or deferred, the values are written straight
    into its dict: that is all ``set_committed_value`` does for a column then (its commit
    bookkeeping has nothing to clear). Unchanged columns are written too: telling them apart
    would read every old value, which in a large tree is likely out of the CPU's caches."""
    state = instance_state(obj)
    columns = _columns_of(state.mapper, table)
    if state.expired or state.committed_state or state.expired_attributes or state.callables:
        for key, name in columns:
            if name in values:
                attributes.set_committed_value(obj, key, values[name])
        return
    data = instance_dict(obj)
    for key, name in columns:
        if name in values:
            data[key] = values[name]


@cache
def _columns_of(mapper: Mapper[Any], table: sa.Table | None) -> tuple[tuple[str, str], ...]:
    """``(attribute key, column name)`` of the mapper's columns in ``table`` (None: in any of
    its tables)."""
    return tuple(
        (key, name) for key, name, owner in _columns(mapper) if table is None or owner is table
    )


def build(mapper: Mapper[Any], values: Mapping[str, Any]) -> Any:
    """A detached instance of ``mapper`` holding ``values``, as a query would have returned it."""
    obj = mapper.class_manager.new_instance()
    patch(obj, values)
    with Generation.ours():
        make_transient_to_detached(obj)
    return obj


def clone(
    obj: Any,
    memo: dict[int, Any] | None = None,
    own: Callable[[Any], Any] | None = None,
    assign: Callable[[Any, str, Any], object] = attributes.set_committed_value,
) -> Any:
    """A detached copy of ``obj`` and of everything loaded below it (shared rows stay shared).

    ``own(row)`` gives the tree's own instance of a row, if any: it is used instead of a copy
    (one instance per row, as one session gives) and only gets what it has not loaded yet,
    through ``assign`` (a tree's :meth:`Index.set`, which indexes what it gains).
    """
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    state = instance_state(obj)
    mine = own(obj) if own is not None else None
    copy = memo[id(obj)] = mine if mine is not None else build(state.mapper, column_values(obj))
    for rel in state.mapper.relationships:
        value = loaded_value(obj, rel.key)
        if value is NOT_LOADED or (
            mine is not None and loaded_value(mine, rel.key) is not NOT_LOADED
        ):
            continue
        if rel.uselist:
            assign(copy, rel.key, [clone(v, memo, own, assign) for v in as_list(value)])
        else:
            assign(copy, rel.key, None if value is None else clone(value, memo, own, assign))
    return copy


EAGER = frozenset({"selectin", "joined", "subquery", "immediate"})
_SPEC = "rowsync_spec"
_PLACES = "rowsync_places_spec"


def expected_spec(obj: Any) -> dict[str, Any]:
    """What a fresh query would load on ``obj`` where it is now: the union of its places'
    specs once rowsync moved it (:func:`remember_places_spec`), else :func:`own_spec`. New
    related objects are loaded so."""
    places = places_spec(obj)
    return places if places is not None else loaded_spec(obj)


def own_spec(obj: Any) -> dict[str, Any]:
    """What ``obj`` was loaded with at the place it was loaded for (a root: its query's
    options), whatever other places it took since; without options, what is loaded on it."""
    declared = declared_spec(obj)
    return declared if declared is not None else loaded_spec(obj)


def places_spec(obj: Any) -> dict[str, Any] | None:
    """The union of ``obj``'s places' specs, as rowsync last recorded it, else its loader
    options; None when it was loaded without either."""
    places: dict[str, Any] | None = instance_state(obj).info.get(_PLACES)
    return places if places is not None else declared_spec(obj)


def remember_root_spec(obj: Any, spec: LoadSpec) -> None:
    """``obj`` became a root loaded with ``spec``: its own spec from now on (what is below it
    keeps what it was loaded with)."""
    instance_state(obj).info[_SPEC] = spec


def remember_places_spec(obj: Any, spec: LoadSpec) -> None:
    """Record the union of the specs of the places ``obj`` is held at: what joins below it
    later is loaded so (its own loader options still say what it loads as a root)."""
    instance_state(obj).info[_PLACES] = spec


def declared_spec(obj: Any) -> dict[str, Any] | None:
    """What ``obj``'s loader options load below it; None when it was not loaded with options
    (lazy loading in a session, say), so only what is loaded now can tell."""
    state = instance_state(obj)
    declared = state.info.get(_SPEC)
    if declared is None and (state.load_options or _has_defaults(state.mapper)):
        declared = _from_options(state)
        if state.load_path is not None and len(state.load_path) == 1:
            declared = _with_statement_loads(obj, declared)
    return declared


def keep_declared_spec(obj: Any) -> None:
    """Read what a query's root was loaded with now, and keep it: part of it is read off what
    is loaded on the root (:func:`_with_statement_loads`), which rowsync's patches change."""
    state = instance_state(obj)
    if _SPEC not in state.info and state.load_path is not None and len(state.load_path) == 1:
        declared = declared_spec(obj)
        if declared is not None:
            state.info[_SPEC] = declared


def _with_statement_loads(root: Any, declared: dict[str, Any]) -> dict[str, Any]:
    """``declared``, the spec of the loader options a query's root kept, with what its
    statement loaded on ``root`` that none of them names. SQLAlchemy keeps on an object only
    the options that propagate to later loads, and ``contains_eager`` does not (its rows came
    from the statement's own join), so a relationship loaded on a root that no kept option
    explains is taken as the statement's, loaded the same way on every root: when it holds
    rows loaded at the root's own place (not rows that reached it as the object was loaded
    at another place of the same query), or none (an outer join that matched nothing). A
    relationship the mapping never fills (``lazy="noload"``) that holds such rows is the
    statement's too."""
    state = instance_state(root)
    here = _path_keys(state.load_path)
    found: dict[str, Any] = {}
    for rel in state.mapper.relationships:
        if rel.key not in state.dict:
            continue
        children = as_list(state.dict[rel.key])
        if rel.key in declared and not (declared[rel.key] is NEVER_FILLED and children):
            continue  # a kept option (or the mapping) explains it; noload explains no rows
        if children and not any(_loaded_at(child, [*here, rel.key]) for child in children):
            continue
        found[rel.key] = loaded_spec(root).get(rel.key, {})
    return {**declared, **found} if found else declared


def _loaded_at(obj: Any, keys: list[str]) -> bool:
    """Whether a query loaded ``obj`` at the place the relationship ``keys`` lead to."""
    path = instance_state(obj).load_path
    return path is not None and _path_keys(path) == keys


def remember_spec(obj: Any, spec: LoadSpec) -> None:
    """Record the spec a built object (and what is loaded below it) was loaded with, for the
    objects that will join below it later."""
    instance_state(obj).info[_SPEC] = spec
    for key, nested in spec.items():
        value = loaded_value(obj, key)
        if value is not NOT_LOADED:
            for child in as_list(value):
                state = instance_state(child)
                if _SPEC not in state.info and not state.load_path:  # not a query's own
                    remember_spec(child, nested)


def strategy(obj: Any, key: str) -> str:
    """How the relationship ``key`` of ``obj`` was (or would be) loaded: "selectin", "joined",
    "subquery", "select" (lazy), or one of :data:`NOLOAD`. It matters: SQLAlchemy's
    strategies differ in whether a row reached twice appears twice. An option that names no
    strategy (``defaultload``, on the way to one below) leaves the mapping's."""
    state = instance_state(obj)
    here = _path_keys(state.load_path) if state.load_path else []
    for option in state.load_options or ():
        for element in getattr(option, "context", ()):
            lazy = dict(element.strategy or ()).get("lazy")
            if lazy is not None and _path_keys(element.path) == [*here, key]:
                return str(lazy)
    return str(state.mapper.relationships[key].lazy)


def never_filled(obj: Any, key: str) -> bool:
    """Whether the relationship ``key`` of ``obj`` is one a fresh query sets empty without
    reading it (``noload``) where ``obj`` is: its places' spec says so, else its loader
    options, else the mapping. Such a value is loaded, and stays empty: no row joins it."""
    state = instance_state(obj)
    info = state.info
    spec: LoadSpec | None = info.get(_PLACES)
    if spec is None:
        spec = info.get(_SPEC)
    if spec is None:
        if key not in _noload_defaults(state.mapper) and not _says_noload(state.load_options):
            return False  # most objects: neither their mapping nor their options say noload
        spec = declared_spec(obj)
    if spec is not None:
        return spec.get(key) is NEVER_FILLED
    return strategy(obj, key) in NOLOAD


@cache
def _noload_defaults(mapper: Mapper[Any]) -> frozenset[str]:
    """The relationships of ``mapper`` whose ``lazy=`` default is ``noload``."""
    return frozenset(r.key for r in mapper.relationships if str(r.lazy) in NOLOAD)


def _says_noload(options: tuple[Any, ...] | None) -> bool:
    """Whether any of a query's loader ``options`` sets a relationship's strategy to noload."""
    if not options:
        return False
    try:
        return _options_say_noload(options)
    except TypeError:  # an option that cannot be hashed
        return _options_say_noload.__wrapped__(options)


@lru_cache(maxsize=1024)
def _options_say_noload(options: tuple[Any, ...]) -> bool:
    return any(
        dict(element.strategy or ()).get("lazy") == "noload"
        for option in options
        for element in getattr(option, "context", ())
    )


def _path_keys(path: PathRegistry) -> list[str]:
    """The relationship keys along a loader path: every other element is a property (or,
    for a wildcard option such as ``raiseload("*")``, a ``"relationship:*"`` token)."""
    return [
        "*" if isinstance(p, str) else cast("MapperProperty[Any]", p).key for p in path.path[1::2]
    ]


def _from_options(state: Any) -> dict[str, Any]:
    """The LoadSpec of a query-loaded object (the same for every object one query loaded at
    one place: computed once for them)."""
    options = state.load_options or ()
    try:
        return _options_spec_of(state.mapper, options, state.load_path)
    except TypeError:  # an option that cannot be hashed
        return options_spec(state.mapper, options, state.load_path)


@lru_cache(maxsize=1024)
def _options_spec_of(
    mapper: Mapper[Any], options: tuple[Any, ...], path: PathRegistry | None
) -> dict[str, Any]:
    return options_spec(mapper, options, path)


_UNLIMITED = 16
"""Levels of a ``recursion_depth=-1`` loader a LoadSpec spells out (it must be finite)."""


@dataclass(frozen=True)
class _Explicit:
    """A loader option's word on one relationship path."""

    lazy: str
    recursion_depth: int | None


def options_spec(
    mapper: Mapper[Any], options: Iterable[Any], path: PathRegistry | None = None
) -> dict[str, Any]:
    """What a query with loader ``options`` loads below an object of ``mapper`` that it
    loaded at ``path`` (``None``: the statement's own entity): a LoadSpec, known before any
    row is loaded.

    Where no option speaks, the mapping's eager defaults (``relationship(lazy="selectin")``)
    load, except where SQLAlchemy stops them: a default never loads a mapper already on the
    path (for ``joined``, the path within one SQL statement; for the loaders that run a
    query of their own, the whole path), or past its ``join_depth``."""
    explicit: dict[tuple[str, ...], _Explicit] = {}
    unheard: list[tuple[str, ...]] = []
    for option in options:
        for element in getattr(option, "context", ()):
            lazy = dict(element.strategy or ()).get("lazy")
            if lazy is not None:
                depth = (getattr(element, "local_opts", None) or {}).get("recursion_depth")
                named = tuple(_path_keys(element.path))
                explicit[named] = _Explicit(str(lazy), depth)
                if lazy == "immediate" and getattr(element.path[-1], "is_aliased_class", False):
                    # SQLAlchemy lazy-loads it as the plain class: the options chained below
                    # the alias (``of_type(with_polymorphic(...))``) never apply
                    unheard.append(named)
    for top in unheard:
        for below in [k for k in explicit if len(k) > len(top) and k[: len(top)] == top]:
            del explicit[below]
    mappers: list[Mapper[Any]] = [mapper]
    statement: list[Mapper[Any]] = [mapper]
    keys: tuple[str, ...] = ()
    if path is not None and path.path:
        elements = path.path
        # an entity of the path is a mapper, or an alias of one (``of_type``)
        mappers = [cast("Mapper[Any]", m).mapper for m in elements[0::2]]
        statement = [mappers[0]]
        for i, prop in enumerate(elements[1::2]):
            rel = cast("RelationshipProperty[Any]", prop)
            keys = (*keys, rel.key)
            said = _said(explicit, keys)
            lazy = said.lazy if said is not None else str(rel.lazy)
            statement = [*statement, mappers[i + 1]] if lazy == "joined" else [mappers[i + 1]]
    return _expand(mapper, explicit, keys, mappers, statement, {})


def _said(explicit: Mapping[tuple[str, ...], _Explicit], keys: tuple[str, ...]) -> _Explicit | None:
    return explicit.get(keys) or explicit.get((*keys[:-1], "*"))


def _expand(
    mapper: Mapper[Any],
    explicit: Mapping[tuple[str, ...], _Explicit],
    keys: tuple[str, ...],
    mappers: list[Mapper[Any]],
    statement: list[Mapper[Any]],
    recursing: Mapping[str, int],
) -> dict[str, Any]:
    """``options_spec`` below one object: ``mappers`` is the whole path to it, ``statement``
    the part loaded by the same SQL statement, ``recursing`` the ``recursion_depth`` loaders
    still going, by relationship key, with the levels they have left."""
    spec: dict[str, Any] = {}
    for rel in _relationships(mapper):
        here = (*keys, rel.key)
        said = _said(explicit, here)
        left = recursing.get(rel.key)
        depth: int | None
        if said is None and left is not None:
            lazy, depth = "selectin", left
        elif said is not None:
            lazy, depth = said.lazy, said.recursion_depth
        else:
            lazy, depth = str(rel.lazy), None
            on = statement if lazy == "joined" else mappers
            if lazy in EAGER and (
                len(on) > rel.join_depth if rel.join_depth else any(m.isa(rel.mapper) for m in on)
            ):
                continue
        if lazy in NOLOAD:
            spec[rel.key] = NEVER_FILLED
            continue
        if lazy not in EAGER:
            continue
        nested = dict(recursing)
        nested.pop(rel.key, None)
        if depth is not None:
            levels = _UNLIMITED if depth < 0 else depth
            if levels > 0:
                nested[rel.key] = levels - 1
        below_statement = [*statement, rel.mapper] if lazy == "joined" else [rel.mapper]
        below = _expand(rel.mapper, explicit, here, [*mappers, rel.mapper], below_statement, nested)
        spec[rel.key] = LookedUp(below) if lazy == "immediate" and _uses_get(rel) else below
    return spec


def _uses_get(rel: RelationshipProperty[Any]) -> bool:
    """Whether SQLAlchemy's lazy loader reads ``rel`` by the target's primary key, from the
    session when it holds the row (a many-to-one to the primary key, without criteria)."""
    return bool(rel._lazy_strategy.use_get)


@cache
def _relationships(mapper: Mapper[Any]) -> tuple[RelationshipProperty[Any], ...]:
    """``mapper``'s relationships and its subclasses' (each name once): a place holding a
    class holds rows of its subclasses, loaded with theirs (``of_type``, ``with_polymorphic``)."""
    found: dict[str, RelationshipProperty[Any]] = {}
    for m in mapper.self_and_descendants:
        for rel in m.relationships:
            found.setdefault(rel.key, rel)
    return tuple(found.values())


def _has_defaults(mapper: Mapper[Any]) -> bool:
    """Whether the mapping loads any relationship of ``mapper`` eagerly by default."""
    return any(r.lazy in EAGER for r in mapper.relationships)


def merge_specs(a: LoadSpec, b: LoadSpec) -> dict[str, Any]:
    """The union of two LoadSpecs. A relationship one never fills and the other loads is
    loaded: at an object held at both places, a query fills it at the one it reaches first.
    Likewise one looked up in the session (:class:`LookedUp`) at one place only is read by the
    other's query."""
    merged: dict[str, Any] = {
        k: v if v is NEVER_FILLED else LookedUp(v) if looked_up(v) else dict(v)
        for k, v in a.items()
    }
    for k, v in b.items():
        mine = merged.get(k)
        if v is NEVER_FILLED:
            merged.setdefault(k, NEVER_FILLED)
            continue
        below = merge_specs({} if mine is None or mine is NEVER_FILLED else mine, v)
        # looked up in the session only if every place looks it up: a query reads it anyway
        alone = mine is None or mine is NEVER_FILLED or looked_up(mine)
        merged[k] = LookedUp(below) if looked_up(v) and alone else below
    return merged


_ENTITY = "rowsync_entity"


def entity(obj: Any) -> Mapper[Any]:
    """The mapper a root was queried as: ``select(Employee)`` returns engineers too, and an
    engineer joins its root list, where a list of ``Engineer`` takes no manager."""
    state = instance_state(obj)
    found: Mapper[Any] | None = state.info.get(_ENTITY)
    if found is None and state.load_path is not None and len(state.load_path) == 1:
        # the statement's entity: a mapper, or an alias of one (``with_polymorphic``)
        found = cast(Any, state.load_path).entity.mapper
    return state.mapper if found is None else found


def remember_entity(obj: Any, mapper: Mapper[Any]) -> None:
    """Record the mapper a root built by rowsync stands for, as its query would have."""
    instance_state(obj).info[_ENTITY] = mapper


def loaded_spec(obj: Any, depth: int = 8) -> dict[str, Any]:
    """What is loaded on ``obj`` (and below, through its first related object), as a LoadSpec.
    An empty value ``noload`` set is :data:`NEVER_FILLED`."""
    spec: dict[str, Any] = {}
    if depth == 0:
        return spec
    for rel in instance_state(obj).mapper.relationships:
        value = loaded_value(obj, rel.key)
        if value is NOT_LOADED:
            continue
        children = as_list(value)
        if children:
            spec[rel.key] = loaded_spec(children[0], depth - 1)
        else:
            spec[rel.key] = NEVER_FILLED if strategy(obj, rel.key) in NOLOAD else {}
    return spec


def tree_spec(objects: Iterable[Any]) -> dict[str, Any]:
    """What is loaded anywhere below ``objects`` (objects of one mapper), or declared by their
    loader options to be loaded there, as one LoadSpec: the union over every object, so a
    relationship loaded on one parent only, or on an empty collection's future members, is
    in it. Each object is read once; a cycle of objects ends the path where it closes."""
    memo: dict[int, dict[str, Any] | None] = {}
    declared: dict[tuple[Any, ...], dict[str, Any] | None] = {}
    """Declared specs by (mapper, options, path): one query's objects at one place share it."""

    def of(obj: Any) -> dict[str, Any]:
        found = memo.get(id(obj), _NOT_DONE)
        if found is None:
            return {}  # on the path being read: the cycle closes here
        if found is not _NOT_DONE:
            return cast(dict[str, Any], found)
        memo[id(obj)] = None
        state = instance_state(obj)
        place = (state.mapper, id(state.load_options), state.load_path, id(state.info.get(_SPEC)))
        if place not in declared:
            declared[place] = declared_spec(obj)
        spec = dict(declared[place] or {})
        data = state.dict
        for key, _owner, _uselist in _shape(state.mapper)[1]:
            if key in data:
                below = spec.get(key, {})
                for child in as_list(data[key]):
                    below = merge_specs(below, of(child))
                spec[key] = below
        memo[id(obj)] = spec
        return spec

    result: dict[str, Any] = {}
    for obj in objects:
        result = merge_specs(result, of(obj))
    return result


_NOT_DONE: Final = object()


@cache
def _shape(mapper: Mapper[Any]) -> tuple[sa.Table, tuple[tuple[str, Mapper[Any], bool], ...]]:
    """A mapper's table and ``(key, declaring mapper, uselist)`` of its relationships, read
    once: indexing a tree visits every object."""
    relationships = tuple((r.key, r.parent, bool(r.uselist)) for r in mapper.relationships)
    return identity_table(mapper), relationships


Place = tuple[Any, str | None]
"""``(parent, relationship key)`` holding an object; ``(None, None)`` for a root."""


@dataclass
class Index:
    """Every object of a tree by row, and every loaded relationship by edge key.

    Built by one walk of the tree, then kept current by whoever reshapes the tree through it
    (:meth:`set`, :meth:`unset`, :meth:`join`, :meth:`leave`, :meth:`adopt`), so that adding,
    removing or moving a row costs what it touches, not the size of the tree. An object that
    lost a place stays indexed until :meth:`settle` finds it unreachable from every root
    (places may form cycles: a post under its person, the person under the post)."""

    objects: dict[tuple[sa.Table, tuple[Any, ...]], list[Any]] = field(
        default_factory=lambda: defaultdict(list)
    )
    loaded: dict[tuple[Mapper[Any], str], dict[int, Any]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    """``(parent mapper, relationship key) -> {id: parent}`` of the parents that have it loaded."""
    holders: dict[int, list[Place]] = field(default_factory=lambda: defaultdict(list))
    """``id(object) ->`` every place it is held at (once per occurrence)."""
    generation: int = -1
    """``Generation.outside`` when built; stale once it moved on."""
    roots: set[int] = field(default_factory=set)
    """``id`` of each root."""
    _seen: dict[int, Any] = field(default_factory=dict)
    """Every indexed object by ``id`` (held, so an ``id`` is never reused while indexed)."""
    _by_local: dict[
        tuple[Mapper[Any], str], tuple[tuple[str, ...], dict[tuple[Any, ...], list[Any]]]
    ] = field(default_factory=dict)
    _loose: dict[int, Any] = field(default_factory=dict)
    """Objects that lost a place, or joined without one yet: :meth:`settle` decides."""

    @classmethod
    def of(cls, roots: list[Any]) -> Index:
        index = cls(generation=Generation.outside, roots={id(r) for r in roots})
        index._walk([(root, None, None) for root in roots])
        return index

    def by_local(
        self, mapper: Mapper[Any], key: str, columns: tuple[str, ...]
    ) -> dict[tuple[Any, ...], list[Any]]:
        """Parents having ``key`` loaded, by the values of ``columns`` (built on first use and
        kept current; only for columns that never change on a row: its primary key)."""
        found = self._by_local.get((mapper, key))
        if found is None:
            by_values: dict[tuple[Any, ...], list[Any]] = defaultdict(list)
            for parent in self.loaded.get((mapper, key), {}).values():
                by_values[values_of(parent, columns)].append(parent)
            found = self._by_local[(mapper, key)] = (columns, by_values)
        return found[1]

    def held_by(self, obj: Any, mapper: Mapper[Any], key: str) -> list[Any]:
        """The parents holding ``obj`` under their relationship ``key``."""
        found = []
        for p, k in self.holders.get(id(obj), ()):
            if k == key and p is not None:
                held = mapper_of(p)
                if held is mapper or held.isa(mapper):
                    found.append(p)
        return found

    def instances(self, table: sa.Table, key: tuple[Any, ...]) -> list[Any]:
        return self.objects.get((table, key), [])

    def holds(self, obj: Any) -> bool:
        """Whether ``obj`` is in the tree (as of the last :meth:`settle`)."""
        return id(obj) in self._seen

    def places(self, obj: Any) -> list[Place]:
        """Where ``obj`` is held."""
        return self.holders.get(id(obj), [])

    def holds_any(self, ids: set[int]) -> bool:
        """Whether any of the objects whose ``id`` is in ``ids`` is indexed here."""
        return not ids.isdisjoint(self._seen.keys())

    # -- reshaping the tree through the index -----------------------------------------

    def set(self, obj: Any, key: str, value: Any) -> tuple[list[Any], list[Any]]:
        """Set the relationship ``key`` of ``obj`` as if loaded (nothing marked dirty),
        indexing what it gained and lost when ``obj`` is in the tree. Returns the objects it
        no longer holds there, and those it holds there now and did not before."""
        before = loaded_value(obj, key)
        attributes.set_committed_value(obj, key, value)
        indexed = id(obj) in self._seen
        if indexed and before is NOT_LOADED and not _empty_for_good(obj, key, value):
            self._loaded(obj, key)
        return self._replace(obj, key, before, loaded_value(obj, key), indexed)

    def unset(self, obj: Any, key: str) -> None:
        """Unload the relationship ``key`` of ``obj`` (as a fresh query that does not load it
        leaves it)."""
        before = instance_dict(obj).pop(key, NOT_LOADED)
        if id(obj) not in self._seen or before is NOT_LOADED:
            return
        self._unloaded(obj, key)
        self._replace(obj, key, before, None)

    def join(self, obj: Any) -> None:
        """``obj`` became a root."""
        self.roots.add(id(obj))
        self._walk([(obj, None, None)])

    def leave(self, obj: Any) -> None:
        """``obj`` is a root no more."""
        self.roots.discard(id(obj))
        self._unplace(obj, None, None)

    def adopt(self, obj: Any) -> None:
        """Index ``obj``, new to the tree and not placed yet, with everything loaded below it
        (so that the rows it holds are found while it is being placed)."""
        if id(obj) in self._seen:
            return
        self._walk([(obj, _UNPLACED, None)])
        self._loose[id(obj)] = obj

    def settle(self) -> None:
        """Forget the objects no root reaches any more, and what they held."""
        while self._loose:
            _, obj = self._loose.popitem()
            if id(obj) in self._seen and not self._reachable(obj):
                self._drop(obj)

    # -- internals --------------------------------------------------------------------

    def _replace(
        self, obj: Any, key: str, before: Any, after: Any, indexed: bool = True
    ) -> tuple[list[Any], list[Any]]:
        old_items = as_list(None if before is NOT_LOADED else before)
        new_items = as_list(after)
        old = {id(o): o for o in old_items}
        new = {id(o): o for o in new_items}
        lost = [o for i, o in old.items() if i not in new]
        gained = [o for i, o in new.items() if i not in old]
        if not indexed:
            return lost, gained
        if len(old) == len(old_items) and len(new) == len(new_items):
            # each object held once before and once after (any collection but one repeating
            # a link): the places lost and gained are the objects lost and gained
            for o in lost:
                self._unplace(o, obj, key)
            if gained:
                self._walk([(o, obj, key) for o in gained])
            return lost, gained
        surplus = Counter(map(id, old_items))  # one place per occurrence
        surplus.subtract(map(id, new_items))
        objects = old | new
        for ident, count in surplus.items():
            for _ in range(count):
                self._unplace(objects[ident], obj, key)
            if count < 0:
                self._walk([(objects[ident], obj, key)] * -count)
        return lost, gained

    def _unplace(self, obj: Any, parent: Any, key: str | None) -> None:
        places = self.holders.get(id(obj))
        if places is None:
            return
        for i, (p, k) in enumerate(places):
            if p is parent and k == key:
                del places[i]
                break
        self._loose[id(obj)] = obj

    def _loaded(self, obj: Any, key: str) -> None:
        owner = instance_state(obj).mapper.relationships[key].parent
        self.loaded[(owner, key)][id(obj)] = obj
        if (by_local := self._by_local.get((owner, key))) is not None:
            columns, by_values = by_local
            by_values[values_of(obj, columns)].append(obj)

    def _unloaded(self, obj: Any, key: str) -> None:
        owner = instance_state(obj).mapper.relationships[key].parent
        self.loaded.get((owner, key), {}).pop(id(obj), None)
        if (by_local := self._by_local.get((owner, key))) is not None:
            columns, by_values = by_local
            parents = by_values.get(values_of(obj, columns), [])
            parents[:] = [p for p in parents if p is not obj]

    def _reachable(self, obj: Any) -> bool:
        """Whether a root holds ``obj``, or holds a parent of it, and so on up."""
        stack, visited = [obj], {id(obj)}
        while stack:
            for parent, _ in self.holders.get(id(stack.pop()), ()):
                if parent is None:
                    return True
                if id(parent) not in visited and id(parent) in self._seen:
                    visited.add(id(parent))
                    stack.append(parent)
        return False

    def _drop(self, obj: Any) -> None:
        """Forget ``obj``; what it holds loses that place."""
        ident = id(obj)
        del self._seen[ident]
        self.holders.pop(ident, None)
        state = instance_state(obj)
        table, relationships = _shape(state.mapper)
        found = self.objects.get((table, _key(state, obj)), [])
        found[:] = [o for o in found if o is not obj]
        data = instance_dict(obj)
        for rel_key, _owner, _uselist in relationships:
            if rel_key in data:
                self._unloaded(obj, rel_key)
                for child in as_list(data[rel_key]):
                    self._unplace(child, obj, rel_key)

    def _walk(self, stack: list[tuple[Any, Any, str | None]]) -> None:
        """Index each ``(object, parent, key)`` place and, once, everything loaded below it."""
        seen, holders, objects, loaded = self._seen, self.holders, self.objects, self.loaded
        by_local = self._by_local
        while stack:
            obj, parent, key = stack.pop()
            ident = id(obj)
            if parent is not _UNPLACED:
                holders[ident].append((parent, key))
            if ident in seen:
                continue
            seen[ident] = obj
            state = instance_state(obj)
            table, relationships = _shape(state.mapper)
            objects[(table, _key(state, obj))].append(obj)
            data = instance_dict(obj)
            for rel_key, owner, uselist in relationships:
                if rel_key not in data:
                    # not loaded (or expired): what a lazy load would fetch is not in the tree
                    continue
                value = data[rel_key]
                if (value is None or (uselist and not value)) and never_filled(obj, rel_key):
                    continue  # ``noload`` set it empty: no row joins it, nothing to keep current
                loaded[(owner, rel_key)][ident] = obj
                if by_local and (found := by_local.get((owner, rel_key))) is not None:
                    found[1][values_of(obj, found[0])].append(obj)
                if value is None:
                    continue
                if uselist:
                    stack.extend([(child, obj, rel_key) for child in as_list(value)])
                else:
                    stack.append((value, obj, rel_key))


def _empty_for_good(obj: Any, key: str, value: Any) -> bool:
    """Whether ``value``, just set as the relationship ``key`` of ``obj``, is the empty value
    of one :func:`never_filled`."""
    return not as_list(value) and never_filled(obj, key)


_UNPLACED: Final = object()
"""The parent of an object :meth:`Index.adopt` indexed before placing it."""


def _key(state: Any, obj: Any) -> tuple[Any, ...]:
    return state.key[1] if state.key is not None else primary_key(obj)
