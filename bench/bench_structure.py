"""sync(): apply one structural change - an insert into a collection, a delete from one, a move
between two parents - to a tree of 1.1k and one of 12.1k objects (issue 12, row 10).

A throwaway database holds two copies of the people/posts schema (``models.schema``): 100
persons x 10 posts (the 1.1k tree) and 1,100 persons x 10 posts (the 12.1k tree). Each tree is
every person of its copy with ``selectinload(Person.posts)``, detached, subscribed (with assocs
["posts"]) on a started RowSync of its own (own schema, own channel).

Each round, for each kind in turn (insert, delete, move, and update as context; the order
rotated from round to round) and each tree in turn (order alternating), one transaction on
another engine makes ``n`` changes of that kind in that tree: ``n`` posts inserted under
random persons (new ids: they end their collections), ``n`` random posts deleted, ``n``
random posts moved to another random person (a new ``person_id``: they leave one collection
and take their ``order_by`` place in another), or ``n`` random posts retitled. After
``rs.flush()`` the ``n`` messages are drained and each is applied **once**, back to back,
with ``rs.sync(tree, msg)``: every timing is a first application (real work). Afterwards each
applied change is checked in the tree (the inserted post under its person, the deleted one
gone, the moved one under its new person and no longer under its old one, the new title),
and at the end each whole tree is compared with a fresh query (persons, posts, order).

``n`` is sized per round so a block takes about the time budget (1.5 s, 0.5 s with --quick):
as many changes as the previous round's p50 allows, at least 5 (3) and at most 100, the same
``n`` for inserts, deletes and moves of a tree (its size stays put). Every message written is
applied, so the trees never drift from the database.

Baseline, in the same round: the same kind of change applied to the 1.1k tree; the ratio is
the median over rounds of p50(12.1k) / p50(1.1k) of that round. Context: re-running each
tree's query (same loader options, new Session), once per round. Figures: p50/p99 over every
sync of every round.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from harness import Context, Goal, Queries, Result, median, percentile, write_profile

import rowsync
from models import Schema, populate, schema

logger = logging.getLogger(__name__)

ROW = 10
"""This benchmark's row in issue 12's table."""

POSTS_PER_PERSON = 10
SIZES = (("1.1k", 100, "_small"), ("12.1k", 1100, "_large"))
"""(label, persons, table suffix) of each tree; the first is the baseline."""
STRUCTURAL = ("insert", "delete", "move")
KINDS = (*STRUCTURAL, "update")
MAX_SAMPLES = 100


@dataclass(frozen=True)
class _Plan:
    rounds: int
    budget: float
    """Seconds of syncing a block aims at."""
    least: int
    """Changes per block, however slow."""


class _Collections:
    """Full (generation 2) garbage collections that run inside the timed syncs, and their
    time: a sync that allocates in proportion to the tree triggers them, and each one walks
    every object the process holds (both trees), so they are part of what sync costs."""

    def __init__(self) -> None:
        self.timing = False
        self.count = 0
        self.seconds = 0.0
        self._started = 0.0

    def __enter__(self) -> _Collections:
        gc.callbacks.append(self._event)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._event)

    def _event(self, phase: str, info: dict[str, int]) -> None:
        if not self.timing or info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._started


@dataclass
class _Tree:
    """One tree, its RowSync and subscription, and what the database holds (to check it)."""

    label: str
    schema: Schema
    engine: sa.Engine
    rs: rowsync.RowSync
    people: list[Any]
    sub: rowsync.Subscription
    queries: Queries
    owner: dict[int, int]
    """Post id -> person id, as committed."""
    next_id: int
    samples: dict[str, list[list[float]]] = field(default_factory=lambda: {k: [] for k in KINDS})
    """Kind -> one list of sync times per round."""
    tree_query: list[float] = field(default_factory=list)
    sync_queries: int = 0
    wrong: int = 0
    collections: _Collections = field(default_factory=_Collections)

    @property
    def persons(self) -> int:
        return len(self.people)

    def objects(self) -> int:
        return len(self.people) + sum(len(p.posts) for p in self.people)


def run(ctx: Context) -> list[Result]:
    plan = _Plan(rounds=ctx.rounds(5, 3), budget=ctx.rounds(1.5, 0.5), least=ctx.rounds(5, 3))
    rng = random.Random(12)
    with ctx.database("structure") as url:
        engine_url = sa.make_url(url).set(drivername="postgresql+psycopg")
        writer = sa.create_engine(engine_url)
        engines = [sa.create_engine(engine_url, pool_size=2) for _ in SIZES]
        trees: list[_Tree] = []
        try:
            for (label, persons, suffix), engine in zip(SIZES, engines, strict=True):
                trees.append(_open(engine, label, persons, suffix))
            with contextlib.ExitStack() as stack:
                for t in trees:
                    stack.enter_context(t.collections)
                _rounds(trees, writer, plan, rng)
            if ctx.profile:
                _profile(ctx, trees[-1], writer, plan, rng)
            fresh = {t.label: _same_as_fresh_query(t) for t in trees}
            return _results(trees, fresh, plan)
        finally:
            for t in trees:
                t.sub.close()
                t.rs.stop()
            for engine in [writer, *engines]:
                engine.dispose()


def _open(engine: sa.Engine, label: str, persons: int, suffix: str) -> _Tree:
    s = schema(suffix)
    populate(engine, s, persons, POSTS_PER_PERSON)
    rs = rowsync.RowSync(
        engine,
        rowsync.watchers(s.person, ["posts"]),
        schema=f"rowsync{suffix}",
        channel=f"bench{suffix}",
    )
    rs.install()
    rs.start()
    people = s.load_tree(engine)
    sub = rs.subscribe(people, assocs=["posts"])
    posts = persons * POSTS_PER_PERSON
    owner = {i: (i - 1) // POSTS_PER_PERSON + 1 for i in range(1, posts + 1)}
    tree = _Tree(label, s, engine, rs, people, sub, Queries(engine), owner, posts + 1)
    logger.info("%s tree: %d objects", label, tree.objects())
    return tree


def _rounds(trees: list[_Tree], writer: sa.Engine, plan: _Plan, rng: random.Random) -> None:
    """Every kind on every tree each round, in turns; ``n`` sized by the last round's p50."""
    for r in range(plan.rounds):
        counts = {id(tree): {kind: _how_many(tree, kind, plan) for kind in KINDS} for tree in trees}
        shift = r % len(KINDS)
        for kind in KINDS[shift:] + KINDS[:shift]:
            for tree in trees if r % 2 == 0 else trees[::-1]:
                n = counts[id(tree)][kind]
                gc.collect()
                tree.samples[kind].append(_block(tree, writer, kind, n, rng, f"round {r}"))
                logger.info(
                    "round %d %s %s: %d syncs, p50 %.1f us",
                    r,
                    tree.label,
                    kind,
                    n,
                    median(tree.samples[kind][-1]) * 1e6,
                )
        for tree in trees:
            t = time.perf_counter()
            tree.schema.load_tree(tree.engine)
            tree.tree_query.append(time.perf_counter() - t)


