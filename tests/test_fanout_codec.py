"""The fan-out codec: what a node decodes is what the capture node encoded, types included,
in messages the broker accepts; what cannot travel says so instead of vanishing."""

from __future__ import annotations

import datetime
import decimal
import enum
import ipaddress
import json
import uuid
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa
from psycopg.types.range import Range

from rowsync.cache import CachedRow
from rowsync.columns import ColumnPolicy
from rowsync.dispatch import Resolved
from rowsync.fanout.codec import Codec, Envelope, Gap, Started
from rowsync.listener import Flush


class Mood(enum.Enum):
    HAPPY = "h"
    SAD = "s"


VALUES: dict[str, Any] = {
    "text": "héllo ✓",
    "int": 2**70,
    "float": 1.5,
    "negative_zero": -0.0,
    "bool": True,
    "none": None,
    "uuid": uuid.UUID(int=7),
    "naive": datetime.datetime(2024, 2, 29, 23, 59, 59, 999999),
    "aware": datetime.datetime(
        2024, 1, 1, 12, tzinfo=datetime.timezone(datetime.timedelta(hours=-3))
    ),
    "date": datetime.date(1, 1, 1),
    "time": datetime.time(8, 30, 1, 5),
    "interval": datetime.timedelta(days=-2, seconds=5, microseconds=7),
    "decimal": decimal.Decimal("-12345678901234567890.000000001"),
    "bytes": b"\x00\xffbinary",
    "address": ipaddress.ip_address("2001:db8::1"),
    "interface": ipaddress.ip_interface("10.0.0.1/8"),
    "network": ipaddress.ip_network("192.168.0.0/16"),
    "range": Range(datetime.date(2024, 1, 1), None, "[)"),
    "empty_range": Range(empty=True),
    "array": [1, None, [2, 3]],
    "uuids": [uuid.UUID(int=1), uuid.UUID(int=2)],
    "tuple": (1, "a"),
    "doc": {"$t": "uuid", "v": "not a tag: a JSON document's own keys", "n": [{"$t": 1}]},
    "mood": Mood.SAD,
    "moods": [Mood.HAPPY, None, Mood.SAD],
}

metadata = sa.MetaData()
things = sa.Table(
    "things",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key", sa.Uuid),
    sa.Column("mood", sa.Enum(Mood)),
    sa.Column("moods", sa.ARRAY(sa.Enum(Mood))),
    sa.Column("api_token", sa.Text),
    *(sa.Column(name, sa.JSON) for name in VALUES if name not in ("mood", "moods")),
    schema="app",
)
"""A column for each value (the codec carries its types, the column's type aside from
enums does not matter), and one whose name says it is sensitive."""
TABLES = {("app", "things"): things}


def change(**row: Any) -> Resolved:
    return Resolved(
        ref=42,
        table=("app", "things"),
        event="updated",
        new={"id": 1, "key": uuid.UUID(int=3)},
        old={"id": 1, "key": uuid.UUID(int=4)},
        origin="web-1",
        row=CachedRow(row, frozenset({"criterion"}), {"id": 1, "key": uuid.UUID(int=4)}),
    )


CRITERIA = {"criterion": "app.Thing.good_things"}


def roundtrip(items: list[Any], limit: int = 1 << 20) -> tuple[list[Envelope], Counter[str]]:
    stats: Counter[str] = Counter()
    codec = Codec(TABLES, stats, CRITERIA)
    messages = codec.encode(7, 10, items, limit)
    assert all(len(m) <= limit for m in messages)
    return [codec.decode(m) for m in messages], stats


def test_every_item_kind_comes_back_equal_with_its_values_types() -> None:
    truncated = Gap("TRUNCATE", (("app", "things"),))  # for the subscriptions they concern
    items = [Started(resumed=False), change(**VALUES), Flush("tok"), Gap("why"), truncated]
    (envelope,), stats = roundtrip(items)
    assert envelope == Envelope(7, 10, items)
    row = envelope.items[1].row
    assert {k: type(v) for k, v in row.values.items()} == {k: type(v) for k, v in VALUES.items()}
    assert row.values["aware"].utcoffset() == datetime.timedelta(hours=-3)
    assert not stats


