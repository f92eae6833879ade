"""The web demo's database: created on the given server if missing, with the console demo's
schema and rows (some posts published, so the filtered list starts with something in it)."""

from __future__ import annotations

import sqlalchemy as sa
from demo import create_schema, demo_url
from demo_models import Person, Post

DATABASE = "rowsync_web_demo"
PUBLISHED = (1, 3, 4)  # seeded posts that start published


def prepare(server: str, database: str = DATABASE, *, reset: bool = False) -> sa.URL:
    """Create ``database`` on ``server``, its tables and rows when missing; return its URL."""
    url = demo_url(server, database)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        seeding = reset or _empty(engine)
        create_schema(engine, reset=reset)
        if seeding:
            with engine.begin() as conn:
                conn.execute(sa.update(Post).where(Post.id.in_(PUBLISHED)).values(published=True))
    finally:
        engine.dispose()
    return url


def _empty(engine: sa.Engine) -> bool:
    if not sa.inspect(engine).has_table(Person.__tablename__):
        return True
    with engine.connect() as conn:
        return not conn.scalar(sa.select(sa.func.count()).select_from(Person))
