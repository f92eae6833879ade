"""The mapping oracle (issue 12): on generated mappings, loader options and commit sequences,
the tree ``sync`` patched equals a fresh query with the same options.

Each example draws a mapping (tests/genmap.py, feature list in ``genmap.FEATURES``), creates
its tables, starts a RowSync on them, seeds rows, loads a statement, then runs groups of
commits from another session, each group one commit at a time or all in one listener batch
(``rowsync.testing.one_batch``). After every group the synced tree is compared with a fresh
query by the strict comparer of tests/oracle.py. These ways of holding a tree are checked:
``rs.subscribe`` (a list of roots that follows inserts, or a single root), ``rs.load`` and
``rs.live`` (a statement with a WHERE and an ORDER BY keeps its own list), and a subscription
told to resync (``rs.resync``) halfway.

Features whose fixes are not on main yet are left out of the CI run through :data:`BROKEN`;
each has its own test, expected to fail (strict xfail), named after it.

``ROWSYNC_ORACLE_EXAMPLES`` sets the examples per test (CI: derandomized, a fixed budget);
``ROWSYNC_ORACLE_SOAK=1`` draws random seeds instead (``make oracle-soak``).
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, note, seed, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session, sessionmaker

import genmap
import rowsync
from oracle import differences, fresh, snapshot
from rowsync.app import Capture
from rowsync.testing import one_batch

# noload() is deprecated in SQLAlchemy 2.1, and still what applications use.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The (``)?noload:sqlalchemy.exc.SADeprecationWarning"
)

NOLOAD_PRELOADS = (
    "a list empty when subscribed, or a single root once deleted, takes new roots loaded as "
    "preloads say, and preloads cannot say noload (rs.load and rs.live know the statement)"
)

BROKEN: dict[str, str] = {
    "joined_inheritance@live": "live queries refuse inheritance hierarchies (a clear error)",
    "single_inheritance@live": "live queries refuse inheritance hierarchies (a clear error)",
    "contains_eager@load": "rs.load refuses a statement that reads another table (a clear "
    "error naming it: rs.live keeps those)",
    "noload_option@tree": NOLOAD_PRELOADS,
    "noload_option@single": NOLOAD_PRELOADS,
    "noload_option@resync": NOLOAD_PRELOADS,
}
"""Features (``genmap.FEATURES``) left out of the CI run, with the issue item whose fix brings
them back; ``feature@variant`` leaves it out of that way of holding a tree only."""

ELSEWHERE: dict[str, str] = {
    **{
        f"noload_option@{v}": "test_a_root_joining_a_list_empty_when_subscribed_gets_the_"
        "empty_value_noload_sets"
        for v in ("tree", "single", "resync")
    },
}
"""BROKEN entries the gated run below does not reproduce within its budget, and their evidence
(tests named here are in tests/test_sync_regressions.py)."""

EXAMPLES = int(os.environ.get("ROWSYNC_ORACLE_EXAMPLES", "50"))
SOAK = os.environ.get("ROWSYNC_ORACLE_SOAK", "") not in ("", "0")
GATED_EXAMPLES = int(os.environ.get("ROWSYNC_ORACLE_GATED_EXAMPLES", "200"))
SHRINK = os.environ.get("ROWSYNC_ORACLE_SHRINK", "1") != "0"
VARIANTS = ("tree", "single", "live", "resync", "load")


def working(variant: str) -> tuple[str, ...]:
    """The features CI draws from for ``variant``."""
    return tuple(f for f in genmap.FEATURES if f not in BROKEN and f"{f}@{variant}" not in BROKEN)


def budget(examples: int, *, shrink: bool = True, seeded: bool = False) -> settings:
    """``seeded``: the test fixes its own ``@seed`` (deterministic without derandomize)."""
    return settings(
        max_examples=examples,
        derandomize=not SOAK and not seeded,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[p for p in Phase if p is not Phase.shrink or (shrink and SHRINK)],
        print_blob=True,
    )


# -- one example ---------------------------------------------------------------------


@dataclass
class Held:
    """A tree as a subscriber holds it, and how to bring it up to date."""

    statement: sa.Select[Any]
    many: bool
    order: tuple[str, ...]
    value: Any = None
    sub: rowsync.Subscription | None = None
    live: rowsync.LiveQuery | None = None
    preloads: dict[Any, Any] | None = None


@contextlib.contextmanager
def started(
    engine: sa.Engine, built: genmap.Built, capture: Capture = "notify"
) -> Iterator[rowsync.RowSync]:
    """``built``'s tables with a started RowSync on them; everything dropped afterwards."""
    root = built.root
    watchers = rowsync.watchers(
        root, [k.split(".")[1] for k in genmap.relationships_of(built, "A")]
    )
    for cls in built.classes.values():
        watchers += rowsync.watchers(
            cls, [k.split(".")[1] for k in genmap.relationships_of(built, _entity(built, cls))]
        )
    built.metadata.create_all(engine)
    try:
        rs = rowsync.RowSync(engine, watchers, capture=capture)
        rs.install()
        try:
            with rs:
                yield rs
        finally:
            rs.uninstall(drop_schema=True)
    finally:
        built.metadata.drop_all(engine)
        built.dispose()


def _entity(built: genmap.Built, cls: type[Any]) -> str:
    return next(e for e, c in built.classes.items() if c is cls)


def commit(sessions: sessionmaker[Session], built: genmap.Built, writes: genmap.Commit) -> None:
    """One transaction; a write a constraint refuses is rolled back alone (a savepoint)."""
    with sessions() as session, session.begin():
        for write in writes:
            try:
                with session.begin_nested():
                    genmap.execute(built, session, write)
            except sa.exc.IntegrityError:
                pass