def test_a_delete_and_a_row_gone_before_its_fetch_travel_without_a_row() -> None:
    deleted = Resolved(1, ("app", "things"), "deleted", {"id": 1}, None, None)
    gone = Resolved(2, ("app", "things"), "inserted", {"id": 2}, None, None)
    (envelope,), _ = roundtrip([deleted, gone])
    assert envelope.items == [deleted, gone]


def test_a_big_batch_is_split_into_numbered_messages_in_order() -> None:
    items = [change(id=i, text="x" * 100) for i in range(100)]
    envelopes, _ = roundtrip(items, limit=2000)
    assert len(envelopes) > 5
    assert [e.seq for e in envelopes] == list(range(10, 10 + len(envelopes)))
    assert [i for e in envelopes for i in e.items] == items


def test_a_value_that_cannot_travel_makes_its_change_unreadable_and_is_counted() -> None:
    (envelope,), stats = roundtrip([change(id=1, weird=object()), change(id=2)])
    unreadable, fine = envelope.items
    assert (unreadable.readable, unreadable.row, unreadable.new) == (False, None, change().new)
    assert fine == change(id=2)
    assert stats == {"unencodable": 1}


def test_a_row_over_the_brokers_limit_makes_its_change_unreadable_and_is_counted() -> None:
    (envelope,), stats = roundtrip([change(id=1, text="x" * 5000)], limit=1000)
    assert (envelope.items[0].readable, envelope.items[0].row) == (False, None)
    assert stats == {"oversized": 1}


def test_criteria_travel_under_names_every_process_agrees_on() -> None:
    """Each process numbers its relationships' criteria in an order of its own."""
    here = Codec(TABLES, Counter(), {"rowsync_c1": "app.Thing.good_things"})
    there = Codec(TABLES, Counter(), {"rowsync_c7": "app.Thing.good_things"})
    row = CachedRow({"id": 1}, frozenset({"rowsync_c1"}))
    sent = Resolved(1, ("app", "things"), "inserted", {"id": 1}, None, None, row)
    (message,) = here.encode(1, 0, [sent], 1 << 20)
    assert there.decode(message).items[0].row == CachedRow({"id": 1}, frozenset({"rowsync_c7"}))


def test_a_change_of_a_table_this_node_does_not_watch_is_skipped_and_counted() -> None:
    stats: Counter[str] = Counter()
    other = Resolved(1, ("app", "other"), "deleted", {"id": 1}, None, None)
    (message,) = Codec({("app", "other"): things}, Counter()).encode(1, 0, [other], 1 << 20)
    assert Codec(TABLES, stats).decode(message).items == []
    assert stats == {"unwatched": 1}


def test_a_decoded_row_keeps_only_the_columns_the_receiving_node_reads() -> None:
    """Whatever the sender read (here it allows ``api_token`` and reads ``text``), and
    whatever a message carries besides: the receiver's own policy decides."""
    sender = Codec(TABLES, Counter(), CRITERIA, ColumnPolicy(allow={things: ["api_token"]}))
    stats: Counter[str] = Counter()
    receiver = Codec(TABLES, stats, CRITERIA, ColumnPolicy(exclude={things: ["text"]}))
    sent = change(id=1, text="excluded", api_token="sensitive", unknown=1, int=2)
    (message,) = sender.encode(1, 0, [sent], 1 << 20)
    (received,) = receiver.decode(message).items
    assert received.row.values == {"id": 1, "int": 2}
    assert received.row.old == sent.row.old and received.new == sent.new
    assert stats == {"withheld": 1}


@pytest.mark.parametrize(
    "message",
    [
        b"\x00 not json",
        b"[]",
        json.dumps({"v": 2, "term": 1, "seq": 0, "items": []}).encode(),
        json.dumps({"v": 1, "term": "1", "seq": 0, "items": []}).encode(),
        json.dumps({"v": 1, "term": 1, "seq": 0, "items": [{"k": "?"}]}).encode(),
        json.dumps({"v": 1, "term": 1, "seq": 0, "items": [{"k": "c", "r": 1}]}).encode(),
        json.dumps({"v": 1, "term": 1, "seq": 0, "items": [{"$t": "pickle", "v": ""}]}).encode(),
    ],
)
def test_anything_but_a_message_of_ours_is_a_value_error(message: bytes) -> None:
    with pytest.raises(ValueError):
        Codec(TABLES, Counter()).decode(message)
