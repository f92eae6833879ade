import pytest
import sqlalchemy as sa
from sqlalchemy.orm import joinedload, selectinload
from fixtures import apply_all, messages, sync_each
from models import Person, Post, PostTag, Tag, Label, posts_labels, Profile, favourite_people
from oracle import fresh, snapshot

L = [selectinload, joinedload]

@pytest.mark.parametrize("rev", [False, True])
@pytest.mark.parametrize("loader", L)
def test_cycle(rs, sessions, write, loader, rev):
    write(Person(id=1, name="a"), Person(id=2, name="b"), Person(id=3, name="c"), Tag(id=1, name="x"),
          Post(id=10, name="test", person_id=1), Post(id=11, name="p", person_id=2), PostTag(post_id=10, tag_id=1))
    rs.flush()
    query = sa.select(Post).order_by(Post.id).options(loader(Post.person).options(loader(Person.posts).options(loader(Post.tags))))
    posts = fresh(sessions, query)
    sub = rs.subscribe(posts, assocs=[{"person": [{"posts": ["tags"]}]}]).add(Post, "inserted")
    write(sa.update(Post).where(Post.id == 11).values(person_id=1))
    write(Post(id=12, name="n", person_id=3), PostTag(post_id=12, tag_id=1))
    write(sa.update(Post).where(Post.id == 10).values(person_id=3))
    write(sa.delete(Person).where(Person.id == 1))
    write(sa.update(Tag).values(name="y"))
    msgs = messages(rs, sub)
    if rev: msgs = msgs[::-1]
    posts = sync_each(rs, posts, msgs)
    from zz_ddiff import ddiff
    d = ddiff(snapshot(posts), snapshot(fresh(sessions, query)))
    assert not d, "\n".join(d)
