"""sync(): apply one change to a tree of 10k objects (issue 6, row 5).

A throwaway database holds 1,000 persons x 10 posts. The tree is every person with
``selectinload(Person.posts)`` (11,000 objects, detached). A started RowSync watches Person
with assocs ["posts"]; the tree is subscribed.

Each round one transaction on another connection updates K distinct posts (one NOTIFY each,
so K distinct messages with increasing refs); after ``rs.flush()`` the K messages are drained
and each is applied once with ``rs.sync(tree, msg)`` - the first application of a message,
i.e. real work (attribute patch + membership/ordering check), never the no-op re-application
(timed separately). A round stops applying after a time budget (8 s, 2 s with --quick; at
least 5 messages) so a slow sync cannot blow the suite's time; unapplied messages are simply
dropped. The row data is already in the listener's cache, so sync issues no query (counted),
and every applied post is checked to carry its new title afterwards.

Interleaved with those K timings, in the same round:

* re-fetching one row by key: ``Session.get(Post, id)`` in a new Session (ORM), and a Core
  ``SELECT ... WHERE id = :id`` on a pooled connection - alternating with the syncs;
* re-running the tree's query (same loader options, new Session) - once per round.

Figures: p50/p99 over every sync of every round; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import gc
import logging
import random
import time
from typing import Any

import sqlalchemy as sa
from harness import Context, Result, median, percentile, write_profile
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
)

import rowsync

logger = logging.getLogger(__name__)

PERSONS = 1000
POSTS_PER_PERSON = 10
MIN_SAMPLES = 5


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "persons"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None]
    posts: Mapped[list[Post]] = relationship(back_populates="person", order_by="Post.id")


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    person_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("persons.id", ondelete="SET NULL"), index=True
    )
    title: Mapped[str | None]
    body: Mapped[str | None]
    score: Mapped[int | None]
    person: Mapped[Person | None] = relationship(back_populates="posts")


TREE_QUERY = sa.select(Person).options(selectinload(Person.posts)).order_by(Person.id)


def _populate(engine: sa.Engine) -> None:
    Base.metadata.create_all(engine)
    persons = [{"id": i, "name": f"person {i}"} for i in range(1, PERSONS + 1)]
    posts = [
        {
            "id": (p - 1) * POSTS_PER_PERSON + n,
            "person_id": p,
            "title": f"post {p}.{n}",
            "body": "x" * 200,
            "score": n,
        }
        for p in range(1, PERSONS + 1)
        for n in range(1, POSTS_PER_PERSON + 1)
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(Person), persons)
        conn.execute(sa.insert(Post), posts)
        conn.execute(sa.text("ANALYZE"))


def load_tree(engine: sa.Engine) -> list[Person]:
    with Session(engine, expire_on_commit=False) as session:
        return list(session.scalars(TREE_QUERY))


class _Queries:
    """Counts statements on the engine, to show that sync ran none."""

    def __init__(self, engine: sa.Engine) -> None:
        self.count = 0
        sa.event.listen(engine, "before_cursor_execute", self._hit)

    def _hit(self, *args: Any) -> None:
        self.count += 1


def run(ctx: Context) -> list[Result]:
    rounds = ctx.rounds(5, 3)
    per_round = 100
    rng = random.Random(7)
    with ctx.database("sync") as url:
        engine = sa.create_engine(
            sa.make_url(url).set(drivername="postgresql+psycopg"), pool_size=5
        )
        try:
            return _run(ctx, engine, rounds, per_round, rng, budget=ctx.rounds(8.0, 2.0))
        finally:
            engine.dispose()


def _run(
    ctx: Context, engine: sa.Engine, rounds: int, per_round: int, rng: random.Random, budget: float
) -> list[Result]:
    """``budget``: seconds of syncing per round after which its remaining messages are left
    unapplied (at least MIN_SAMPLES are applied), so a slow sync cannot blow the suite's time."""
    t0 = time.perf_counter()
    _populate(engine)
    populate_s = time.perf_counter() - t0
    rs = rowsync.RowSync(engine, rowsync.watchers(Person, ["posts"]))
    rs.install()
    total_posts = PERSONS * POSTS_PER_PERSON
    with rs:
        people = load_tree(engine)
        objects = len(people) + sum(len(p.posts) for p in people)
        t0 = time.perf_counter()
        sub = rs.subscribe(people, assocs=["posts"])
        subscribe_s = time.perf_counter() - t0
        queries = _Queries(engine)
        writer = engine  # changes come from a pooled connection that is not the listener's

        syncs: list[float] = []
        by_round: list[dict[str, float]] = []
        noop: list[float] = []
        orm_key: list[float] = []
        core_key: list[float] = []
        tree_q: list[float] = []
        sync_queries = 0
        wrong = 0
        stmt_key = sa.select(Post.__table__).where(Post.__table__.c.id == sa.bindparam("id"))

        def messages(tag: str) -> tuple[list[Any], dict[int, str]]:
            ids = rng.sample(range(1, total_posts + 1), per_round)
            with writer.begin() as conn:
                conn.execute(
                    sa.update(Post)
                    .where(Post.id.in_(ids))
                    .values(title=sa.literal(f"{tag} ") + sa.cast(Post.id, sa.String))
                )
            rs.flush(30)
            drained = sub.drain()
            if len(drained) != per_round:
                logger.warning("expected %d messages, got %d", per_round, len(drained))
            return drained, {i: f"{tag} {i}" for i in ids}

        posts_by_id = {post.id: post for person in people for post in person.posts}
        for r in range(rounds):
            drained, expected = messages(f"round {r}")
            gc.collect()
            round_syncs: list[float] = []
            round_orm: list[float] = []
            round_tree = 0.0
            started = time.perf_counter()
            applied = []
            for i, msg in enumerate(drained):
                if i >= MIN_SAMPLES and time.perf_counter() - started > budget:
                    break
                applied.append(msg)
                before = queries.count
                t = time.perf_counter()
                people = rs.sync(people, msg)
                round_syncs.append(time.perf_counter() - t)
                sync_queries += queries.count - before
                # interleave the baselines with the syncs
                key = msg[1].ids["id"]
                if i % 2 == 0:
                    t = time.perf_counter()
                    with Session(engine) as session:
                        session.get(Post, key)
                    round_orm.append(time.perf_counter() - t)
                else:
                    t = time.perf_counter()
                    with engine.connect() as conn:
                        conn.execute(stmt_key, {"id": key}).one()
                    core_key.append(time.perf_counter() - t)
                if i == MIN_SAMPLES // 2:
                    t = time.perf_counter()
                    load_tree(engine)
                    round_tree = time.perf_counter() - t
            for msg in applied[:3]:  # the same messages again: already applied
                t = time.perf_counter()
                rs.sync(people, msg)
                noop.append(time.perf_counter() - t)
            done = {m[1].ids["id"] for m in applied}
            wrong += sum(
                posts_by_id[i].title != title for i, title in expected.items() if i in done
            )
            syncs.extend(round_syncs)
            orm_key.extend(round_orm)
            tree_q.append(round_tree)
            by_round.append(
                {"sync": median(round_syncs), "orm": median(round_orm), "tree": round_tree}
            )

        if ctx.profile:
            import cProfile

            drained, _ = messages("profile")
            profiler = cProfile.Profile()
            profiler.enable()
            for msg in drained[:20]:
                people = rs.sync(people, msg)
            profiler.disable()
            write_profile(ctx, "sync", profiler)
        sub.close()

    p50, p99 = percentile(syncs, 50), percentile(syncs, 99)
    orm50, core50 = percentile(orm_key, 50), percentile(core_key, 50)
    tree50 = median(tree_q)
    vs_tree = median([b["tree"] / b["sync"] for b in by_round])
    vs_orm = median([b["orm"] / b["sync"] for b in by_round])
    how = (
        f"{len(syncs)} syncs over {rounds} rounds (each: 1 transaction updating "
        f"{per_round} distinct posts, "
        f"messages applied once until {budget:g} s of syncing); first application each"
    )
    check = f"{sync_queries} queries issued by sync; {wrong} posts not patched"
    tree_label = (
        "re-running the tree query (select Person + selectinload posts, "
        f"{objects:,} objects), median of {rounds}"
    )
    orm_label = "Session.get(Post, id) in a new Session, interleaved with the syncs"
    return [
        Result(
            "sync",
            "apply 1 update, p50",
            p50,
            baseline=orm50,
            baseline_label=orm_label,
            ratio=vs_orm,
            ratio_label="x cheaper",
            goal="p50 <= 20 us",
            met=p50 <= 20e-6,
            notes=f"{how}; {check}",
        ),
        Result(
            "sync",
            "apply 1 update, p99",
            p99,
            baseline=percentile(orm_key, 99),
            baseline_label=orm_label + " (p99)",
            ratio=percentile(orm_key, 99) / p99,
            ratio_label="x cheaper",
        ),
        Result(
            "sync",
            "apply 1 update vs tree query",
            p50,
            baseline=tree50,
            baseline_label=tree_label,
            ratio=vs_tree,
            ratio_label="x cheaper",
            goal=">= 1000x cheaper",
            met=vs_tree >= 1000,
            notes="ratio = median over rounds of (tree query / median sync of that round)",
        ),
        Result(
            "sync",
            "apply 1 update vs Core row by key",
            p50,
            baseline=core50,
            baseline_label="SELECT posts WHERE id = :id on a pooled connection (Core), interleaved",
            ratio=core50 / p50,
            ratio_label="x cheaper",
        ),
        Result(
            "sync",
            "re-apply same message (no-op), p50",
            percentile(noop, 50),
            notes=f"{len(noop)} re-applications of already applied messages",
        ),
        Result(
            "sync",
            "subscribe the tree (context)",
            subscribe_s,
            notes=(
                f"rs.subscribe(people, assocs=['posts']) over {objects:,} objects; "
                f"populate took {populate_s:.1f} s"
            ),
        ),
    ]
