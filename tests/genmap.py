"""Generated SQLAlchemy mappings for the mapping oracle (tests/test_oracle_mappings.py).

A mapping is drawn as plain data (:class:`Mapping`), then :func:`build` turns it into fresh
declarative classes on a registry of their own. Every mapping grows from one root entity
``A``; each feature in :data:`FEATURES` adds the tables and relationships that exercise it.
Writes (:class:`Insert`, :class:`Update`, :class:`Delete`) are plain data too, drawn from
each column's domain, so a shrunk failure prints as a readable reproduction.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from hypothesis import strategies as st
from sqlalchemy.ext.associationproxy import association_proxy
from sqlalchemy.orm import (
    MANYTOONE,
    DeclarativeBase,
    Mapped,
    MappedAsDataclass,
    Session,
    attribute_keyed_dict,
    contains_eager,
    defaultload,
    immediateload,
    joinedload,
    keyfunc_mapping,
    lazyload,
    load_only,
    mapped_column,
    noload,
    raiseload,
    relationship,
    selectinload,
    subqueryload,
)

FEATURES: dict[str, str] = {
    "one_to_many": "A.bs: B rows pointing at their A",
    "many_to_one": "A.c: the C an A points at; B.a: a B's A",
    "one_to_one": "A.o: the one O pointing at its A (unique foreign key)",
    "nested": "B.ds: D rows below each B (chains of loader options)",
    "many_to_many": "A.ts: T rows through a link table with a primary key",
    "many_to_many_no_pk": "A.ts0: T rows through a link table without a primary key",
    "association_object": "A.ats: AT rows (a link with a column of its own), AT.t, A.at_ts proxy",
    "tree": "A.parent / A.children: a self-referential tree (parent key)",
    "graph": "A.peers: a self-referential many-to-many",
    "composite_key": "A's primary key is (id, k); every key pointing at A has two columns",
    "criteria": "relationships to B, D and A.children with an extra `flag == true` criterion",
    "order_by": "collections ordered by rank/name, asc/desc, NULLS FIRST/LAST, maybe no tie-break",
    "lazy_defaults": "relationship(lazy=...) drawn: select, joined, selectin, subquery, ...",
    "collection_classes": "set, attribute_keyed_dict, keyfunc_mapping, a list subclass",
    "dataclasses": "MappedAsDataclass classes (field-wise __eq__, unhashable)",
    "custom_eq": "classes with their own __eq__ (all instances equal) and no __hash__",
    "joined_inheritance": "B has a subclass BX in a table of its own (with_polymorphic, of_type)",
    "single_inheritance": "B has a subclass BX in B's table, told apart by `kind`",
    # What the statement asks for (see Query):
    "column_options": "load_only on the roots (foreign keys left out), defer on loaded "
    "relationships' targets",
    "contains_eager": "A.c loaded by contains_eager over an explicit outer join",
    "recursion_depth": "selectinload(self-referential, recursion_depth=1..3)",
    "filtered_roots": "a root list with a WHERE, kept by its statement (rs.load, rs.live)",
    "noload_option": "noload() among the loader options drawn",
    "root_below": "options that load the root's model again below the roots (A.children, B.a)",
}
"""The grammar's switches: each example draws a subset of the mapping features and of the
statement features (the last four)."""

QUERY_FEATURES = frozenset(
    {"column_options", "contains_eager", "recursion_depth", "filtered_roots"}
)

LAZY = ("select", "joined", "selectin", "subquery", "immediate", "raise", "noload")
EAGER = frozenset({"joined", "selectin", "subquery", "immediate"})
STRATEGIES = ("default", "selectin", "joined", "subquery", "immediate", "lazy", "raise", "noload")
COLLECTIONS = ("list", "set", "keyed", "keyfunc", "custom")

IDS = (1, 2, 3, 4)
KS = ("x", "y")
NAMES = ("a", "b", None)
FLAGS = (True, False, None)
RANKS = (1, 2, None)
HOSTILE = ('"', " ", "Mixed Case", "select", "a.b", "x; drop", "Ünï", "%s")


# -- the description -----------------------------------------------------------------


@dataclass(frozen=True)
class Order:
    """One ``order_by`` term of a relationship: a column of the target, its direction, nulls."""

    column: Literal["rank", "name"]
    desc: bool = False
    nulls: Literal["first", "last"] | None = None


@dataclass(frozen=True)
class Rel:
    """Options of one collection or reference drawn for this example."""

    lazy: str = "select"
    order: tuple[Order, ...] = ()
    tiebreak: bool = True
    collection: str = "list"
    criteria: bool = False


@dataclass(frozen=True)
class Mapping:
    """A generated mapping: the features it has and the options of each relationship."""

    features: frozenset[str]
    rels: tuple[tuple[str, Rel], ...] = ()
    names: tuple[tuple[str, str], ...] = ()
    """Entity name -> table name (hostile ones included)."""
    cascade: bool = True
    """Foreign keys to A and B: ON DELETE CASCADE, or SET NULL."""

    def rel(self, key: str) -> Rel:
        return dict(self.rels).get(key, Rel())

    def table(self, entity: str) -> str:
        return dict(self.names).get(entity, entity.lower())

    def has(self, feature: str) -> bool:
        return feature in self.features


# Relationship key -> (feature that adds it, whether it is a collection, on a cycle).
# A relationship on a cycle (back to A, or A to A) never gets an eager lazy= default: eager
# defaults would load without end; explicit options (recursion_depth) load those.
RELATIONSHIPS: dict[str, tuple[str, bool, bool]] = {
    "A.bs": ("one_to_many", True, False),
    "A.c": ("many_to_one", False, False),
    "B.a": ("many_to_one", False, True),
    "A.o": ("one_to_one", False, False),
    "B.ds": ("nested", True, False),
    "A.ts": ("many_to_many", True, False),
    "A.ts0": ("many_to_many_no_pk", True, False),
    "A.ats": ("association_object", True, False),
    "AT.t": ("association_object", False, False),
    "A.children": ("tree", True, True),
    "A.parent": ("tree", False, True),
    "A.peers": ("graph", True, True),
}


def present(features: frozenset[str], key: str) -> bool:
    feature = RELATIONSHIPS[key][0]
    if key == "B.a" or key == "B.ds":
        return feature in features and "one_to_many" in features
    return feature in features


@st.composite
def mappings(
    draw: st.DrawFn, allowed: Sequence[str] = tuple(FEATURES), required: Sequence[str] = ()
) -> Mapping:
    """A mapping using a subset of ``allowed`` features, always with ``required`` ones."""
    structural = [f for f in allowed if f in _STRUCTURAL]
    features = set(draw(st.sets(st.sampled_from(structural), min_size=1, max_size=3)))
    features |= {f for f in required if f in _STRUCTURAL}
    if "nested" in features or "joined_inheritance" in features or "single_inheritance" in features:
        features.add("one_to_many")
    if "joined_inheritance" in features and "single_inheritance" in features:
        features.discard(draw(st.sampled_from(["joined_inheritance", "single_inheritance"])))
    modifiers = [f for f in allowed if f not in _STRUCTURAL and f not in QUERY_FEATURES]
    features |= draw(st.sets(st.sampled_from(modifiers), max_size=3)) if modifiers else set()
    if "dataclasses" in features and "custom_eq" in features:
        features.discard(draw(st.sampled_from(["dataclasses", "custom_eq"])))
    features |= {f for f in required if f in FEATURES and f not in QUERY_FEATURES}
    frozen = frozenset(features & {*allowed, *required})
    rels = []
    for key, (_, many, cyclic) in RELATIONSHIPS.items():
        if not present(frozen, key):
            continue
        lazy = "select"
        if "lazy_defaults" in frozen:
            choices = [x for x in LAZY if not (cyclic and x in EAGER)]
            lazy = draw(st.sampled_from(choices))
        order: tuple[Order, ...] = ()
        tiebreak = True
        collection = "list"
        criteria = False
        if many and key not in ("A.ats",):
            if "order_by" in frozen:
                order = tuple(
                    draw(
                        st.lists(
                            st.builds(
                                Order,
                                st.sampled_from(["rank", "name"]),
                                st.booleans(),
                                st.sampled_from([None, "first", "last"]),
                            ),
                            min_size=1,
                            max_size=2,
                            unique_by=lambda o: o.column,
                        )
                    )
                )
                tiebreak = draw(st.booleans())
            if "collection_classes" in frozen:
                # SQLAlchemy's own set collections hash their members: no unhashable classes
                kinds = [c for c in COLLECTIONS if c != "set" or "custom_eq" not in frozen]
                collection = draw(st.sampled_from(kinds))
            if "criteria" in frozen and key in ("A.bs", "B.ds", "A.children"):
                criteria = draw(st.booleans())
        rels.append((key, Rel(lazy, order, tiebreak, collection, criteria)))
    names = tuple(
        (entity, draw(st.sampled_from(HOSTILE)) + entity.lower())
        for entity in _entities(frozen)
        if draw(st.booleans())
    )
    return Mapping(frozen, tuple(rels), names, draw(st.booleans()))


_STRUCTURAL = (
    "one_to_many",
    "many_to_one",
    "one_to_one",
    "nested",
    "many_to_many",
    "many_to_many_no_pk",
    "association_object",
    "tree",
    "graph",
    "joined_inheritance",
    "single_inheritance",
)


def _entities(features: frozenset[str]) -> list[str]:
    out = ["A"]
    wanted = {
        "B": {"one_to_many"},
        "C": {"many_to_one"},
        "O": {"one_to_one"},
        "D": {"nested"},
        "T": {"many_to_many", "many_to_many_no_pk", "association_object"},
        "L": {"many_to_many"},
        "L0": {"many_to_many_no_pk"},
        "AT": {"association_object"},
        "G": {"graph"},
        "BX": {"joined_inheritance"},
    }
    out += [entity for entity, needs in wanted.items() if needs & features]
    return out


# -- building classes ----------------------------------------------------------------


class CustomList(list[Any]):
    """A user's own collection class."""