def _how_many(tree: _Tree, kind: str, plan: _Plan) -> int:
    """As many changes as ``budget`` allows at the last round's p50 (between the bounds); the
    structural kinds share the slowest one's count, so inserts and deletes balance out."""
    kinds = STRUCTURAL if kind in STRUCTURAL else (kind,)
    last = [median(tree.samples[k][-1]) for k in kinds if tree.samples[k]]
    if not last:
        return plan.least
    return max(plan.least, min(MAX_SAMPLES, int(plan.budget / max(max(last), 1e-9))))


def _block(
    tree: _Tree, writer: sa.Engine, kind: str, n: int, rng: random.Random, tag: str
) -> list[float]:
    """Commit ``n`` changes of ``kind``, then apply each message once; the sync times."""
    check = _WRITES[kind](tree, writer, n, rng, tag)
    tree.rs.flush(30)
    drained = tree.sub.drain()
    if len(drained) != n:
        logger.warning("%s %s: expected %d messages, got %d", tree.label, kind, n, len(drained))
    times: list[float] = []
    for msg in drained:
        before = tree.queries.count
        tree.collections.timing = True
        t = time.perf_counter()
        tree.people = tree.rs.sync(tree.people, msg)
        times.append(time.perf_counter() - t)
        tree.collections.timing = False
        tree.sync_queries += tree.queries.count - before
    by_id = {p.id: p for p in tree.people}
    tree.wrong += sum(not ok(by_id) for ok in check)
    return times


