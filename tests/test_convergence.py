"""Scenario 23, the convergence oracle: after any sequence of committed changes, from
several writers at once, applying the delivered messages with ``sync`` gives exactly the
tree a fresh query with the same loader options gives.

Hypothesis drives random inserts, updates, deletes, moves and link changes across every
relationship kind of the reference schema; several subscribers hold trees of different
roots and loader options. It runs in every capture mode. ``ROWSYNC_ORACLE_EXAMPLES`` raises the
budget on demand.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy.orm import Session, sessionmaker

import rowsync
from models import Base, Label, Person, Post, PostTag, Profile, Tag, favourite_people, posts_labels
from oracle import Tree, assocs_of, differences, fresh, snapshot, trees

IDS = st.integers(min_value=1, max_value=5)
NAMES = st.sampled_from(["test", "bad", "worst", "x", None])
BODIES = st.sampled_from(["blabla", "y", None])
TAG_NAMES = st.sampled_from(["test", "t1", "t2"])
EXAMPLES = int(os.environ.get("ROWSYNC_ORACLE_EXAMPLES", "20"))
STEPS = int(os.environ.get("ROWSYNC_ORACLE_STEPS", "25"))
SHRINK = os.environ.get("ROWSYNC_ORACLE_SHRINK", "1") != "0"


class Convergence(RuleBasedStateMachine):
    """Writers change the database; every tree, synced, must equal its fresh query."""

    def __init__(self, rs: rowsync.RowSync, sessions: sessionmaker[Session]) -> None:
        super().__init__()
        self.rs = rs
        self.sessions = sessions
        self.trees: list[Tree] = []

    @initialize(seed=st.lists(st.tuples(IDS, IDS), max_size=6))
    def load(self, seed: list[tuple[int, int]]) -> None:
        for sub in self.rs.subscriptions():
            sub.close()
        with self.sessions() as s, s.begin():
            # TRUNCATE fires no row trigger (and capture="wal" ignores it): the next example
            # starts without a flood of events.
            quote = s.get_bind().dialect.identifier_preparer.format_table
            s.execute(
                sa.text("TRUNCATE " + ", ".join(quote(t) for t in Base.metadata.sorted_tables))
            )
            s.add_all(
                [Person(id=i, name="p") for i in (1, 2, 3)] + [Tag(id=i, name="t1") for i in (1, 2)]
            )
            s.add_all([Label(id=1, name="l")])
            s.flush()
            for post_id, person_id in seed:
                if s.get(Post, post_id) is None:
                    s.add(Post(id=post_id, name="test", body="blabla", person_id=min(person_id, 3)))
        self.rs.flush()
        self.trees = trees()
        for t in self.trees:
            t.value = fresh(self.sessions, t.statement, many=t.many)
            t.sub = self.rs.subscribe(t.value, assocs=assocs_of(t))
            if t.many:
                t.sub.add(
                    t.statement.column_descriptions[0]["entity"],
                    "inserted",
                    follow=True,
                    assocs=assocs_of(t),
                )

    # -- writes ------------------------------------------------------------------------

    def _write(self, *statements: Any) -> None:
        try:
            with self.sessions() as s, s.begin():
                for statement in statements:
                    s.execute(statement)
        except sa.exc.DBAPIError:
            pass  # a constraint said no: nothing was committed, nothing is expected

    @rule(id=IDS, name=st.sampled_from(["p", "q"]))
    def upsert_person(self, id: int, name: str) -> None:
        self._write(
            sa.text(
                "INSERT INTO persons (id, name) VALUES (:i, :n)"
                " ON CONFLICT (id) DO UPDATE SET name = :n"
            ).bindparams(i=id, n=name)
        )

    @rule(id=IDS)
    def delete_person(self, id: int) -> None:
        self._write(sa.delete(Person).where(Person.id == id))

    @rule(id=IDS, person=st.none() | IDS, name=NAMES, body=BODIES)
    def insert_post(self, id: int, person: int | None, name: str | None, body: str | None) -> None:
        self._write(sa.insert(Post).values(id=id, person_id=person, name=name, body=body))

    @rule(id=IDS, name=NAMES, body=BODIES)
    def update_post(self, id: int, name: str | None, body: str | None) -> None:
        self._write(sa.update(Post).where(Post.id == id).values(name=name, body=body))

    @rule(id=IDS, person=st.none() | IDS, other=st.none() | IDS)
    def move_post(self, id: int, person: int | None, other: int | None) -> None:
        self._write(sa.update(Post).where(Post.id == id).values(person_id=person, other_id=other))

    @rule(id=IDS)
    def delete_post(self, id: int) -> None:
        self._write(sa.delete(Post).where(Post.id == id))

    @rule(id=IDS, name=TAG_NAMES)
    def upsert_tag(self, id: int, name: str) -> None:
        self._write(
            sa.text(
                "INSERT INTO tags (id, name) VALUES (:i, :n)"
                " ON CONFLICT (id) DO UPDATE SET name = :n"
            ).bindparams(i=id, n=name)
        )

    @rule(id=IDS)
    def delete_tag(self, id: int) -> None:
        self._write(sa.delete(Tag).where(Tag.id == id))

    @rule(post=IDS, tag=IDS, link=st.booleans())
    def tag_post(self, post: int, tag: int, link: bool) -> None:
        if link:
            self._write(sa.insert(PostTag).values(post_id=post, tag_id=tag))
        else:
            self._write(sa.delete(PostTag).where(PostTag.post_id == post, PostTag.tag_id == tag))

    @rule(post=IDS, label=st.integers(1, 2), link=st.booleans())
    def label_post(self, post: int, label: int, link: bool) -> None:
        if link:
            self._write(
                sa.text(
                    "INSERT INTO labels (id, name) VALUES (:l, 'l') ON CONFLICT DO NOTHING"
                ).bindparams(l=label),
                sa.insert(posts_labels).values(post_id=post, label_id=label),
            )
        else:
            self._write(
                sa.delete(posts_labels).where(
                    posts_labels.c.post_id == post, posts_labels.c.label_id == label
                )
            )

    @rule(id=st.integers(1, 3), person=IDS, bio=st.sampled_from(["a", "b"]))
    def upsert_profile(self, id: int, person: int, bio: str) -> None:
        self._write(
            sa.text(
                "INSERT INTO profiles (id, person_id, bio) VALUES (:i, :p, :b)"
                " ON CONFLICT (id) DO UPDATE SET person_id = :p, bio = :b"
            ).bindparams(i=id, p=person, b=bio)
        )

    @rule(id=st.integers(1, 3))
    def delete_profile(self, id: int) -> None:
        self._write(sa.delete(Profile).where(Profile.id == id))

    @rule(person=IDS, favourite=IDS, link=st.booleans())
    def favourite(self, person: int, favourite: int, link: bool) -> None:
        table = favourite_people
        if link:
            self._write(sa.insert(table).values(person_id=person, favourite_id=favourite))
        else:
            self._write(
                sa.delete(table).where(
                    table.c.person_id == person, table.c.favourite_id == favourite
                )
            )

    @rule(data=st.data())
    def concurrent_writers(self, data: st.DataObject) -> None:
        """Two writers commit at the same time: their events interleave in commit order."""
        moves = [
            (self.move_post, dict(id=data.draw(IDS), person=data.draw(IDS), other=None)),
            (
                self.tag_post,
                dict(post=data.draw(IDS), tag=data.draw(IDS), link=data.draw(st.booleans())),
            ),
            (
                self.update_post,
                dict(id=data.draw(IDS), name=data.draw(NAMES), body=data.draw(BODIES)),
            ),
            (self.delete_tag, dict(id=data.draw(IDS))),
        ]
        picked = data.draw(st.lists(st.sampled_from(moves), min_size=2, max_size=3))
        barrier = threading.Barrier(len(picked))
        threads = [threading.Thread(target=_after(barrier, fn, kwargs)) for fn, kwargs in picked]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    # -- the oracle --------------------------------------------------------------------

    @invariant()
    def every_tree_equals_a_fresh_query(self) -> None:
        if not self.trees:
            return
        self.rs.flush(10)
        for t in self.trees:
            assert t.sub is not None
            for message in t.sub.drain():
                assert message[0] is rowsync.Sync, message
                t.value = self.rs.sync(t.value, message, t.preloads)
            expected = fresh(self.sessions, t.statement, many=t.many)
            if os.environ.get("ROWSYNC_ORACLE_DUMP") and snapshot(t.value) != snapshot(expected):
                import pprint

                with open(os.environ["ROWSYNC_ORACLE_DUMP"], "w") as f:
                    pprint.pprint(
                        {"synced": snapshot(t.value), "fresh": snapshot(expected)}, f, width=150
                    )
            assert snapshot(t.value) == snapshot(expected), (
                t.name,
                differences(snapshot(t.value), snapshot(expected)),
            )


def _after(
    barrier: threading.Barrier, fn: Callable[..., None], kwargs: dict[str, Any]
) -> Callable[[], None]:
    def run() -> None:
        barrier.wait()
        fn(**kwargs)

    return run


def test_synced_trees_converge_to_a_fresh_query(
    moded: rowsync.RowSync, sessions: sessionmaker[Session]
) -> None:
    run_state_machine_as_test(
        lambda: Convergence(moded, sessions),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            phases=[p for p in Phase if p is not Phase.shrink or SHRINK],
        ),
    )