_counter = itertools.count()


@dataclass
class Built:
    """A mapping made real: its classes by entity name, tables, and registry."""

    mapping: Mapping
    classes: dict[str, type[Any]]
    tables: dict[str, sa.Table]
    metadata: sa.MetaData
    registry: Any
    domains: dict[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict)
    """``(entity, column name)`` -> the values writes draw for that column."""
    owners: dict[int, str] = field(default_factory=dict)
    """``id(key column)`` -> its entity, while building."""
    registry_id: int = 0

    @property
    def root(self) -> type[Any]:
        return self.classes["A"]

    def dispose(self) -> None:
        self.registry.dispose()


@dataclass
class _Body:
    """A class body being assembled: dataclass-ready annotations, attributes, table args."""

    entity: str
    built: Built
    attrs: dict[str, Any] = field(default_factory=dict)
    annotations: dict[str, Any] = field(default_factory=dict)
    args: list[Any] = field(default_factory=list)

    def column(
        self,
        name: str,
        type_: Any,
        values: tuple[Any, ...],
        *args: Any,
        key: str | None = None,
        **kw: Any,
    ) -> sa.Column[Any]:
        self.built.domains[(self.entity, name)] = values
        kw.setdefault("nullable", not kw.get("primary_key", False))
        mc = mapped_column(name, type_, *args, default=None, **kw)
        self.attrs[key or name] = mc
        self.annotations[key or name] = Mapped[Any]
        column: sa.Column[Any] = mc.column
        return column

    def pointer(
        self,
        prefix: str,
        target: Sequence[sa.Column[Any]],
        ondelete: str,
        *,
        required: bool = False,
    ) -> list[sa.Column[Any]]:
        """Columns ``<prefix>_<key>`` pointing at ``target`` (a key), with their constraint."""
        cols = [
            self.column(
                f"{prefix}_{t.name}",
                t.type,
                self.built.domains[(_owner(self.built, t), t.name)] + (() if required else (None,)),
                nullable=not required,
            )
            for t in target
        ]
        self.args.append(
            sa.ForeignKeyConstraint(cols, list(target), ondelete=ondelete, onupdate="CASCADE")
        )
        return cols

    def plain(self) -> None:
        self.column("name", sa.String, NAMES)
        self.column("flag", sa.Boolean, FLAGS)
        self.column("rank", sa.Integer, RANKS)

    def relationship(self, key: str, target: str, **kw: Any) -> None:
        mapping = self.built.mapping
        options = mapping.rel(f"{self.entity}.{key}")
        many = RELATIONSHIPS[f"{self.entity}.{key}"][1]
        if many:
            collection, annotation, factory = _collection(options.collection)
            kw["collection_class"] = collection
            self.annotations[key] = annotation
            if mapping.has("dataclasses"):
                kw["default_factory"] = factory
            if options.order:
                kw["order_by"] = lambda: _order_by(self.built.tables[target], options)
        else:
            self.annotations[key] = Mapped[Any]
            if mapping.has("dataclasses"):
                kw["default"] = None
        self.attrs[key] = relationship(
            f"{target}_{self.built.registry_id}", lazy=options.lazy, viewonly=True, **kw
        )

    def make(self, base: Any, *, table: bool = True) -> type[Any]:
        body = dict(self.attrs)
        if table:
            body["__tablename__"] = self.built.mapping.table(self.entity)
            body["__table_args__"] = tuple(self.args)
        body["__annotations__"] = self.annotations
        if self.built.mapping.has("custom_eq"):
            body["__eq__"] = lambda me, other: True
            body["__hash__"] = None
        cls: type[Any] = type(f"{self.entity}_{self.built.registry_id}", (base,), body)
        self.built.classes[self.entity] = cls
        if table:
            self.built.tables[self.entity] = cls.__table__
        return cls