Check = Callable[[dict[int, Any]], bool]
"""Is one applied change in the tree (persons by id)?"""


def _insert(tree: _Tree, writer: sa.Engine, n: int, rng: random.Random, tag: str) -> list[Check]:
    ids = range(tree.next_id, tree.next_id + n)
    tree.next_id += n
    rows = [
        {
            "id": i,
            "person_id": rng.randint(1, tree.persons),
            "title": f"{tag} {i}",
            "body": "x" * 200,
            "score": 0,
        }
        for i in ids
    ]
    with writer.begin() as conn:
        conn.execute(sa.insert(tree.schema.posts), rows)
    tree.owner.update((row["id"], row["person_id"]) for row in rows)
    return [_under(row["id"], row["person_id"]) for row in rows]


def _delete(tree: _Tree, writer: sa.Engine, n: int, rng: random.Random, tag: str) -> list[Check]:
    ids = rng.sample(sorted(tree.owner), n)
    with writer.begin() as conn:
        conn.execute(sa.delete(tree.schema.posts).where(tree.schema.posts.c.id.in_(ids)))
    return [_not_under(i, tree.owner.pop(i)) for i in ids]


def _move(tree: _Tree, writer: sa.Engine, n: int, rng: random.Random, tag: str) -> list[Check]:
    moves = {}
    for i in rng.sample(sorted(tree.owner), n):
        other = rng.randint(1, tree.persons - 1)
        moves[i] = other + (other >= tree.owner[i])  # any person but the post's own
    posts = tree.schema.posts
    with writer.begin() as conn:
        conn.execute(
            sa.update(posts)
            .where(posts.c.id.in_(list(moves)))
            .values(person_id=sa.case(moves, value=posts.c.id))
        )
    checks: list[Check] = []
    for i, new in moves.items():
        checks += [_not_under(i, tree.owner[i]), _under(i, new)]
        tree.owner[i] = new
    return checks


def _update(tree: _Tree, writer: sa.Engine, n: int, rng: random.Random, tag: str) -> list[Check]:
    ids = rng.sample(sorted(tree.owner), n)
    posts = tree.schema.posts
    with writer.begin() as conn:
        conn.execute(
            sa.update(posts)
            .where(posts.c.id.in_(ids))
            .values(title=sa.literal(f"{tag} ") + sa.cast(posts.c.id, sa.String))
        )
    return [_titled(i, tree.owner[i], f"{tag} {i}") for i in ids]


_WRITES: dict[str, Callable[[_Tree, sa.Engine, int, random.Random, str], list[Check]]] = {
    "insert": _insert,
    "delete": _delete,
    "move": _move,
    "update": _update,
}


def _under(post: int, person: int) -> Check:
    """The post is in the person's posts, and they are in ``order_by`` (id) order."""

    def ok(by_id: dict[int, Any]) -> bool:
        ids = [p.id for p in by_id[person].posts]
        return post in ids and ids == sorted(ids)

    return ok


def _not_under(post: int, person: int) -> Check:
    return lambda by_id: all(p.id != post for p in by_id[person].posts)


def _titled(post: int, person: int, title: str) -> Check:
    return lambda by_id: any(p.id == post and p.title == title for p in by_id[person].posts)


def _shape(people: list[Any]) -> list[tuple[Any, ...]]:
    return [(p.id, p.name, [(x.id, x.person_id, x.title) for x in p.posts]) for p in people]


def _same_as_fresh_query(tree: _Tree) -> bool:
    tree.rs.flush(30)
    for msg in tree.sub.drain():  # nothing should be left; applied if there is
        tree.people = tree.rs.sync(tree.people, msg)
    return _shape(tree.people) == _shape(tree.schema.load_tree(tree.engine))


