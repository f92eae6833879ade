"""sync walks a tree once, then keeps its index current through every change it applies, so
a message costs what it touches, not the size of the tree. What rowsync cannot see through
the index - the application appending to a collection by hand - makes the next sync walk the
tree again. (After every sync of the suite the kept index is also compared with a fresh walk:
tests/index_check.py.)"""

import sqlalchemy as sa
from sqlalchemy.orm import selectinload

from fixtures import apply_all
from models import Person, Post, PostTag, Tag
from oracle import fresh, snapshot

QUERY = sa.select(Person).order_by(Person.id).options(selectinload(Person.posts))


def test_updates_and_structural_changes_keep_the_index(rs, sessions, write):
    write(Person(id=1), Person(id=2), Post(id=10, person_id=1))
    people = fresh(sessions, QUERY)
    sub = rs.subscribe(people, assocs=["posts"])

    write(sa.update(Post).values(name="a"))
    people = apply_all(rs, sub, people)
    first = rs.syncer.index(people, people)
    write(sa.update(Post).values(name="b"))
    people = apply_all(rs, sub, people)
    assert rs.syncer.index(people, people) is first

    write(sa.update(Post).values(person_id=2), Post(id=11, person_id=1))
    write(sa.delete(Post).where(Post.id == 10))
    people = apply_all(rs, sub, people)
    assert rs.syncer.index(people, people) is first
    assert snapshot(people) == snapshot(fresh(sessions, QUERY))


def test_a_collection_changed_by_hand_is_seen_by_the_next_sync(rs, sessions, write):
    write(Person(id=1), Person(id=2), Post(id=10, person_id=1), Post(id=99, name="x"))
    people = fresh(sessions, QUERY)
    sub = rs.subscribe(people, assocs=["posts"])
    write(sa.update(Post).where(Post.id == 10).values(name="a"))
    people = apply_all(rs, sub, people)  # the index is built and cached

    # The application puts post 99 under person 1 itself (say, an optimistic UI update)...
    post_99 = fresh(sessions, sa.select(Post).where(Post.id == 99), many=False)
    people[0].posts.append(post_99)
    # ...then the database gives it to person 2: it must leave person 1's posts.
    write(sa.update(Post).where(Post.id == 99).values(person_id=2))
    people = apply_all(rs, sub, people)

    assert [p.id for p in people[0].posts] == [10]
    assert [p.id for p in people[1].posts] == [99]


def test_a_row_loaded_with_what_is_below_it_keeps_the_index(rs, sessions, write):
    """A new row that rowsync reads with its loader options (its tags, here) joins the kept
    index: reading it fires no event that would make every tree walk itself again."""
    query = (
        sa.select(Person)
        .order_by(Person.id)
        .options(selectinload(Person.posts).selectinload(Post.tags))
    )
    write(Person(id=1), Tag(id=5, name="t"), Post(id=10, person_id=1))
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=[{"posts": ["tags"]}])
    write(sa.update(Post).values(name="a"))
    people = apply_all(rs, sub, people)
    kept = rs.syncer.index(people, people)

    write(Post(id=11, person_id=1), PostTag(post_id=11, tag_id=5))
    people = apply_all(rs, sub, people)

    assert rs.syncer.index(people, people) is kept
    assert [t.id for t in people[0].posts[1].tags] == [5]
    assert snapshot(people) == snapshot(fresh(sessions, query))