def _owner(built: Built, column: sa.Column[Any]) -> str:
    return built.owners[id(column)]


def build(mapping: Mapping) -> Built:
    """Fresh declarative classes for ``mapping``, on a registry of their own."""
    n = next(_counter)
    parents: tuple[type[Any], ...] = (DeclarativeBase,)
    if mapping.has("dataclasses"):
        parents = (MappedAsDataclass, DeclarativeBase)
    base: Any = type(f"Base_{n}", parents, {})
    built = Built(mapping, {}, {}, base.metadata, base.registry, registry_id=n)
    f = mapping.has
    cascade = "CASCADE" if mapping.cascade else "SET NULL"
    bodies = {e: _Body(e, built) for e in ("A", "B", "BX", "C", "D", "O", "T", "AT")}

    def key(entity: str, *cols: sa.Column[Any]) -> list[sa.Column[Any]]:
        for c in cols:
            built.owners[id(c)] = entity
        return list(cols)

    A, B = bodies["A"], bodies["B"]
    a_key = key("A", A.column("id", sa.Integer, IDS, primary_key=True, autoincrement=False))
    if f("composite_key"):
        a_key += key("A", A.column("k", sa.String, KS, primary_key=True))
    A.plain()
    if f("many_to_one"):
        c_id = key(
            "C", bodies["C"].column("id", sa.Integer, IDS, primary_key=True, autoincrement=False)
        )
        bodies["C"].column("name", sa.String, NAMES)
        A.pointer("c", c_id, "SET NULL")
        A.relationship("c", "C")
    if f("tree"):
        parent = A.pointer("parent", a_key, "SET NULL")
        A.relationship(
            "children",
            "A",
            primaryjoin=_join(parent, a_key, A, "children"),
            remote_side=[*parent, A.attrs["flag"].column],
            foreign_keys=parent,
        )
        A.relationship(
            "parent", "A", primaryjoin=_join(parent, a_key), remote_side=a_key, foreign_keys=parent
        )
    if f("one_to_many"):
        b_id = key("B", B.column("id", sa.Integer, IDS, primary_key=True, autoincrement=False))
        to_a = B.pointer("a", a_key, cascade)
        B.plain()
        A.relationship("bs", "B", primaryjoin=_join(to_a, a_key, A, "bs"), foreign_keys=to_a)
        if f("many_to_one"):
            B.relationship("a", "A", primaryjoin=_join(to_a, a_key), foreign_keys=to_a)
        if f("joined_inheritance") or f("single_inheritance"):
            kind = B.column("kind", sa.String, ("b", "bx"), nullable=False)
            B.attrs["__mapper_args__"] = {"polymorphic_on": kind, "polymorphic_identity": "b"}
        if f("nested"):
            D = bodies["D"]
            key("D", D.column("id", sa.Integer, IDS, primary_key=True, autoincrement=False))
            to_b = D.pointer("b", b_id, cascade)
            D.plain()
            B.relationship("ds", "D", primaryjoin=_join(to_b, b_id, B, "ds"), foreign_keys=to_b)
    if f("one_to_one"):
        one = bodies["O"]
        key("O", one.column("id", sa.Integer, IDS, primary_key=True, autoincrement=False))
        to_a = one.pointer("a", a_key, cascade)
        one.args.append(sa.UniqueConstraint(*to_a))
        one.column("name", sa.String, NAMES)
        A.relationship("o", "O", uselist=False, primaryjoin=_join(to_a, a_key), foreign_keys=to_a)
    if f("many_to_many") or f("many_to_many_no_pk") or f("association_object"):
        t_id = key(
            "T", bodies["T"].column("id", sa.Integer, IDS, primary_key=True, autoincrement=False)
        )
        bodies["T"].plain()
    if f("association_object"):
        AT = bodies["AT"]
        at_a = AT.pointer("a", a_key, "CASCADE", required=True)
        at_t = AT.pointer("t", t_id, "CASCADE", required=True)
        for c in (*at_a, *at_t):
            c.primary_key = True
        AT.column("note", sa.String, NAMES)
        A.relationship("ats", "AT", primaryjoin=_join(at_a, a_key), foreign_keys=at_a)
        AT.relationship("t", "T", primaryjoin=_join(at_t, t_id), foreign_keys=at_t)
        A.attrs["at_ts"] = association_proxy("ats", "t")
    for entity, feature, with_key in (
        ("L", "many_to_many", True),
        ("L0", "many_to_many_no_pk", False),
    ):
        if f(feature):
            link = _Body(entity, built)
            to_a = link.pointer("a", a_key, "CASCADE", required=True)
            to_t = link.pointer("t", t_id, "CASCADE", required=True)
            table = sa.Table(
                mapping.table(entity),
                built.metadata,
                *to_a,
                *to_t,
                *link.args,
                *([sa.PrimaryKeyConstraint(*to_a, *to_t)] if with_key else []),
            )
            built.tables[entity] = table
            A.relationship(
                "ts" if with_key else "ts0",
                "T",
                secondary=table,
                primaryjoin=_join(to_a, a_key),
                secondaryjoin=_join(to_t, t_id),
            )
    if f("graph"):
        link = _Body("G", built)
        to_a = link.pointer("a", a_key, "CASCADE", required=True)
        to_b = link.pointer("b", a_key, "CASCADE", required=True)
        table = sa.Table(
            mapping.table("G"),
            built.metadata,
            *to_a,
            *to_b,
            *link.args,
            sa.PrimaryKeyConstraint(*to_a, *to_b),
        )
        built.tables["G"] = table
        A.relationship(
            "peers",
            "A",
            secondary=table,
            primaryjoin=_join(to_a, a_key),
            secondaryjoin=_join(to_b, a_key),
        )
    for entity in ("C", "A", "B", "D", "O", "T", "AT"):
        if bodies[entity].attrs:
            bodies[entity].make(base)
    if f("joined_inheritance") or f("single_inheritance"):
        BX = bodies["BX"]
        if f("joined_inheritance"):
            fk = sa.ForeignKey(b_id[0], ondelete="CASCADE", onupdate="CASCADE")
            # Its own attribute key: a dataclass cannot declare the inherited field twice.
            BX.column("id", sa.Integer, IDS, fk, key="bx_id", primary_key=True, autoincrement=False)
        BX.column("extra", sa.String, ("e", None))
        BX.attrs["__mapper_args__"] = {"polymorphic_identity": "bx"}
        BX.make(built.classes["B"], table=f("joined_inheritance"))
        if f("single_inheritance"):
            built.domains[("B", "extra")] = built.domains.pop(("BX", "extra"))
    sa.orm.configure_mappers()
    return built


