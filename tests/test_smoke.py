"""End to end in one test: a tree loaded, three commits elsewhere, the synced tree equals a
fresh query."""

import sqlalchemy as sa
from sqlalchemy.orm import selectinload

from fixtures import apply_all
from models import Person, Post, PostTag, Tag
from oracle import fresh, snapshot


def test_tree_follows_inserts_links_and_updates(rs, sessions, write):
    write(Person(id=1, name="a"), Tag(id=1, name="t"))
    query = sa.select(Person).options(
        selectinload(Person.posts).selectinload(Post.tags),
        selectinload(Person.test_posts),
        selectinload(Person.all_tags),
    )
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=[{"posts": ["tags"]}, "test_posts", "all_tags"])

    write(Post(id=10, name="test", person_id=1))
    write(PostTag(post_id=10, tag_id=1))
    write(sa.update(Tag).values(name="renamed"))
    people = apply_all(rs, sub, people)

    assert snapshot(people) == snapshot(fresh(sessions, query))
    assert [t.name for t in people[0].posts[0].tags] == ["renamed"]
