"""Scenarios 17 and 19: many-to-many through an association object (Post.tags via PostTag,
order_by Tag.id), through a plain table (Post.labels via posts_labels), and self-referential
(Person.favourite_people).

A related row deleted cascades to its links: two events whose order is up to Postgres.
EctoSync loops forever on one of the orders; here both orders give the fresh tree.
"""

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import joinedload, selectinload

from fixtures import messages, returning, sync_each
from models import Label, Person, Post, PostTag, Tag, favourite_people, posts_labels
from oracle import fresh, snapshot

LOADERS = [pytest.param(selectinload, id="selectin"), pytest.param(joinedload, id="joined")]
ORDERS = [pytest.param(False, id="delivered-order"), pytest.param(True, id="reversed-order")]


def synced(rs, sub, value, *, reverse=False):
    """Apply the queued messages (optionally in reverse), failing if sync never returns."""
    msgs = messages(rs, sub)
    if reverse:
        msgs = msgs[::-1]
    return returning(lambda: sync_each(rs, value, msgs))


@pytest.fixture
def tagged(rs, write):
    write(
        Post(id=10, name="p"),
        Post(id=11, name="q"),
        Tag(id=1, name="t1"),
        Tag(id=2, name="t2"),
        Tag(id=3, name="t3"),
        PostTag(post_id=10, tag_id=3),
        PostTag(post_id=10, tag_id=1),
        PostTag(post_id=11, tag_id=1),
        Label(id=1, name="l1"),
        Label(id=2, name="l2"),
        Label(id=3, name="l3"),
    )
    write(
        posts_labels.insert().values(
            [{"post_id": 10, "label_id": 1}, {"post_id": 11, "label_id": 1}]
        )
    )
    rs.flush()


def tags_query(loader):
    return sa.select(Post).order_by(Post.id).options(loader(Post.tags))


def labels_query(loader):
    return sa.select(Post).order_by(Post.id).options(loader(Post.labels))


# -- association object: Post.tags ---------------------------------------------------------


@pytest.mark.parametrize("loader", LOADERS)
def test_link_inserted_brings_the_tag_in_order_by_position(rs, sessions, write, tagged, loader):
    posts = fresh(sessions, tags_query(loader))
    sub = rs.subscribe(posts, assocs=["tags"])

    write(PostTag(post_id=10, tag_id=2))
    posts = synced(rs, sub, posts)

    assert [t.id for t in posts[0].tags] == [1, 2, 3]
    assert posts[0].tags[0] is posts[1].tags[0]  # tag 1, one instance as a session gives
    assert snapshot(posts) == snapshot(fresh(sessions, tags_query(loader)))


@pytest.mark.parametrize("loader", LOADERS)
def test_link_deleted_takes_the_tag_out(rs, sessions, write, tagged, loader):
    posts = fresh(sessions, tags_query(loader))
    sub = rs.subscribe(posts, assocs=["tags"])

    write(sa.delete(PostTag).where(PostTag.post_id == 10, PostTag.tag_id == 1))
    posts = synced(rs, sub, posts)

    assert [t.id for t in posts[0].tags] == [3]
    assert [t.id for t in posts[1].tags] == [1]
    assert snapshot(posts) == snapshot(fresh(sessions, tags_query(loader)))


@pytest.mark.parametrize("loader", LOADERS)
def test_linked_tag_updated_is_refreshed(rs, sessions, write, tagged, loader):
    posts = fresh(sessions, tags_query(loader))
    sub = rs.subscribe(posts, assocs=["tags"])

    write(sa.update(Tag).where(Tag.id == 1).values(name="renamed"))
    posts = synced(rs, sub, posts)

    assert posts[0].tags[0].name == posts[1].tags[0].name == "renamed"
    assert snapshot(posts) == snapshot(fresh(sessions, tags_query(loader)))


@pytest.mark.parametrize("reverse", ORDERS)
@pytest.mark.parametrize("loader", LOADERS)
def test_tag_deleted_with_its_links_cascading_leaves_in_either_order(
    rs, sessions, write, tagged, loader, reverse
):
    posts = fresh(sessions, tags_query(loader))
    sub = rs.subscribe(posts, assocs=["tags"])

    write(sa.delete(Tag).where(Tag.id == 1))
    msgs = messages(rs, sub)
    assert sorted((m[1].model.__name__, m[1].event) for m in msgs) == [
        ("PostTag", "deleted"),
        ("PostTag", "deleted"),
        ("Tag", "deleted"),
    ]
    ordered = msgs[::-1] if reverse else msgs
    posts = returning(lambda: sync_each(rs, posts, ordered))

    assert [t.id for t in posts[0].tags] == [3]
    assert posts[1].tags == []
    assert snapshot(posts) == snapshot(fresh(sessions, tags_query(loader)))