def check(
    engine: sa.Engine,
    data: st.DataObject,
    features: tuple[str, ...],
    variant: str,
    required: tuple[str, ...] = (),
    capture: Capture = "notify",
) -> None:
    mapping = data.draw(genmap.mappings(features, required), label="mapping")
    built = genmap.build(mapping)
    with started(engine, built, capture) as rs:
        sessions = sessionmaker(engine, expire_on_commit=False)
        allowed = frozenset({*features, *required})
        seed = data.draw(st.lists(genmap.inserts(built), min_size=2, max_size=8), label="seed")
        for write in seed:
            commit(sessions, built, (write,))
        # a root list with a WHERE is kept by its statement: rs.load or a live query
        filtered = variant in ("live", "load")
        query = data.draw(
            genmap.queries(
                built,
                allowed,
                ordered=filtered,
                filtered=filtered,
                one=variant == "single",
                # both refuse with_polymorphic (a statement of several classes) clearly
                polymorphic=not filtered,
            ),
            label="query",
        )
        if query.one:
            commit(sessions, built, (data.draw(genmap.first_row(built, query.root), label="root"),))
        rs.flush()
        held = hold(rs, sessions, built, query, variant)
        try:
            groups = data.draw(
                st.lists(genmap.groups(built), min_size=1, max_size=4), label="groups"
            )
            gap_after = data.draw(st.integers(0, len(groups) - 1)) if variant == "resync" else None
            for i, group in enumerate(groups):
                with one_batch(rs) if group.one_batch else nullcontext():
                    for writes in group.commits:
                        commit(sessions, built, writes)
                if i == gap_after:
                    rs.dispatcher.gap("test")
                catch_up(rs, held)
                expected = fresh(sessions, held.statement, many=held.many)
                got, want = (
                    snapshot(held.value, order=held.order),
                    snapshot(expected, order=held.order),
                )
                assert not differences(got, want), (f"after group {i}", differences(got, want))
        finally:
            if held.sub is not None:
                held.sub.close()
            if held.live is not None:
                held.live.close()


def hold(
    rs: rowsync.RowSync,
    sessions: sessionmaker[Session],
    built: genmap.Built,
    query: genmap.Query,
    variant: str,
) -> Held:
    statement = genmap.statement(built, query)
    note(f"statement: {statement}")
    assocs = genmap.assocs(built, query.root, query.loads)
    note(f"assocs: {assocs}")
    model = built.classes[query.root]
    order = tuple(o.column for o in query.order)
    if variant == "live":
        live = rs.live(sessions, statement, idle_timeout=None)
        return Held(statement, True, order, live.value, live=live)
    if variant == "load":
        with sessions() as session:
            roots, loaded = rs.load(session, statement)
        return Held(statement, True, order, roots, sub=loaded)
    many = not query.one
    value = fresh(sessions, statement, many=many)
    preloads = {cls: assocs for cls in built.classes.values() if issubclass(cls, model)}
    sub = rs.subscribe(value, assocs=assocs)
    if many:
        sub.add(model, "inserted", follow=True, assocs=assocs)
    return Held(statement, many, order, value, sub=sub, preloads=preloads)


def catch_up(rs: rowsync.RowSync, held: Held) -> None:
    """Wait for the listener, then apply every message (resyncing when told to)."""
    if held.live is not None:
        rs.flush()
        held.live.flush()
        held.value = held.live.value
        return
    assert held.sub is not None
    rs.flush()
    for message in held.sub.drain():
        if message[0] is rowsync.Resync:
            held.value = rs.resync(held.value)
        else:
            held.value = rs.sync(held.value, message, held.preloads)


# -- the tests -----------------------------------------------------------------------


@budget(EXAMPLES)
@given(data=st.data())
def test_a_synced_tree_equals_a_fresh_query_on_any_mapping(moded_engine, capture, data):
    variant = data.draw(st.sampled_from(["tree", "single", "load"]), label="variant")
    check(moded_engine, data, working(variant), variant, capture=capture)


@budget(EXAMPLES)
@given(data=st.data())
def test_a_live_query_equals_a_fresh_query_on_any_mapping(engine, data):
    check(engine, data, working("live"), "live")


@budget(EXAMPLES)
@given(data=st.data())
def test_a_tree_resynced_after_a_gap_keeps_equal_to_a_fresh_query(engine, data):
    check(engine, data, working("resync"), "resync")


@pytest.mark.parametrize(
    "feature",
    [
        pytest.param(
            f,
            id=f"{f}-broken",
            marks=pytest.mark.skip(reason=f"{why}; not reproduced here, see {ELSEWHERE[f]}")
            if f in ELSEWHERE
            else pytest.mark.xfail(strict=True, reason=why),
        )
        for f, why in BROKEN.items()
    ],
)
def test_a_known_broken_feature_still_fails(engine, feature):
    """When this passes (XPASS fails the run), the fix is in: remove ``feature`` from BROKEN."""

    # A seed of its own: with the same seed every feature would draw the same examples.
    @seed(zlib.crc32(feature.encode()))
    @budget(GATED_EXAMPLES, shrink=False, seeded=not SOAK)  # it stops at the first failure
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        name, _, only = feature.partition("@")
        variants = [only] if only else ["load"] if name == "filtered_roots" else VARIANTS
        variant = data.draw(st.sampled_from(variants), label="variant")
        check(engine, data, working(variant), variant, required=(name,))

    run()
