"""The web demo's database: created on the given server if missing, with the console demo's
schema and rows (some posts published, so the filtered list starts with something in it)."""

from __future__ import annotations

import sqlalchemy as sa
from demo import PEOPLE, POSTS, TAGS, demo_url
from demo_models import Base, Person, Post, Tag, post_tags

DATABASE = "rowsync_web_demo"
PUBLISHED = (1, 3, 4)  # seeded posts that start published


def prepare(server: str, database: str = DATABASE, *, reset: bool = False) -> sa.URL:
    """Create ``database`` on ``server``, its tables and rows when missing; return its URL."""
    url = demo_url(server, database)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        if reset:
            Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            if not conn.scalar(sa.select(sa.func.count()).select_from(Person)):
                restore(conn)
    finally:
        engine.dispose()
    return url


def restore(conn: sa.Connection) -> None:
    """Put the initial rows back under their initial ids. Deletes and inserts, not TRUNCATE:
    row triggers fire, so the pages see the reset as diffs like any other change."""
    conn.execute(sa.delete(Person))  # posts and their tag links cascade
    conn.execute(sa.delete(Tag))
    tag_ids = {name: number for number, name in enumerate(TAGS, 1)}
    conn.execute(sa.insert(Person), [{"id": n, "name": name} for n, name in enumerate(PEOPLE, 1)])
    conn.execute(sa.insert(Tag), [{"id": n, "name": name} for name, n in tag_ids.items()])
    posts = [
        {"id": n, "title": title, "person_id": author, "published": n in PUBLISHED}
        for n, (author, title, _) in enumerate(POSTS, 1)
    ]
    conn.execute(sa.insert(Post), posts)
    links = [
        {"post_id": n, "tag_id": tag_ids[name]}
        for n, (_, _, names) in enumerate(POSTS, 1)
        for name in names
    ]
    conn.execute(sa.insert(post_tags), links)
    for model in (Person, Post, Tag):
        sequence = sa.func.pg_get_serial_sequence(model.__tablename__, "id")
        conn.execute(sa.select(sa.func.setval(sequence, sa.func.max(model.id))))
