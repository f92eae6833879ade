"""Fuzzing the listener with payloads anyone could NOTIFY on rowsync's channel: nothing
crashes it, nothing garbage reaches a subscriber, and real events keep flowing."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rowsync
from models import Post
from rowsync.listener import Flush, Notice, parse

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
# Payloads shaped like rowsync's own, with every field possibly wrong.
EVENTS = st.fixed_dictionaries(
    {},
    optional={
        "r": st.integers() | JSON,
        "s": st.just("public") | JSON,
        "t": st.sampled_from(["posts", "persons", "nope"]) | JSON,
        "e": st.sampled_from(["i", "u", "d", "x"]) | JSON,
        "n": st.fixed_dictionaries({}, optional={"id": st.integers(-5, 5) | JSON}) | JSON,
        "o": st.none() | JSON,
        "l": st.none() | JSON,
        "g": st.none() | JSON,
        "x": st.booleans() | JSON,
        "f": JSON,
    },
)
PAYLOADS = st.text(max_size=200) | EVENTS.map(json.dumps) | JSON.map(json.dumps)


@pytest.fixture
def rs_for_fuzz(moded, write):
    """One listener for every example: it must survive them all. In every capture mode: the
    change log's and the WAL's listeners hear the channel too (for wake-ups and barriers)."""
    write.counter = 1000
    return moded, moded.subscribe(Post), write


@settings(max_examples=500)
@given(PAYLOADS)
def test_parse_returns_an_event_or_raises_value_error(payload: str) -> None:
    try:
        parsed = parse(payload)
    except ValueError:  # json.JSONDecodeError included; never TypeError or worse
        return
    assert isinstance(parsed, Notice | Flush | dict)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(PAYLOADS.filter(lambda p: "\x00" not in p and len(p.encode()) < 7000), max_size=20))
def test_random_notifications_never_stop_real_events(rs_for_fuzz, payloads: list[str]) -> None:
    rs, sub, write = rs_for_fuzz
    with rs.connect(autocommit=True) as conn:
        for payload in payloads:
            conn.execute("SELECT pg_notify(%s, %s)", (rs.channel, payload))
    rs.flush()
    write.counter += 1
    write(Post(id=write.counter, name="real"))
    rs.flush()
    messages = sub.drain()
    assert rs.listener.is_alive()
    assert rs.stats["fetch_errors"] == 0  # forged keys never reach a query
    real = [m for m in messages if m[0] is rowsync.Sync]
    assert real and real[-1][1].ids["id"] == write.counter
    for _, change in real:  # garbage never comes out as a change of a real row...
        assert change.model is Post and isinstance(change.ids["id"], int)
    # ...except what is indistinguishable from one: a well-formed event for a watched table.
