"""Watchers: which tables and events a model and its assocs need (SCENARIOS 1, 2 and 6)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import rowsync
from fixtures import reference_watchers
from models import Label, Person, Post, PostTag, Profile, Tag, posts_labels
from oracle import fresh
from rowsync import ConfigurationError, RowSync, Sync
from rowsync.watchers import merge

OFFLINE = "postgresql://rowsync@127.0.0.1:1/never_connected"
"""Configuration is checked before any connection: these tests need no database."""


def offline(ws: list[rowsync.Watcher] | None = None) -> RowSync:
    return RowSync(OFFLINE, reference_watchers() if ws is None else ws)


def tables(ws: list[rowsync.Watcher]) -> dict[str, set[str]]:
    """Table name -> events watched on it."""
    result: dict[str, set[str]] = {}
    for w in ws:
        result.setdefault(w.table, set()).add(w.event)
    return result


def columns(ws: list[rowsync.Watcher]) -> dict[str, tuple[str, ...]]:
    return {w.table: w.columns for w in ws}


ALL_EVENTS = {"inserted", "updated", "deleted"}


# -- scenario 1 ------------------------------------------------------------------------


def test_model_watchers_cover_its_table_for_every_event() -> None:
    ws = rowsync.watchers(Post)

    assert [(w.schema, w.table, w.event) for w in ws] == [
        ("public", "posts", "inserted"),
        ("public", "posts", "updated"),
        ("public", "posts", "deleted"),
    ]
    assert all(w.model is Post and w.label is None for w in ws)


def test_model_watchers_identify_rows_by_primary_key_then_join_columns() -> None:
    ws = rowsync.watchers(Post)

    assert {w.primary_key for w in ws} == {("id",)}
    assert {w.columns for w in ws} == {("id", "other_id", "person_id")}


def test_assocs_add_every_table_reached_with_the_key_columns_each_needs() -> None:
    ws = rowsync.watchers(Person, ["profile", {"posts": ["tags", "labels"]}])

    assert tables(ws) == {
        name: ALL_EVENTS
        for name in ("persons", "profiles", "posts", "post_tags", "tags", "posts_labels", "labels")
    }
    assert columns(ws) == {
        "persons": ("id",),
        "profiles": ("id", "person_id"),
        "posts": ("id", "other_id", "person_id"),
        "post_tags": ("post_id", "tag_id"),
        "tags": ("id",),
        "posts_labels": ("post_id", "label_id"),
        "labels": ("id",),
    }


def test_nested_assocs_are_followed_only_where_named() -> None:
    shallow = rowsync.watchers(Person, ["posts"])
    nested = rowsync.watchers(Person, [{"posts": [{"tags": []}]}])

    assert set(tables(shallow)) == {"persons", "posts"}
    assert set(tables(nested)) == {"persons", "posts", "post_tags", "tags"}


def test_watchers_name_the_model_of_each_table_and_the_table_itself_when_unmapped() -> None:
    ws = rowsync.watchers(Post, ["tags", "labels"])
    models = {w.table: w.model for w in ws}

    assert models == {
        "posts": Post,
        "post_tags": PostTag,
        "tags": Tag,
        "posts_labels": posts_labels,
        "labels": Label,
    }


def test_extra_columns_join_the_identifying_columns_of_the_model_only() -> None:
    ws = rowsync.watchers(Person, ["posts"], extra_columns=["name"])
    by_post = rowsync.watchers(Post, extra_columns=[Post.name, Post.__table__.c.body])

    assert columns(ws) == {"persons": ("id", "name"), "posts": ("id", "other_id", "person_id")}
    assert {w.columns for w in by_post} == {("id", "other_id", "person_id", "name", "body")}


def test_events_and_label_narrow_and_tag_the_watchers() -> None:
    ws = rowsync.watchers(Post, ["tags"], events=["inserted"], label="feed")

    assert {(w.table, w.event, w.label) for w in ws} == {
        ("posts", "inserted", "feed"),
        ("post_tags", "inserted", "feed"),
        ("tags", "inserted", "feed"),
    }


def test_merge_keeps_one_watcher_per_trigger_with_the_union_of_columns() -> None:
    merged = merge(
        rowsync.watchers(Post)
        + rowsync.watchers(Post, extra_columns=["name"])
        + rowsync.watchers(Tag)
    )

    assert len(merged) == 6
    assert {w.columns for w in merged if w.table == "posts"} == {
        ("id", "other_id", "person_id", "name")
    }


# -- scenario 2 ------------------------------------------------------------------------


def test_through_relationship_is_accepted_and_watches_every_table_on_its_path() -> None:
    ws = rowsync.watchers(Person, ["all_tags"])

    assert tables(ws) == {name: ALL_EVENTS for name in ("persons", "posts", "post_tags", "tags")}
    assert columns(ws)["posts"] == ("id", "other_id", "person_id")


def test_one_to_one_relationship_is_accepted_and_watches_the_related_table() -> None:
    ws = rowsync.watchers(Person, ["profile"])

    assert tables(ws) == {"persons": ALL_EVENTS, "profiles": ALL_EVENTS}
    assert columns(ws)["profiles"] == ("id", "person_id")
    assert {w.model for w in ws if w.table == "profiles"} == {Profile}


def test_association_proxy_stands_for_the_relationships_it_spans() -> None:
    ws = rowsync.watchers(Post, ["tag_names"])

    assert set(tables(ws)) == {"posts", "post_tags", "tags"}


def test_through_and_one_to_one_subscriptions_deliver_their_changes(
    schema, sessions, write
) -> None:
    """Accepted is not enough: a subscription following them receives their rows' changes."""
    write(Person(id=1, name="p"), Tag(id=1, name="t"), Post(id=10, person_id=1))
    rs = RowSync(schema, rowsync.watchers(Person, ["all_tags", "profile"]))
    rs.install()
    query = sa.select(Person).where(Person.id == 1)
    with rs:
        person = fresh(sessions, query)[0]
        sub = rs.subscribe(person, assocs=["all_tags", "profile"])

        write(Profile(id=5, person_id=1, bio="hi"))
        write(PostTag(post_id=10, tag_id=1))
        rs.flush()
        messages = sub.drain()

    assert all(kind is Sync for kind, _ in messages)
    changes = [change for _, change in messages]
    assert {(c.model, c.event) for c in changes} >= {(Profile, "inserted"), (PostTag, "inserted")}
    profile = next(c for c in changes if c.model is Profile)
    assert profile.ids == {"id": 5, "person_id": 1}