def test_cascade_order_both_orders_give_the_fresh_tree(rs, sessions, write, tagged):
    """Tag deleted, its post_tags links cascading: one tree gets the events as delivered,
    the other reversed; sync returns for both and both equal a fresh query."""
    query = (
        sa.select(Post)
        .order_by(Post.id)
        .options(selectinload(Post.tags), selectinload(Post.post_tags))
    )
    delivered = fresh(sessions, query)
    reversed_ = fresh(sessions, query)
    delivered_sub = rs.subscribe(delivered, assocs=["tags", "post_tags"])
    reversed_sub = rs.subscribe(reversed_, assocs=["tags", "post_tags"])

    write(sa.delete(Tag).where(Tag.id == 1))
    delivered = synced(rs, delivered_sub, delivered)
    reversed_ = synced(rs, reversed_sub, reversed_, reverse=True)

    expected = snapshot(fresh(sessions, query))
    assert snapshot(delivered) == expected
    assert snapshot(reversed_) == expected
    assert [(pt.post_id, pt.tag_id) for pt in delivered[0].post_tags] == [(10, 3)]


def test_post_deleted_takes_its_links_along(rs, sessions, write, tagged):
    query = sa.select(Tag).order_by(Tag.id)
    posts_query = tags_query(selectinload)
    posts = fresh(sessions, posts_query)
    sub = rs.subscribe(posts, assocs=["tags"])

    write(sa.delete(Post).where(Post.id == 10))
    posts = synced(rs, sub, posts)

    assert [p.id for p in posts] == [11]
    assert snapshot(posts) == snapshot(fresh(sessions, posts_query))
    assert len(fresh(sessions, query)) == 3


def test_link_inserted_to_a_new_tag_in_one_transaction(rs, sessions, write, tagged):
    posts = fresh(sessions, tags_query(selectinload))
    sub = rs.subscribe(posts, assocs=["tags"])

    write(Tag(id=4, name="t4"), PostTag(post_id=11, tag_id=4))
    posts = synced(rs, sub, posts)

    assert [t.id for t in posts[1].tags] == [1, 4]
    assert snapshot(posts) == snapshot(fresh(sessions, tags_query(selectinload)))


def test_link_moved_to_another_tag_swaps_the_tags(rs, sessions, write, tagged):
    posts = fresh(sessions, tags_query(selectinload))
    sub = rs.subscribe(posts, assocs=["tags"])

    write(sa.update(PostTag).where(PostTag.post_id == 11, PostTag.tag_id == 1).values(tag_id=2))
    posts = synced(rs, sub, posts)

    assert [t.id for t in posts[1].tags] == [2]
    assert snapshot(posts) == snapshot(fresh(sessions, tags_query(selectinload)))


def test_association_object_collection_follows_its_rows(rs, sessions, write, tagged):
    query = (
        sa.select(Post)
        .order_by(Post.id)
        .options(selectinload(Post.post_tags).selectinload(PostTag.tag))
    )
    posts = fresh(sessions, query)
    sub = rs.subscribe(posts, assocs=[{"post_tags": ["tag"]}])

    write(PostTag(post_id=11, tag_id=2))
    write(sa.update(Tag).where(Tag.id == 2).values(name="renamed"))
    write(sa.delete(PostTag).where(PostTag.post_id == 10, PostTag.tag_id == 3))
    posts = synced(rs, sub, posts)

    assert sorted((pt.tag_id, pt.tag.name) for pt in posts[1].post_tags) == [
        (1, "t1"),
        (2, "renamed"),
    ]
    assert snapshot(posts) == snapshot(fresh(sessions, query))


# -- plain association table: Post.labels ---------------------------------------------------


@pytest.mark.parametrize("loader", LOADERS)
def test_plain_table_link_inserted_brings_the_label(rs, sessions, write, tagged, loader):
    posts = fresh(sessions, labels_query(loader))
    sub = rs.subscribe(posts, assocs=["labels"])

    write(posts_labels.insert().values(post_id=10, label_id=2))
    posts = synced(rs, sub, posts)

    assert sorted(label.id for label in posts[0].labels) == [1, 2]
    assert snapshot(posts) == snapshot(fresh(sessions, labels_query(loader)))


@pytest.mark.parametrize("loader", LOADERS)
def test_plain_table_link_deleted_takes_the_label_out(rs, sessions, write, tagged, loader):
    posts = fresh(sessions, labels_query(loader))
    sub = rs.subscribe(posts, assocs=["labels"])

    write(posts_labels.delete().where(posts_labels.c.post_id == 10))
    posts = synced(rs, sub, posts)

    assert posts[0].labels == []
    assert [label.id for label in posts[1].labels] == [1]
    assert snapshot(posts) == snapshot(fresh(sessions, labels_query(loader)))


