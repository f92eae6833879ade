"""The schema the database benchmarks share: people and their posts.

``schema(suffix)`` declares it afresh in a registry of its own, on tables ``persons<suffix>``
and ``posts<suffix>``, so one database can hold one copy per configuration compared (no
trigger, a hand-written trigger, rowsync in each capture mode) with identical shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column, relationship, selectinload


@dataclass(frozen=True)
class Schema:
    base: type[DeclarativeBase]
    person: Any
    post: Any

    @property
    def posts(self) -> sa.Table:
        table: sa.Table = self.post.__table__
        return table

    @property
    def persons(self) -> sa.Table:
        table: sa.Table = self.person.__table__
        return table

    def tree_query(self) -> sa.Select[Any]:
        """Every person with their posts: the tree the benchmarks hold."""
        return (
            sa.select(self.person).options(selectinload(self.person.posts)).order_by(self.person.id)
        )

    def load_tree(self, engine: sa.Engine) -> list[Any]:
        """The tree, detached (as a web request's would be once its session closed)."""
        with Session(engine, expire_on_commit=False) as session:
            return list(session.scalars(self.tree_query()))


def schema(suffix: str = "") -> Schema:
    """Person (id, name) 1-n Post (id, person_id, title, body, score), posts ordered by id."""
    persons, posts = f"persons{suffix}", f"posts{suffix}"

    class Base(DeclarativeBase):
        pass

    class Person(Base):
        __tablename__ = persons
        id = mapped_column(sa.Integer, primary_key=True)
        name = mapped_column(sa.String)
        posts = relationship("Post", back_populates="person", order_by="Post.id")

    class Post(Base):
        __tablename__ = posts
        id = mapped_column(sa.Integer, primary_key=True)
        person_id = mapped_column(sa.ForeignKey(f"{persons}.id", ondelete="SET NULL"), index=True)
        title = mapped_column(sa.String)
        body = mapped_column(sa.String)
        score = mapped_column(sa.Integer)
        person = relationship(Person, back_populates="posts")

    return Schema(Base, Person, Post)


def populate(engine: sa.Engine, s: Schema, persons: int, posts_per_person: int) -> None:
    """Create the tables and fill them: post ``(p - 1) * posts_per_person + n`` belongs to
    person ``p``; generated in the server, so 100k rows take a second, not a minute."""
    s.base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(s.persons).from_select(
                ["id", "name"],
                sa.select(
                    sa.column("g"), sa.literal("person ") + sa.cast(sa.column("g"), sa.String)
                ).select_from(sa.func.generate_series(1, persons).alias("g")),
            )
        )
        g = sa.func.generate_series(1, persons * posts_per_person).alias("g")
        n = sa.column("g")
        conn.execute(
            sa.insert(s.posts).from_select(
                ["id", "person_id", "title", "body", "score"],
                sa.select(
                    n,
                    (n - 1) // posts_per_person + 1,
                    sa.literal("post ") + sa.cast(n, sa.String),
                    sa.func.repeat("x", 200),
                    (n - 1) % posts_per_person + 1,
                ).select_from(g),
            )
        )
        conn.execute(sa.text("ANALYZE"))
