"""Graph build for a generated 200-model schema (issue 6, row 8; issue 3: "well under a second").

Each round generates the schema afresh (its own DeclarativeBase and registry, disposed at
the end of the round), then times, on that same registry:

* baseline: ``configure_mappers()`` - SQLAlchemy's own cost of configuring those mappers;
* ``Graph(registry.mappers)`` - rowsync's relationship graph (mappers already configured);
* ``graph.reachable(m)`` for every mapper - the per-root precomputation.

Baseline and candidate are therefore interleaved round by round; every figure is the median
over rounds. The goal (< 1 s) is on Graph + reachable for every root.

The schema mixes every relationship kind rowsync handles: many-to-one with back-populating
one-to-many (some ordered, a few one-to-one), composite keys, many-to-many through plain
association tables (some self-referential, some with criteria on the far side), association
objects (with a read-only many-to-many through them), self-referential trees, one-to-many with
extra criteria (``and_(..., Child.status == 'active')``) and multi-hop "through" relationships
(``secondary=join(...)``).
"""

from __future__ import annotations

import gc
import random
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from harness import Context, Goal, Result, median, write_profile
from sqlalchemy.orm import DeclarativeBase, configure_mappers, foreign, relationship

from rowsync.graph import Graph

ROW = 8
"""This benchmark's row in issue 6's table."""

MODELS = 200
ASSOCIATION_OBJECTS = 16
COMPOSITE = {5, 40, 90, 150}
SELF_REFERENTIAL = 10
M2M_TABLES = 24
M2M_SELF = 2
M2M_CRITERIA = 3
CRITERIA = 10
THROUGH = 4
SEED = 20240601


@dataclass
class Schema:
    base: type[DeclarativeBase]
    kinds: Counter[str] = field(default_factory=Counter)


@dataclass
class _ManyToOne:
    child: int
    k: int
    parent: int
    columns: list[str]
    one_to_one: bool