# -- scenario 6 ------------------------------------------------------------------------


def test_unknown_assoc_name_raises_a_clear_error_naming_the_known_ones() -> None:
    with pytest.raises(
        ConfigurationError, match=r"Person has no relationship 'postz'.*known: .*posts"
    ):
        rowsync.watchers(Person, ["postz"])


def test_unknown_nested_assoc_name_names_the_model_it_was_looked_up_on() -> None:
    with pytest.raises(ConfigurationError, match=r"Post has no relationship 'tagz'"):
        rowsync.watchers(Person, [{"posts": ["tagz"]}])


@pytest.mark.parametrize(
    "target",
    [object, int, "Person", 42, Person(), sa.Table],
    ids=["object", "int", "name", "number", "instance", "Table-class"],
)
def test_something_that_is_not_a_mapped_class_raises_a_clear_error(target: object) -> None:
    with pytest.raises(ConfigurationError, match="is not a mapped SQLAlchemy class"):
        rowsync.watchers(target)  # type: ignore[arg-type]


def test_configuration_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        rowsync.watchers(Person, ["nope"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"assocs": [42]}, "assocs items are names or"),
        ({"extra_columns": ["nope"]}, "'posts' has no column 'nope'"),
        ({"extra_columns": [Person.name]}, "Person.name is not a column of Post"),
        ({"events": ["created"]}, r"unknown events \['created'\]"),
    ],
    ids=["assoc-item", "extra-name", "extra-other-model", "event"],
)
def test_bad_watcher_options_raise_a_clear_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        rowsync.watchers(Post, **kwargs)  # type: ignore[arg-type]


def test_rowsync_without_watchers_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="at least one watcher"):
        offline([])


def test_one_table_event_under_two_labels_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="two labels"):
        offline(rowsync.watchers(Post, label="a") + rowsync.watchers(Post, label="b"))


def test_subscribing_with_an_unknown_assoc_raises_a_clear_error() -> None:
    rs = offline()
    person = Person(id=1, name="p")

    with pytest.raises(ConfigurationError, match="Person has no relationship 'nope'"):
        rs.subscribe(person, assocs=["nope"])
    with pytest.raises(ConfigurationError, match="Post has no relationship 'nope'"):
        rs.subscribe(person, assocs=[{"posts": ["nope"]}])
    assert rs.subscriptions() == []


class NotMapped:
    id = 1


@pytest.mark.parametrize(
    "target", [NotMapped, NotMapped(), object(), 42], ids=["class", "instance", "object", "number"]
)
def test_subscribing_to_something_that_is_not_a_model_raises_a_clear_error(target: object) -> None:
    rs = offline()

    with pytest.raises(ConfigurationError, match="not a mapped"):
        rs.subscribe(target)


def test_subscribing_to_an_unwatched_model_says_how_to_watch_it() -> None:
    rs = offline(rowsync.watchers(Tag))

    with pytest.raises(
        ConfigurationError, match=r"'posts' is not watched; add rowsync.watchers\(Post\)"
    ):
        rs.subscribe(Post)


@pytest.mark.parametrize(
    ("args", "filters", "message"),
    [
        (("created",), {}, "unknown event 'created'"),
        ((), {"name": "x"}, r"cannot filter 'posts' on \['name'\]"),
    ],
    ids=["event", "filter"],
)
def test_bad_model_subscription_raises_a_clear_error(args, filters, message) -> None:
    rs = offline(rowsync.watchers(Post))

    with pytest.raises(ConfigurationError, match=message):
        rs.subscribe(Post, *args, **filters)


def test_event_filter_on_loaded_objects_is_a_configuration_error() -> None:
    rs = offline()

    with pytest.raises(ConfigurationError, match="go with a model, not with loaded objects"):
        rs.subscribe(Person(id=1), "updated")
