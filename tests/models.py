"""The reference schema of SCENARIOS.md, as SQLAlchemy models shared by the tests."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.associationproxy import AssociationProxy, association_proxy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


favourite_people = sa.Table(
    "favourite_people",
    Base.metadata,
    sa.Column("person_id", sa.ForeignKey("persons.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("favourite_id", sa.ForeignKey("persons.id", ondelete="CASCADE"), primary_key=True),
)

posts_labels = sa.Table(
    "posts_labels",
    Base.metadata,
    sa.Column("post_id", sa.ForeignKey("posts.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("label_id", sa.ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True),
)


class Person(Base):
    __tablename__ = "persons"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None]

    posts: Mapped[list[Post]] = relationship(
        back_populates="person", foreign_keys="Post.person_id", order_by="Post.id"
    )
    other_posts: Mapped[list[Post]] = relationship(
        back_populates="other_person", foreign_keys="Post.other_id"
    )
    test_posts: Mapped[list[Post]] = relationship(
        primaryjoin="and_(Person.id == foreign(Post.person_id), Post.name == 'test')", viewonly=True
    )
    bad_posts: Mapped[list[Post]] = relationship(
        primaryjoin="and_(Person.id == foreign(Post.person_id),"
        " Post.name.in_(['bad', 'worst']), Post.body == 'blabla')",
        viewonly=True,
    )
    all_tags: Mapped[list[Tag]] = relationship(
        secondary=lambda: sa.join(Post.__table__, PostTag.__table__, Post.id == PostTag.post_id),
        primaryjoin=lambda: Person.id == Post.person_id,
        secondaryjoin=lambda: PostTag.tag_id == Tag.id,
        viewonly=True,
    )
    profile: Mapped[Profile | None] = relationship(back_populates="person")
    favourite_people: Mapped[list[Person]] = relationship(
        secondary=favourite_people,
        primaryjoin=lambda: Person.id == favourite_people.c.person_id,
        secondaryjoin=lambda: Person.id == favourite_people.c.favourite_id,
    )


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None]
    body: Mapped[str | None]
    person_id: Mapped[int | None] = mapped_column(sa.ForeignKey("persons.id", ondelete="SET NULL"))
    other_id: Mapped[int | None] = mapped_column(sa.ForeignKey("persons.id", ondelete="SET NULL"))

    person: Mapped[Person | None] = relationship(back_populates="posts", foreign_keys=[person_id])
    other_person: Mapped[Person | None] = relationship(
        back_populates="other_posts", foreign_keys=[other_id]
    )
    post_tags: Mapped[list[PostTag]] = relationship(back_populates="post", viewonly=True)
    tags: Mapped[list[Tag]] = relationship(secondary="post_tags", order_by="Tag.id", viewonly=True)
    test_tags: Mapped[list[Tag]] = relationship(
        secondary="post_tags",
        secondaryjoin="and_(PostTag.tag_id == Tag.id, Tag.name == 'test')",
        viewonly=True,
    )
    labels: Mapped[list[Label]] = relationship(secondary=posts_labels)
    tag_names: AssociationProxy[list[str]] = association_proxy("tags", "name")


class Tag(Base):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None]


class PostTag(Base):
    __tablename__ = "post_tags"
    post_id: Mapped[int] = mapped_column(
        sa.ForeignKey("posts.id", ondelete="CASCADE"), primary_key=True
    )
    tag_id: Mapped[int] = mapped_column(
        sa.ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True
    )

    post: Mapped[Post] = relationship(back_populates="post_tags")
    tag: Mapped[Tag] = relationship()


class Label(Base):
    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None]


class Profile(Base):
    __tablename__ = "profiles"
    id: Mapped[int] = mapped_column(primary_key=True)
    person_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("persons.id", ondelete="CASCADE"), unique=True
    )
    bio: Mapped[str | None]

    person: Mapped[Person | None] = relationship(back_populates="profile")