def _join(
    near: Sequence[sa.Column[Any]],
    far: Sequence[sa.Column[Any]],
    body: _Body | None = None,
    key: str = "",
) -> Callable[[], Any]:
    """``near == far`` column by column, plus ``flag = true`` (on ``near``'s table) when the
    relationship ``body.key`` draws criteria."""

    def join() -> Any:
        terms = [n == f for n, f in zip(near, far, strict=True)]
        if body is not None and body.built.mapping.rel(f"{body.entity}.{key}").criteria:
            terms.append(near[0].table.c.flag == sa.true())
        return sa.and_(*terms)

    return join


def _order_by(table: sa.Table, options: Rel) -> list[Any]:
    terms: list[Any] = []
    for order in options.order:
        term: Any = table.c[order.column].desc() if order.desc else table.c[order.column].asc()
        if order.nulls == "first":
            term = term.nulls_first()
        elif order.nulls == "last":
            term = term.nulls_last()
        terms.append(term)
    if options.tiebreak:
        terms += list(table.primary_key.columns)
    return terms


def _collection(kind: str) -> tuple[Any, Any, Callable[[], Any]]:
    """``(collection_class, dataclass annotation, dataclass default factory)``."""
    if kind == "set":
        return set, Mapped[set[Any]], set
    if kind == "keyed":
        return attribute_keyed_dict("id"), Mapped[dict[Any, Any]], dict
    if kind == "keyfunc":
        return keyfunc_mapping(_keyfunc), Mapped[dict[Any, Any]], dict
    if kind == "custom":
        return CustomList, Mapped[CustomList], CustomList
    return list, Mapped[list[Any]], list