def _profile(ctx: Context, tree: _Tree, writer: sa.Engine, plan: _Plan, rng: random.Random) -> None:
    """cProfile of one block of each structural kind (the most changes a block makes) on
    the larger tree."""
    import cProfile

    profiler = cProfile.Profile()
    for kind in STRUCTURAL:
        check = _WRITES[kind](tree, writer, MAX_SAMPLES, rng, "profile")
        tree.rs.flush(30)
        drained = tree.sub.drain()
        profiler.enable()
        for msg in drained:
            tree.people = tree.rs.sync(tree.people, msg)
        profiler.disable()
        by_id = {p.id: p for p in tree.people}
        tree.wrong += sum(not ok(by_id) for ok in check)
    write_profile(ctx, "structure", profiler)


def _results(trees: list[_Tree], fresh: dict[str, bool], plan: _Plan) -> list[Result]:
    small, large = trees
    results: list[Result] = []
    how = (
        f"{plan.rounds} rounds; each round one transaction of n changes per kind and tree "
        f"(n sized to a {plan.budget:g} s budget, {plan.least}-{MAX_SAMPLES}), every message "
        "applied once, back to back"
    )
    for kind in KINDS:
        goal_us = 20 if kind == "update" else 100
        every = {t.label: [x for r in t.samples[kind] for x in r] for t in trees}
        p50 = {label: percentile(xs, 50) for label, xs in every.items()}
        ratio = median(
            [
                median(b) / median(a)
                for a, b in zip(small.samples[kind], large.samples[kind], strict=True)
            ]
        )
        what = "update (context)" if kind == "update" else kind
        for t in trees:
            larger = t is large
            results.append(
                Result(
                    "structure",
                    f"{what}, {t.label} objects: p50",
                    p50[t.label],
                    baseline=p50[small.label] if larger else None,
                    baseline_label=(
                        f"the same kind of change applied to the {small.label} tree, same rounds"
                        if larger
                        else None
                    ),
                    ratio=ratio if larger else None,
                    goal=Goal.at_most(f"p50 <= {goal_us} us", p50[t.label], goal_us * 1e-6),
                    notes=f"{len(every[t.label])} syncs; {how}",
                )
            )
        for t in trees:
            results.append(
                Result(
                    "structure", f"{what}, {t.label} objects: p99", percentile(every[t.label], 99)
                )
            )
        if kind in STRUCTURAL:
            results.append(
                Result(
                    "structure",
                    f"{kind}: p50 {large.label} / {small.label}",
                    ratio,
                    unit="x",
                    goal=Goal.at_most("<= 2x", ratio, 2.0, "x"),
                    notes="median over rounds of that round's p50(larger tree) / p50(smaller tree)",
                )
            )
    for t in trees:
        structural = [median(r) for k in STRUCTURAL for r in t.samples[k]]
        query = median(t.tree_query)
        syncs = sum(len(r) for k in KINDS for r in t.samples[k])
        results.append(
            Result(
                "structure",
                f"tree query, {t.label} objects (context)",
                query,
                ratio=query / median(structural),
                ratio_label="x a structural sync",
                notes=(
                    f"select Person + selectinload posts ({t.objects():,} objects at the end), "
                    f"median of {len(t.tree_query)}; ratio to the median of the rounds' "
                    f"structural p50s. Full garbage collections inside this tree's {syncs} timed "
                    f"syncs: {t.collections.count}, {t.collections.seconds:.2f} s in all"
                ),
            )
        )
    wrong = sum(t.wrong for t in trees) + sum(not same for same in fresh.values())
    results.append(
        Result(
            "structure",
            "changes missing + trees unequal to a fresh query",
            wrong,
            unit="count",
            goal=Goal.at_most("0", wrong, 0, "count"),
            notes="; ".join(
                f"{t.label}: {t.wrong} applied changes not found in the tree, "
                f"{'equal to' if fresh[t.label] else 'DIFFERENT from'} a fresh query at the end, "
                f"{t.sync_queries} queries issued by sync"
                for t in trees
            ),
        )
    )
    return results