def generate(seed: int = SEED) -> Schema:
    """A fresh 200-model schema in its own registry (same shape for the same seed)."""
    rng = random.Random(seed)
    metadata = sa.MetaData()

    class Base(DeclarativeBase):
        pass

    Base.metadata = metadata
    schema = Schema(Base)
    kinds = schema.kinds
    entities = MODELS - ASSOCIATION_OBJECTS
    simple = [i for i in range(entities) if i not in COMPOSITE]
    selfref = set(rng.sample(simple[1:], SELF_REFERENTIAL))

    # -- many-to-one plan (each entity points at 1-3 earlier ones, mostly nearby) --
    m2o: list[_ManyToOne] = []
    for i in range(1, entities):
        for k in range(rng.choice([1, 1, 1, 2, 2, 3])):
            j = rng.randrange(max(0, i - 30), i)
            cols = [f"r{k}_id", f"r{k}_region"] if j in COMPOSITE else [f"r{k}_id"]
            m2o.append(
                _ManyToOne(i, k, j, cols, one_to_one=rng.random() < 0.05 and j not in COMPOSITE)
            )

    # -- entity classes --------------------------------------------------------------
    classes: list[Any] = []
    for i in range(entities):
        attrs: dict[str, Any] = {
            "__tablename__": f"e{i}",
            "id": sa.Column(sa.Integer, primary_key=True),
            "name": sa.Column(sa.String(100)),
            "status": sa.Column(sa.String(20)),
            "score": sa.Column(sa.Integer),
        }
        if i in COMPOSITE:
            attrs["region"] = sa.Column(sa.String(8), primary_key=True)
        if i in selfref:
            attrs["parent_id"] = sa.Column(sa.Integer, sa.ForeignKey(f"e{i}.id"))
        constraints: list[Any] = []
        for r in (r for r in m2o if r.child == i):
            if r.parent in COMPOSITE:
                attrs[r.columns[0]] = sa.Column(sa.Integer)
                attrs[r.columns[1]] = sa.Column(sa.String(8))
                constraints.append(
                    sa.ForeignKeyConstraint(r.columns, [f"e{r.parent}.id", f"e{r.parent}.region"])
                )
            else:
                attrs[r.columns[0]] = sa.Column(
                    sa.Integer, sa.ForeignKey(f"e{r.parent}.id"), unique=r.one_to_one
                )
        if constraints:
            attrs["__table_args__"] = tuple(constraints)
        classes.append(type(f"E{i}", (Base,), attrs))

    # -- many-to-one + back-populating one-to-many ---------------------------------------
    for r in m2o:
        child, parent = classes[r.child], classes[r.parent]
        fks = [getattr(child, c) for c in r.columns]
        many = f"e{r.child}_r{r.k}s"
        setattr(child, f"ref{r.k}", relationship(parent, foreign_keys=fks, back_populates=many))
        ordered = rng.random() < 0.3 and not r.one_to_one
        setattr(
            parent,
            many,
            relationship(
                child,
                foreign_keys=fks,
                back_populates=f"ref{r.k}",
                uselist=not r.one_to_one,
                order_by=child.id if ordered else False,
            ),
        )
        kinds["one-to-one" if r.one_to_one else "many-to-one+one-to-many"] += 1
        kinds["ordered"] += ordered

    # -- self-referential trees ----------------------------------------------------------
    for i in selfref:
        cls = classes[i]
        cls.parent = relationship(
            cls, remote_side=[cls.id], foreign_keys=[cls.parent_id], back_populates="children"
        )
        cls.children = relationship(cls, foreign_keys=[cls.parent_id], back_populates="parent")
        kinds["self-referential"] += 1

    # -- one-to-many with extra criteria -------------------------------------------------
    plain = [r for r in m2o if r.parent not in COMPOSITE and not r.one_to_one]
    for r in rng.sample(plain, CRITERIA):
        child, parent = classes[r.child], classes[r.parent]
        fk = getattr(child, r.columns[0])
        setattr(
            parent,
            f"active_e{r.child}_r{r.k}s",
            relationship(
                child,
                primaryjoin=sa.and_(parent.id == foreign(fk), child.status == "active"),
                viewonly=True,
            ),
        )
        kinds["criteria"] += 1

    # -- many-to-many through plain association tables -----------------------------------
    for n in range(M2M_TABLES):
        if n < M2M_SELF:
            a = b = rng.choice(simple)
        else:
            a, b = rng.sample(simple, 2)
        table = sa.Table(
            f"m2m_{n}",
            metadata,
            sa.Column("a_id", sa.ForeignKey(f"e{a}.id", ondelete="CASCADE"), primary_key=True),
            sa.Column("b_id", sa.ForeignKey(f"e{b}.id", ondelete="CASCADE"), primary_key=True),
        )
        A, B = classes[a], classes[b]
        if a == b:
            setattr(
                A,
                f"peers_{n}",
                relationship(
                    A,
                    secondary=table,
                    primaryjoin=A.id == table.c.a_id,
                    secondaryjoin=A.id == table.c.b_id,
                ),
            )
            kinds["many-to-many self"] += 1
            continue
        setattr(A, f"m2m_{n}", relationship(B, secondary=table, back_populates=f"m2m_{n}_rev"))
        setattr(B, f"m2m_{n}_rev", relationship(A, secondary=table, back_populates=f"m2m_{n}"))
        kinds["many-to-many"] += 1
        if n < M2M_SELF + M2M_CRITERIA:
            setattr(
                A,
                f"active_m2m_{n}",
                relationship(
                    B,
                    secondary=table,
                    primaryjoin=A.id == table.c.a_id,
                    secondaryjoin=sa.and_(table.c.b_id == B.id, B.status == "active"),
                    viewonly=True,
                ),
            )
            kinds["many-to-many criteria"] += 1

    # -- association objects (+ a read-only many-to-many through each) -------------------
    has_parent = {r.child: r for r in plain}
    links: list[tuple[int, int, Any]] = []
    for n in range(ASSOCIATION_OBJECTS):
        a = (
            rng.choice([i for i in simple if i in has_parent])
            if n < THROUGH
            else rng.choice(simple)
        )
        b = rng.choice([i for i in simple if i != a])
        A, B = classes[a], classes[b]
        link: Any = type(
            f"Link{n}",
            (Base,),
            {
                "__tablename__": f"link_{n}",
                "a_id": sa.Column(sa.ForeignKey(f"e{a}.id", ondelete="CASCADE"), primary_key=True),
                "b_id": sa.Column(sa.ForeignKey(f"e{b}.id", ondelete="CASCADE"), primary_key=True),
                "role": sa.Column(sa.String(20)),
            },
        )
        link.a = relationship(A, back_populates=f"links_{n}")
        link.b = relationship(B, back_populates=f"links_{n}_b")
        setattr(A, f"links_{n}", relationship(link, back_populates="a"))
        setattr(B, f"links_{n}_b", relationship(link, back_populates="b"))
        setattr(A, f"via_link_{n}", relationship(B, secondary=link.__table__, viewonly=True))
        links.append((a, b, link))
        kinds["association object"] += 1

    # -- multi-hop "through": grandparent -> (entity JOIN link) -> far side --------------
    for n, (a, b, link) in enumerate(links[:THROUGH]):
        r = has_parent[a]
        X, Y, P = classes[a], classes[b], classes[r.parent]
        fk = getattr(X, r.columns[0])
        setattr(
            P,
            f"through_{n}",
            relationship(
                Y,
                secondary=sa.join(X.__table__, link.__table__, X.id == link.a_id),
                primaryjoin=P.id == fk,
                secondaryjoin=link.b_id == Y.id,
                viewonly=True,
            ),
        )
        kinds["through (secondary=join)"] += 1

    kinds["composite-key models"] = len(COMPOSITE)
    return schema


