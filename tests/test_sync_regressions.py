"""Shrunk failures of the convergence oracle (tests/test_convergence.py), kept as plain tests."""

import sqlalchemy as sa
from sqlalchemy.orm import joinedload, selectinload

from fixtures import apply_all
from models import Person, Post, PostTag, Profile, Tag
from oracle import fresh, snapshot

PERSON_1 = (
    sa.select(Person)
    .where(Person.id == 1)
    .options(selectinload(Person.posts).selectinload(Post.test_tags), selectinload(Person.profile))
)
PERSON_1_ASSOCS = [{"posts": ["test_tags"]}, "profile"]


def test_a_deleted_root_stops_hearing_about_what_it_held(rs, sessions, write):
    """Once person 1 is gone, a link added to its former post must not become a root."""
    write(Person(id=1), Tag(id=1, name="test"), Post(id=10, person_id=1))
    person = fresh(sessions, PERSON_1, many=False)
    sub = rs.subscribe(person, assocs=PERSON_1_ASSOCS)

    write(sa.delete(Person).where(Person.id == 1))
    person = apply_all(rs, sub, person)
    assert person is None
    write(PostTag(post_id=10, tag_id=1))
    rs.flush()
    assert sub.drain() == []


def test_a_deleted_root_that_comes_back_is_synced_back(rs, sessions, write):
    """A query for person 1 returns it again once re-inserted; so does the synced tree."""
    write(Person(id=1, name="a"))
    person = fresh(sessions, PERSON_1, many=False)
    sub = rs.subscribe(person, assocs=PERSON_1_ASSOCS)

    write(sa.delete(Person).where(Person.id == 1))
    write(Person(id=1, name="again"), Post(id=10, person_id=1))
    rs.flush()
    for message in sub.drain():
        person = rs.sync(person, message, preloads={Person: PERSON_1_ASSOCS})

    assert snapshot(person) == snapshot(fresh(sessions, PERSON_1, many=False))


def test_a_new_parent_is_loaded_as_its_place_says_not_as_its_siblings_are(rs, sessions, write):
    """other_person is loaded without profile even when post.person (same post) has one."""
    write(
        Person(id=1),
        Person(id=2),
        Profile(id=1, person_id=1),
        Profile(id=2, person_id=2),
        Post(id=5, person_id=1, other_id=1),
    )
    query = sa.select(Post).options(
        joinedload(Post.person).joinedload(Person.profile), joinedload(Post.other_person)
    )
    posts = fresh(sessions, query)
    sub = rs.subscribe(posts, assocs=[{"person": ["profile"]}, "other_person"])

    write(sa.update(Post).values(other_id=2))
    posts = apply_all(rs, sub, posts)

    assert snapshot(posts) == snapshot(fresh(sessions, query))
    assert "profile" not in sa.inspect(posts[0].other_person).dict


def test_rows_inserted_into_a_followed_root_list_keep_being_synced(rs, sessions, write):
    query = sa.select(Post).options(joinedload(Post.person))
    posts = fresh(sessions, query)
    sub = rs.subscribe(posts, assocs=["person"]).add(
        Post, "inserted", follow=True, assocs=["person"]
    )

    write(Person(id=1, name="a"), Post(id=1, name="new", person_id=1))
    posts = apply_all(rs, sub, posts, preloads={Post: ["person"]})
    write(sa.update(Post).values(name="renamed"), sa.update(Person).values(name="b"))
    posts = apply_all(rs, sub, posts, preloads={Post: ["person"]})

    assert (posts[0].name, posts[0].person.name) == ("renamed", "b")
    assert snapshot(posts) == snapshot(fresh(sessions, query))