def _keyfunc(obj: Any) -> Any:
    return ("key", obj.id)


# -- writes --------------------------------------------------------------------------

Values = tuple[tuple[str, Any], ...]
"""Column name -> value, as a tuple so writes are hashable and print readably."""


@dataclass(frozen=True)
class Insert:
    entity: str
    values: Values


@dataclass(frozen=True)
class Update:
    entity: str
    key: Values
    values: Values


@dataclass(frozen=True)
class Delete:
    entity: str
    key: Values


Write = Insert | Update | Delete
Commit = tuple[Write, ...]


@dataclass(frozen=True)
class Group:
    """Commits that reach the listener one by one, or (``one_batch``) as one batch."""

    commits: tuple[Commit, ...]
    one_batch: bool


_LINKS = ("L", "L0", "G", "AT")


def _table_entity(built: Built, entity: str) -> str:
    """The entity whose table holds ``entity``'s own columns (BX's base columns are B's)."""
    if entity == "BX" and not built.mapping.has("joined_inheritance"):
        return "B"
    return entity


def _columns(built: Built, entity: str) -> list[str]:
    return [name for (e, name) in built.domains if e == entity]


def _key(built: Built, entity: str) -> list[str]:
    table = built.tables[entity]
    if not table.primary_key.columns:
        return [c.name for c in table.c]
    return [c.name for c in table.primary_key.columns]


def _pointers(built: Built, entity: str) -> list[list[str]]:
    # sorted: a table's constraints are a set, and draws must not depend on its order
    return sorted(
        [c.name for c in fk.columns] for fk in built.tables[entity].foreign_key_constraints
    )


def _values(built: Built, entity: str, names: Sequence[str]) -> st.SearchStrategy[Values]:
    return st.tuples(*[st.sampled_from(built.domains[(entity, n)]) for n in names]).map(
        lambda vs: tuple(zip(names, vs, strict=True))
    )