def _round() -> dict[str, Any]:
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        schema = generate()
        t1 = time.perf_counter()
        c1 = time.thread_time()
        configure_mappers()
        t2 = time.perf_counter()
        mappers = list(schema.base.registry.mappers)
        c2 = time.thread_time()
        graph = Graph(mappers)
        t3 = time.perf_counter()
        reached = [graph.reachable(m) for m in mappers]
        t4 = time.perf_counter()
        c4 = time.thread_time()
    result = {
        "declare": t1 - t0,
        "configure": t2 - t1,
        "graph": t3 - t2,
        "reachable": t4 - t3,
        "cpu": c4 - c2,
        "cpu_configure": c2 - c1,
        "models": len(mappers),
        "edges": len(graph.edges),
        "recompute": sum(e.recompute for e in graph.edges),
        "secondary": sum(e.secondary is not None for e in graph.edges),
        "criteria": sum(e.criteria is not None for e in graph.edges),
        "reachable_mean": sum(len(r) for r in reached) / len(reached),
        "tables": len(schema.base.metadata.tables),
        "kinds": dict(schema.kinds),
        "warnings": len(caught),
        "warning_sample": [str(w.message)[:200] for w in caught[:3]],
    }
    schema.base.registry.dispose()
    return result


def run(ctx: Context) -> list[Result]:
    rounds = ctx.rounds(5, 2)
    samples = [_round() for _ in range(rounds)]
    if ctx.profile:
        _profile(ctx)

    def m(key: str) -> float:
        return median([s[key] for s in samples])

    total_ratio = median([(s["graph"] + s["reachable"]) / s["configure"] for s in samples])
    cpu_ratio = median([s["cpu"] / s["cpu_configure"] for s in samples])
    graph_ratio = median([s["graph"] / s["configure"] for s in samples])
    total = median([s["graph"] + s["reachable"] for s in samples])
    last = samples[-1]
    how = f"median of {rounds} rounds, schema regenerated per round"
    baseline = f"configure_mappers() on the same fresh {last['models']}-model registry, same round"
    shape = (
        f"{last['models']} models, {last['tables']} tables, {last['edges']} edges "
        f"({last['secondary']} via secondary, {last['criteria']} with criteria, "
        f"{last['recompute']} recompute); "
        f"mean {last['reachable_mean']:.0f} tables reachable per root; kinds {last['kinds']}"
    )
    if last["warnings"]:
        shape += f"; {last['warnings']} SQLAlchemy warnings, e.g. {last['warning_sample'][0]!r}"
    return [
        Result("graph", "declare 200 models (context)", m("declare"), notes=how),
        Result("graph", "configure_mappers()", m("configure"), notes=how),
        Result(
            "graph",
            "Graph() build",
            m("graph"),
            baseline=m("configure"),
            baseline_label=baseline,
            ratio=graph_ratio,
        ),
        Result(
            "graph", "reachable() x every root", m("reachable"), notes=f"{last['models']} roots"
        ),
        Result(
            "graph",
            "Graph + reachable, 200 models",
            total,
            baseline=m("configure"),
            baseline_label=baseline,
            ratio=total_ratio,
            goal=Goal.at_most("< 1 s", total, 1.0),
            notes=(
                f"{how}; CPU time of this thread {m('cpu') * 1e3:.0f} ms vs configure_mappers "
                f"{m('cpu_configure') * 1e3:.0f} ms (ratio {cpu_ratio:.2f}x; "
                "wall includes other load)"
            ),
        ),
        Result("graph", "edges", float(last["edges"]), unit="count", notes=shape),
    ]


def _profile(ctx: Context) -> None:
    """cProfile of one Graph build + reachable for every root, to bench/profiles/graph.txt."""
    import cProfile

    schema = generate()
    configure_mappers()
    mappers = list(schema.base.registry.mappers)
    profiler = cProfile.Profile()
    profiler.enable()
    graph = Graph(mappers)
    for mapper in mappers:
        graph.reachable(mapper)
    profiler.disable()
    schema.base.registry.dispose()
    write_profile(ctx, "graph", profiler)