@pytest.mark.parametrize("loader", LOADERS)
def test_plain_table_linked_label_updated_is_refreshed(rs, sessions, write, tagged, loader):
    posts = fresh(sessions, labels_query(loader))
    sub = rs.subscribe(posts, assocs=["labels"])

    write(sa.update(Label).where(Label.id == 1).values(name="renamed"))
    posts = synced(rs, sub, posts)

    assert posts[0].labels[0].name == posts[1].labels[0].name == "renamed"
    assert snapshot(posts) == snapshot(fresh(sessions, labels_query(loader)))


@pytest.mark.parametrize("reverse", ORDERS)
@pytest.mark.parametrize("loader", LOADERS)
def test_plain_table_label_deleted_with_links_cascading_leaves_in_either_order(
    rs, sessions, write, tagged, loader, reverse
):
    write(posts_labels.insert().values(post_id=10, label_id=2))
    rs.flush()
    posts = fresh(sessions, labels_query(loader))
    sub = rs.subscribe(posts, assocs=["labels"])

    write(sa.delete(Label).where(Label.id == 1))
    msgs = messages(rs, sub)
    assert len(msgs) == 3  # the label and its two links
    ordered = msgs[::-1] if reverse else msgs
    posts = returning(lambda: sync_each(rs, posts, ordered))

    assert [label.id for label in posts[0].labels] == [2]
    assert posts[1].labels == []
    assert snapshot(posts) == snapshot(fresh(sessions, labels_query(loader)))


# -- self-referential: Person.favourite_people ---------------------------------------------


@pytest.fixture
def friends(rs, write):
    write(Person(id=1, name="a"), Person(id=2, name="b"), Person(id=3, name="c"))
    write(
        favourite_people.insert().values(
            [{"person_id": 1, "favourite_id": 2}, {"person_id": 2, "favourite_id": 1}]
        )
    )
    rs.flush()


def favourites_query(loader=selectinload):
    return sa.select(Person).order_by(Person.id).options(loader(Person.favourite_people))


@pytest.mark.parametrize("loader", LOADERS)
def test_self_referential_link_inserted_and_deleted(rs, sessions, write, friends, loader):
    people = fresh(sessions, favourites_query(loader))
    sub = rs.subscribe(people, assocs=["favourite_people"])

    write(favourite_people.insert().values(person_id=1, favourite_id=3))
    write(favourite_people.insert().values(person_id=3, favourite_id=3))  # oneself
    write(favourite_people.delete().where(favourite_people.c.person_id == 2))
    people = synced(rs, sub, people)

    assert [sorted(f.id for f in p.favourite_people) for p in people] == [[2, 3], [], [3]]
    assert people[2].favourite_people[0] is people[2]  # the root itself, as a session gives
    assert snapshot(people) == snapshot(fresh(sessions, favourites_query(loader)))


def test_self_referential_favourite_updated_is_refreshed_everywhere(rs, sessions, write, friends):
    people = fresh(sessions, favourites_query())
    sub = rs.subscribe(people, assocs=["favourite_people"])

    write(sa.update(Person).where(Person.id == 2).values(name="renamed"))
    people = synced(rs, sub, people)

    assert people[1].name == people[0].favourite_people[0].name == "renamed"
    assert snapshot(people) == snapshot(fresh(sessions, favourites_query()))


@pytest.mark.parametrize("reverse", ORDERS)
def test_self_referential_person_deleted_leaves_roots_and_favourites(
    rs, sessions, write, friends, reverse
):
    people = fresh(sessions, favourites_query())
    sub = rs.subscribe(people, assocs=["favourite_people"])

    write(sa.delete(Person).where(Person.id == 2))
    people = synced(rs, sub, people, reverse=reverse)

    assert [p.id for p in people] == [1, 3]
    assert people[0].favourite_people == []
    assert snapshot(people) == snapshot(fresh(sessions, favourites_query()))


def test_self_referential_nested_two_levels(rs, sessions, write, friends):
    query = (
        sa.select(Person)
        .where(Person.id == 1)
        .options(selectinload(Person.favourite_people).selectinload(Person.favourite_people))
    )
    person = fresh(sessions, query, many=False)
    sub = rs.subscribe(person, assocs=[{"favourite_people": ["favourite_people"]}])

    write(favourite_people.insert().values(person_id=2, favourite_id=3))
    write(favourite_people.insert().values(person_id=1, favourite_id=3))
    person = synced(rs, sub, person)

    assert snapshot(person) == snapshot(fresh(sessions, query, many=False))