def _pointer_values(built: Built, entity: str, names: list[str]) -> st.SearchStrategy[Values]:
    """A foreign key's columns all NULL, or all set."""
    set_ = st.tuples(
        *[st.sampled_from([v for v in built.domains[(entity, n)] if v is not None]) for n in names]
    ).map(lambda vs: tuple(zip(names, vs, strict=True)))
    if all(None in built.domains[(entity, n)] for n in names):
        return set_ | st.just(tuple((n, None) for n in names))
    return set_


@st.composite
def _insert(draw: st.DrawFn, built: Built, entity: str) -> Insert:
    own = _table_entity(built, entity)
    names = [n for n in _columns(built, own) if n != "kind"]
    fixed: Values = ()
    if entity in ("B", "BX") and "BX" in built.classes:
        fixed = (("kind", "b" if entity == "B" else "bx"),)
        if entity == "BX" and own == "BX":
            names = [n for n in _columns(built, "B") if n != "kind"] + ["extra"]
    pointers = [p for p in _pointers(built, own) if own != "BX"]
    values = list(fixed)
    for n in names:
        if not any(n in p for p in pointers):
            domain = own if (own, n) in built.domains else "B"
            values.append((n, draw(st.sampled_from(built.domains[(domain, n)]))))
    for p in pointers:
        values += draw(_pointer_values(built, own, p))
    return Insert(entity, tuple(values))


@st.composite
def _change(draw: st.DrawFn, built: Built, entity: str) -> Write:
    """An update (a plain column, a move, a key change, a discriminator) or a delete."""
    keys = _key(built, entity)
    key = draw(_values(built, entity, keys))
    pointers = _pointers(built, entity)
    choices: list[st.SearchStrategy[Values]] = []
    if entity not in _LINKS:
        plain = [
            n
            for n in _columns(built, entity)
            if n not in keys and not any(n in p for p in pointers) and n != "kind"
        ]
        if plain:
            choices.append(st.sampled_from(plain).flatmap(lambda n: _values(built, entity, [n])))
        if entity != "BX":
            choices += [_pointer_values(built, entity, p) for p in pointers]
            choices.append(st.sampled_from(keys).flatmap(lambda n: _values(built, entity, [n])))
        if entity == "B" and built.mapping.has("single_inheritance"):
            choices.append(_values(built, "B", ["kind"]))
    if not choices or draw(st.integers(0, len(choices))) == 0:
        return Delete(entity, key)
    return Update(entity, key, draw(st.one_of(choices)))


def writes(built: Built) -> st.SearchStrategy[Write]:
    """Any write to any table of ``built``."""
    return inserts(built) | st.one_of([_change(built, e) for e in built.tables])


def inserts(built: Built) -> st.SearchStrategy[Insert]:
    return st.one_of([_insert(built, e) for e in _insertable(built)])


@st.composite
def first_row(draw: st.DrawFn, built: Built, entity: str) -> Insert:
    """An insert of ``entity``'s row with the first key (the one ``Query.one`` loads),
    pointing nowhere (so no constraint refuses it)."""
    insert = draw(_insert(built, entity))
    first: dict[str, Any] = {n: None for p in _pointers(built, entity) for n in p}
    first.update({n: built.domains[(entity, n)][0] for n in _key(built, entity)})
    return Insert(entity, tuple((n, first.get(n, v)) for n, v in insert.values))


def _insertable(built: Built) -> list[str]:
    return list(built.tables) + (
        ["BX"] if "BX" in built.classes and "BX" not in built.tables else []
    )


@st.composite
def groups(draw: st.DrawFn, built: Built) -> Group:
    """A few commits of a few writes each; an update may be followed by a delete of its row."""
    commits: list[Commit] = []
    for _ in range(draw(st.integers(1, 3))):
        commit = tuple(draw(st.lists(writes(built), min_size=1, max_size=3)))
        commits.append(commit)
        last = commit[-1]
        if isinstance(last, Update) and draw(st.booleans()):
            commits.append((Delete(last.entity, _moved_key(last)),))
    return Group(tuple(commits), draw(st.booleans()))


def _moved_key(update: Update) -> Values:
    """The row's key after ``update`` (which may have changed it)."""
    changed = dict(update.values)
    return tuple((n, changed.get(n, v)) for n, v in update.key)


def execute(built: Built, session: Session, write: Write) -> None:
    """Run one write as Core statements (no ORM cascade: the database's own rules apply)."""
    entity = write.entity
    if isinstance(write, Insert):
        values = dict(write.values)
        if entity == "BX" and built.mapping.has("joined_inheritance"):
            sub = {"id": values.get("id"), "extra": values.pop("extra")}
            session.execute(
                sa.insert(built.tables["B"]).values(_by_column(built.tables["B"], values))
            )
            session.execute(
                sa.insert(built.tables["BX"]).values(_by_column(built.tables["BX"], sub))
            )
        else:
            table = built.tables[_table_entity(built, entity)]
            session.execute(sa.insert(table).values(_by_column(table, values)))
        return
    table = built.tables[_table_entity(built, entity)]
    where = [
        _column(table, n) == v if v is not None else _column(table, n).is_(None)
        for n, v in write.key
    ]
    if isinstance(write, Delete):
        if entity == "BX":
            table = built.tables["B"]
            where = [_column(table, n) == v for n, v in write.key]
        session.execute(sa.delete(table).where(*where))
    else:
        session.execute(
            sa.update(table).where(*where).values(_by_column(table, dict(write.values)))
        )


def _column(table: sa.Table, name: str) -> sa.Column[Any]:
    return next(c for c in table.c if c.name == name)


def _by_column(table: sa.Table, values: dict[str, Any]) -> dict[sa.Column[Any], Any]:
    return {_column(table, n): v for n, v in values.items()}


# -- loader options and statements ---------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One loader option on ``key`` (``"A.bs"``), with the options chained below it."""

    key: str
    strategy: str
    children: tuple[Load, ...] = ()
    depth: int | None = None
    """``recursion_depth=`` of a self-referential selectinload."""
    polymorphic: bool = False
    """``of_type(with_polymorphic(B, [BX]))`` on a relationship to B."""
    defer: str | None = None
    """A column of the target deferred (``defer``)."""


@dataclass(frozen=True)
class Query:
    """The statement an example loads: root entity, loader options, criteria, order."""

    root: str
    loads: tuple[Load, ...]
    where: str | None = None
    order: tuple[Order, ...] = ()
    one: bool = False
    """Only the root with the first key (a single object, not a list)."""
    load_only: bool = False
    """``load_only`` the root's key and ``rank``."""
    polymorphic: bool = False
    """Roots B selected ``with_polymorphic(B, [BX])``."""


TARGETS = {
    "A.bs": "B",
    "A.c": "C",
    "B.a": "A",
    "A.o": "O",
    "B.ds": "D",
    "A.ts": "T",
    "A.ts0": "T",
    "A.ats": "AT",
    "AT.t": "T",
    "A.children": "A",
    "A.parent": "A",
    "A.peers": "A",
}


def relationships_of(built: Built, entity: str) -> list[str]:
    return [k for k, _ in built.mapping.rels if k.split(".")[0] == entity]


@st.composite
def loads(
    draw: st.DrawFn,
    built: Built,
    entity: str,
    features: frozenset[str],
    depth: int = 3,
    root: str | None = None,
) -> tuple[Load, ...]:
    out = []
    root = root or entity
    for key in relationships_of(built, entity):
        if depth == 0 or not draw(st.booleans()):
            continue
        if TARGETS[key] == root and "root_below" not in features:
            continue
        strategy = draw(
            st.sampled_from([s for s in STRATEGIES if s != "noload" or "noload_option" in features])
        )
        target = TARGETS[key]
        recursion = None
        if strategy == "selectin" and target == entity and "recursion_depth" in features:
            recursion = draw(st.none() | st.integers(1, 3))
        children: tuple[Load, ...] = ()
        if recursion is None and (strategy in EAGER or strategy == "default"):
            children = draw(loads(built, target, features, depth - 1, root))
        polymorphic = target == "B" and "BX" in built.classes and draw(st.booleans())
        deferred = None
        ordered_by = {o.column for o in built.mapping.rel(key).order}
        deferrable = [
            n
            for (e, n) in built.domains
            if e == target and n in ("name", "rank") and n not in ordered_by
        ]
        if (
            "column_options" in features
            and strategy in EAGER
            and deferrable
            and draw(st.booleans())
        ):
            deferred = draw(st.sampled_from(deferrable))
        out.append(Load(key, strategy, children, recursion, polymorphic, deferred))
    return tuple(out)


@st.composite
def queries(
    draw: st.DrawFn,
    built: Built,
    features: frozenset[str],
    *,
    ordered: bool,
    filtered: bool,
    one: bool,
    polymorphic: bool = True,
) -> Query:
    roots = ["A"] + (["B"] if "B" in built.classes else [])
    root = draw(st.sampled_from(roots))
    options = draw(loads(built, root, features))
    eager = "contains_eager" in features
    if eager and root == "A" and "A.c" in dict(built.mapping.rels) and draw(st.booleans()):
        options = tuple(o for o in options if o.key != "A.c") + (Load("A.c", "contains_eager"),)
    where = draw(st.sampled_from([None, "flag", "rank"])) if filtered else None
    order: tuple[Order, ...] = ()
    if ordered:
        order = tuple(
            draw(
                st.lists(
                    st.builds(
                        Order,
                        st.sampled_from(["rank", "name"]),
                        st.booleans(),
                        st.sampled_from([None, "first", "last"]),
                    ),
                    max_size=2,
                    unique_by=lambda o: o.column,
                )
            )
        )
    return Query(
        root,
        options,
        where,
        order,
        one,
        "column_options" in features and draw(st.booleans()),
        polymorphic and root == "B" and "BX" in built.classes and draw(st.booleans()),
    )


def statement(built: Built, query: Query) -> sa.Select[Any]:
    """The query as a SQLAlchemy statement."""
    model = built.classes[query.root]
    selectable: Any = model
    if query.polymorphic:
        selectable = sa.orm.with_polymorphic(model, [built.classes["BX"]])
    stmt = sa.select(selectable)
    options: list[Any] = []
    for load in query.loads:
        if load.strategy == "contains_eager":
            stmt = stmt.outerjoin(model.c)
        options += _options(built, load, None, selectable)
    if query.load_only:
        kept = ("rank", *(o.column for o in query.order), *_subquery_keys(built, query))
        options.append(
            load_only(*[getattr(selectable, n) for n in _attribute_keys(built, query.root, kept)])
        )
    table = built.tables[query.root]
    if query.where == "flag":
        stmt = stmt.where(table.c.flag == sa.true())
    elif query.where == "rank":
        stmt = stmt.where(sa.func.coalesce(table.c.rank, 0) < 2)
    if query.one:
        stmt = stmt.where(
            *[c == built.domains[(query.root, c.name)][0] for c in table.primary_key.columns]
        )
    if query.order:
        stmt = stmt.order_by(*_order_by(table, Rel(order=query.order)))
    return stmt.options(*options)


def _subquery_keys(built: Built, query: Query) -> list[str]:
    """The foreign key columns of the root's many-to-ones that ``subqueryload`` loads (an
    option, or the ``lazy=`` default): SQLAlchemy's subqueryload reads them from the root's
    rows, and its own query fails (NoSuchColumnError) when ``load_only`` leaves one out."""
    explicit = {load.key: load.strategy for load in query.loads}
    mapper = sa.inspect(built.classes[query.root])
    out: list[str] = []
    for key in relationships_of(built, query.root):
        strategy = explicit.get(key, "default")
        if strategy == "default":
            strategy = built.mapping.rel(key).lazy
        rel = mapper.relationships[key.split(".")[1]]
        if strategy == "subquery" and rel.direction is MANYTOONE:
            out += [c.name for c in rel.local_columns]
    return out


def _attribute_keys(built: Built, entity: str, extra: tuple[str, ...]) -> list[str]:
    mapper = sa.inspect(built.classes[entity])
    return [
        mapper.get_property_by_column(c).key for c in mapper.local_table.primary_key.columns
    ] + [n for n in extra if n in mapper.attrs]


_FUNCTIONS: dict[str, Any] = {
    "default": defaultload,
    "selectin": selectinload,
    "joined": joinedload,
    "subquery": subqueryload,
    "immediate": immediateload,
    "lazy": lazyload,
    "raise": raiseload,
    "noload": noload,
    "contains_eager": contains_eager,
}


def _options(built: Built, load: Load, parent: Any, owner: Any) -> list[Any]:
    """``load`` as SQLAlchemy options chained from ``parent`` (None: from the root)."""
    attr = getattr(owner, load.key.split(".")[1])
    target: Any = built.classes[TARGETS[load.key]]
    if load.polymorphic:
        target = sa.orm.with_polymorphic(target, [built.classes["BX"]], flat=True)
        attr = attr.of_type(target)
    kw = {"recursion_depth": load.depth} if load.depth is not None else {}
    name = _FUNCTIONS[load.strategy].__name__
    loader = (getattr(parent, name) if parent is not None else _FUNCTIONS[load.strategy])(
        attr, **kw
    )
    out = [loader]
    if load.defer is not None:
        out = [loader.defer(getattr(target, load.defer))]
    for child in load.children:
        out += _options(built, child, loader, target)
    return out


def assocs(built: Built, entity: str, given: tuple[Load, ...], depth: int = 6) -> list[Any]:
    """What the options and the relationships' lazy= defaults load below ``entity``, in
    ``rs.subscribe(..., assocs=)`` form."""
    out: list[Any] = []
    if depth == 0:
        return out
    explicit = {load.key: load for load in given}
    for key in relationships_of(built, entity):
        load = explicit.get(key)
        strategy = load.strategy if load is not None else "default"
        if strategy == "default":
            strategy = built.mapping.rel(key).lazy
        if strategy not in EAGER and strategy != "contains_eager":
            continue
        children = load.children if load is not None else ()
        if load is not None and load.depth is not None:
            children = (
                (Load(key, "selectin", children, load.depth - 1 or None),)
                if load.depth > 1
                else children
            )
        below = assocs(built, TARGETS[key], children, depth - 1)
        name = key.split(".")[1]
        out.append({name: below} if below else name)
    return out
