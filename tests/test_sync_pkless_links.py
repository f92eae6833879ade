"""Association tables without a primary key (``followers``, ``favourites``): a link row is
identified by all its columns. Linking, unlinking, moving and repeating a pair give the tree
a fresh query with the same loader gives, for lazy, selectin and joined loads alike."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

import rowsync
from fixtures import apply_all, writer
from oracle import differences, snapshot
from rowsync import ConfigurationError, RowSync
from rowsync.testing import one_batch


class LinkBase(DeclarativeBase):
    pass


followers = sa.Table(
    "followers",
    LinkBase.metadata,
    sa.Column("follower_id", sa.ForeignKey("users.id")),
    sa.Column("followed_id", sa.ForeignKey("users.id")),
)

favourites = sa.Table(
    "favourites",
    LinkBase.metadata,
    sa.Column("user_id", sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("item_id", sa.ForeignKey("items.id", ondelete="CASCADE"), nullable=False),
    sa.Column("note", sa.String),
    sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.clock_timestamp()),
    sa.Column("weight", sa.Float, server_default=sa.text("1")),
)


class User(LinkBase):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None]

    following: Mapped[list[User]] = relationship(
        secondary=followers,
        primaryjoin=lambda: User.id == followers.c.follower_id,
        secondaryjoin=lambda: User.id == followers.c.followed_id,
        back_populates="followers",
    )
    followers: Mapped[list[User]] = relationship(
        secondary=followers,
        primaryjoin=lambda: User.id == followers.c.followed_id,
        secondaryjoin=lambda: User.id == followers.c.follower_id,
        back_populates="following",
    )
    favourites: Mapped[list[Item]] = relationship(secondary=favourites, order_by="Item.id")
    favourite_set: Mapped[set[Item]] = relationship(secondary="favourites", viewonly=True)


class Item(LinkBase):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None]


ASSOCS = ["following", "followers", "favourites"]


def lazy(attribute: Any) -> None:
    """The default: relationships loaded on first access (see :func:`load`)."""


LOADERS = [
    pytest.param(lazy, id="lazy"),
    pytest.param(selectinload, id="selectin"),
    pytest.param(joinedload, id="joined"),
]


def load(sessions: sessionmaker[Session], loader: Callable[[Any], Any]) -> list[User]:
    """Every user with the three link relationships loaded by ``loader`` (a fresh query)."""
    statement = sa.select(User).order_by(User.id)
    if loader is not lazy:
        statement = statement.options(*(loader(getattr(User, key)) for key in ASSOCS))
    with sessions() as session:
        users = list(session.scalars(statement).unique())
        if loader is lazy:
            for user in users:
                for key in ASSOCS:
                    getattr(user, key)
        return users


@pytest.fixture
def linked(engine: sa.Engine) -> Iterator[tuple[RowSync, Callable[..., None], Any]]:
    """Users 1-3 and items 1-3, user 1 following user 2 and favouring item 1."""
    LinkBase.metadata.create_all(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    write = writer(sessions)
    write(*(User(id=i, name=f"u{i}") for i in (1, 2, 3)))
    write(*(Item(id=i, name=f"i{i}") for i in (1, 2, 3)))
    write(
        followers.insert().values(follower_id=1, followed_id=2),
        favourites.insert().values(user_id=1, item_id=1, note="first"),
    )
    rs = RowSync(engine, rowsync.watchers(User, ASSOCS))
    rs.install()
    with rs:
        yield rs, write, sessions


def follow(rs: RowSync, users: list[User]) -> rowsync.Subscription:
    return rs.subscribe(users, assocs=ASSOCS)


def one_copy(table: sa.Table, **values: Any) -> sa.Delete:
    """Delete one of several equal rows (a table without a key has only ``ctid`` for that)."""
    ctid = sa.column("ctid")
    match = [table.c[name] == value for name, value in values.items()]
    return table.delete().where(
        ctid == sa.select(ctid).select_from(table).where(*match).limit(1).scalar_subquery()
    )


@pytest.mark.parametrize("loader", LOADERS)
def test_a_link_row_inserted_links_the_pair(linked, loader):
    rs, write, sessions = linked
    users = load(sessions, loader)
    sub = follow(rs, users)

    write(
        followers.insert().values(follower_id=3, followed_id=1),
        favourites.insert().values(user_id=1, item_id=3, note=None),
    )
    users = apply_all(rs, sub, users)

    assert [u.id for u in users[0].followers] == [3]
    assert [i.id for i in users[0].favourites] == [1, 3]
    assert snapshot(users) == snapshot(load(sessions, loader))


@pytest.mark.parametrize("loader", LOADERS)
def test_a_link_row_deleted_unlinks_the_pair(linked, loader):
    rs, write, sessions = linked
    users = load(sessions, loader)
    sub = follow(rs, users)

    write(
        followers.delete().where(followers.c.follower_id == 1),
        favourites.delete().where(favourites.c.item_id == 1),
    )
    users = apply_all(rs, sub, users)

    assert users[0].following == [] and users[1].followers == []
    assert users[0].favourites == []
    assert snapshot(users) == snapshot(load(sessions, loader))


@pytest.mark.parametrize("loader", LOADERS)
def test_a_pair_unlinked_then_linked_again_is_linked(linked, loader):
    rs, write, sessions = linked
    users = load(sessions, loader)
    sub = follow(rs, users)

    write(followers.delete().where(followers.c.follower_id == 1))
    write(followers.insert().values(follower_id=1, followed_id=2))
    write(favourites.delete(), favourites.insert().values(user_id=1, item_id=1, note="first"))
    users = apply_all(rs, sub, users)

    assert [u.id for u in users[0].following] == [2]
    assert [i.id for i in users[0].favourites] == [1]
    assert snapshot(users) == snapshot(load(sessions, loader))

    write(sa.update(User).where(User.id == 2).values(name="followed, renamed"))
    users = apply_all(rs, sub, users)
    assert users[0].following[0].name == "followed, renamed"


@pytest.mark.parametrize("loader", LOADERS)
def test_a_link_row_updated_in_place_moves_the_link(linked, loader):
    rs, write, sessions = linked
    users = load(sessions, loader)
    sub = follow(rs, users)

    write(followers.update().values(followed_id=3))
    write(favourites.update().values(item_id=2))
    users = apply_all(rs, sub, users)

    assert [u.id for u in users[0].following] == [3]
    assert users[1].followers == [] and [u.id for u in users[2].followers] == [1]
    assert [i.id for i in users[0].favourites] == [2]
    assert snapshot(users) == snapshot(load(sessions, loader))

    write(sa.update(Item).where(Item.id == 2).values(name="moved to, renamed"))
    users = apply_all(rs, sub, users)
    assert users[0].favourites[0].name == "moved to, renamed"


@pytest.mark.parametrize("loader", LOADERS)
def test_a_link_rows_other_column_updated_keeps_the_pair_linked(linked, loader):
    rs, write, sessions = linked
    users = load(sessions, loader)
    sub = follow(rs, users)

    write(favourites.update().values(note="second"))
    write(favourites.update().values(note=None))
    users = apply_all(rs, sub, users)

    assert [i.id for i in users[0].favourites] == [1]
    assert snapshot(users) == snapshot(load(sessions, loader))

    write(sa.update(Item).where(Item.id == 1).values(name="still linked, renamed"))
    users = apply_all(rs, sub, users)
    assert users[0].favourites[0].name == "still linked, renamed"


@pytest.mark.parametrize("loader", LOADERS)
def test_a_pair_linked_twice_then_once_shows_as_the_loader_gives_it(linked, loader):
    rs, write, sessions = linked
    users = load(sessions, loader)
    sub = follow(rs, users)

    write(followers.insert().values(follower_id=1, followed_id=2))
    write(favourites.insert().values(user_id=1, item_id=1, note="first"))
    users = apply_all(rs, sub, users)

    twice = 2 if loader is selectinload else 1  # selectin keeps a row reached twice twice
    assert [u.id for u in users[0].following] == [2] * twice
    assert [i.id for i in users[0].favourites] == [1] * twice
    assert snapshot(users) == snapshot(load(sessions, loader))

    write(one_copy(followers, follower_id=1, followed_id=2))
    write(one_copy(favourites, user_id=1, item_id=1))
    users = apply_all(rs, sub, users)

    assert [u.id for u in users[0].following] == [2]
    assert [i.id for i in users[0].favourites] == [1]
    assert snapshot(users) == snapshot(load(sessions, loader))

    write(sa.update(User).where(User.id == 2).values(name="linked once, renamed"))
    write(sa.update(Item).where(Item.id == 1).values(name="linked once, renamed"))
    users = apply_all(rs, sub, users)
    assert users[0].following[0].name == users[0].favourites[0].name == "linked once, renamed"
    assert snapshot(users) == snapshot(load(sessions, loader))


@pytest.mark.parametrize("loader", LOADERS)
def test_self_referential_followers_are_kept_in_both_directions(linked, loader):
    rs, write, sessions = linked
    users = load(sessions, loader)
    sub = follow(rs, users)

    write(
        followers.insert().values(follower_id=2, followed_id=1),
        followers.insert().values(follower_id=3, followed_id=2),
        followers.insert().values(follower_id=3, followed_id=3),
    )
    write(followers.delete().where(followers.c.follower_id == 1))
    users = apply_all(rs, sub, users)

    one, two, three = users
    assert [u.id for u in one.following] == [] and [u.id for u in one.followers] == [2]
    assert [u.id for u in two.following] == [1] and [u.id for u in two.followers] == [3]
    assert sorted(u.id for u in three.following) == [2, 3]
    assert [u.id for u in three.followers] == [3]
    assert three.followers[0] is three  # following oneself: the same instance, as a session gives
    assert snapshot(users) == snapshot(load(sessions, loader))


def test_a_user_deleted_with_its_links_leaves_every_collection(linked):
    rs, write, sessions = linked
    users = load(sessions, selectinload)
    sub = follow(rs, users)

    write(followers.insert().values(follower_id=3, followed_id=2))
    write(
        followers.delete().where(followers.c.followed_id == 2), sa.delete(User).where(User.id == 2)
    )
    users = apply_all(rs, sub, users)

    assert [u.id for u in users] == [1, 3]
    assert users[0].following == [] and users[1].following == []
    assert snapshot(users) == snapshot(load(sessions, selectinload))


# -- what cannot identify a row --------------------------------------------------------


def test_a_table_without_primary_key_with_a_json_column_is_refused_by_name():
    class Base(DeclarativeBase):
        pass

    tagged = sa.Table(
        "tagged_with_json",
        Base.metadata,
        sa.Column("doc_id", sa.ForeignKey("docs.id")),
        sa.Column("tag_id", sa.ForeignKey("tags.id")),
        sa.Column("meta", sa.JSON),
    )

    class Tag(Base):
        __tablename__ = "tags"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Doc(Base):
        __tablename__ = "docs"
        id: Mapped[int] = mapped_column(primary_key=True)
        tags: Mapped[list[Tag]] = relationship(secondary=tagged)

    with pytest.raises(ConfigurationError, match="tagged_with_json.*meta"):
        rowsync.watchers(Doc, ["tags"])


def test_a_class_mapped_to_a_table_without_primary_key_is_refused_by_name():
    class Base(DeclarativeBase):
        pass

    keyless = sa.Table("keyless_rows", Base.metadata, sa.Column("a", sa.Integer))

    class Keyless(Base):
        __table__ = keyless
        __mapper_args__ = {"primary_key": [keyless.c.a]}

    with pytest.raises(ConfigurationError, match="keyless_rows"):
        rowsync.watchers(Keyless)


# -- hostile names ---------------------------------------------------------------------


class HostileBase(DeclarativeBase):
    pass


hostile_links = sa.Table(
    'links "of"; drop table y',
    HostileBase.metadata,
    sa.Column("select", sa.ForeignKey("🐘.🔑")),
    sa.Column('a"b', sa.ForeignKey("🐘.🔑")),
    sa.Column("名前", sa.String),
)


class Elephant(HostileBase):
    __tablename__ = "🐘"
    key: Mapped[int] = mapped_column("🔑", primary_key=True)
    herd: Mapped[list[Elephant]] = relationship(
        secondary=hostile_links,
        primaryjoin=lambda: Elephant.key == hostile_links.c["select"],
        secondaryjoin=lambda: Elephant.key == hostile_links.c['a"b'],
        order_by=lambda: Elephant.key,
    )


class Sentinel(HostileBase):
    """``y``: would be dropped if any name were spliced into SQL unquoted."""

    __tablename__ = "y"
    id: Mapped[int] = mapped_column(primary_key=True)


@pytest.mark.parametrize("loader", [selectinload, joinedload])
def test_links_in_a_table_with_hostile_names_are_synced(engine, loader):
    HostileBase.metadata.create_all(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    write = writer(sessions)
    write(*(Elephant(key=k) for k in (1, 2, 3)))
    query = sa.select(Elephant).order_by(Elephant.key).options(loader(Elephant.herd))

    def fresh() -> list[Elephant]:
        with sessions() as session:
            return list(session.scalars(query).unique())

    rs = RowSync(engine, rowsync.watchers(Elephant, ["herd"]))
    rs.install()
    with rs:
        herd = fresh()
        sub = rs.subscribe(herd, assocs=["herd"])
        write(
            hostile_links.insert().values({"select": 1, 'a"b': 3, "名前": "'; drop table y; --"}),
            hostile_links.insert().values({"select": 1, 'a"b': 2, "名前": None}),
        )
        write(hostile_links.update().where(hostile_links.c['a"b'] == 2).values({'a"b': 1}))
        write(hostile_links.update().where(hostile_links.c['a"b'] == 3).values({"名前": "象"}))
        herd = apply_all(rs, sub, herd)

        assert [e.key for e in herd[0].herd] == [1, 3]
        assert snapshot(herd) == snapshot(fresh())
        assert sa.inspect(engine).has_table("y")


def test_announce_covers_every_row_of_a_table_without_primary_key(linked):
    rs, write, sessions = linked
    write(
        followers.insert().values(follower_id=1, followed_id=2),  # twice
        followers.insert().values(follower_id=None, followed_id=3),
        followers.insert().values(follower_id=2, followed_id=None),
        followers.insert().values(follower_id=3, followed_id=1),
    )
    users = load(sessions, selectinload)
    sub = follow(rs, users)

    assert rs.announce(["followers"], batch=1) == {"public.followers": 5}
    users = apply_all(rs, sub, users)
    assert snapshot(users) == snapshot(load(sessions, selectinload))


@pytest.mark.parametrize("loader", [selectinload, joinedload])
def test_a_live_query_follows_links_without_primary_key(linked, loader):
    rs, write, sessions = linked
    statement = sa.select(User).order_by(User.id).options(loader(User.following))

    with rs.live(sessions, statement) as live:
        write(followers.insert().values(follower_id=1, followed_id=3))
        write(followers.update().where(followers.c.followed_id == 2).values(follower_id=3))
        write(followers.insert().values(follower_id=3, followed_id=2))
        live.flush()
        with live.read() as users:
            assert [u.id for u in users[0].following] == [3]
            assert snapshot(users) == snapshot(load_with(sessions, statement))

        write(one_copy(followers, follower_id=3, followed_id=2))
        live.flush()
        with live.read() as users:
            assert [u.id for u in users[2].following] == [2]
            assert snapshot(users) == snapshot(load_with(sessions, statement))
    assert rs.stats["live_errors"] == 0


def load_with(sessions: sessionmaker[Session], statement: sa.Select[Any]) -> list[User]:
    with sessions() as session:
        return list(session.scalars(statement).unique())


@pytest.mark.parametrize(
    "batching",
    [
        pytest.param(one_batch, id="one-batch"),
        pytest.param(lambda rs: nullcontext(), id="as-they-come"),
    ],
)
@pytest.mark.parametrize("loader", LOADERS)
def test_link_changes_in_one_batch_give_what_they_give_one_by_one(linked, loader, batching):
    rs, write, sessions = linked
    users = load(sessions, loader)
    sub = follow(rs, users)

    with batching(rs):
        write(followers.insert().values(follower_id=1, followed_id=3))
        write(followers.update().where(followers.c.followed_id == 3).values(followed_id=2))
        write(one_copy(followers, follower_id=1, followed_id=2))
        write(followers.insert().values(follower_id=2, followed_id=1))
        write(followers.delete().where(followers.c.follower_id == 2))
        write(favourites.update().values(note="moved"))
        write(favourites.update().values(item_id=3))
        write(favourites.insert().values(user_id=2, item_id=3, note=None))
    users = apply_all(rs, sub, users)

    assert [u.id for u in users[0].following] == [2] and users[1].following == []
    assert [i.id for i in users[0].favourites] == [i.id for i in users[1].favourites] == [3]
    assert snapshot(users) == snapshot(load(sessions, loader))

    with batching(rs):
        write(sa.update(User).where(User.id == 2).values(name="u2, renamed"))
        write(sa.update(Item).where(Item.id == 3).values(name="i3, renamed"))
    users = apply_all(rs, sub, users)
    assert snapshot(users) == snapshot(load(sessions, loader))


@pytest.mark.parametrize("loader", [selectinload, joinedload])
def test_a_follower_that_joins_is_followed_below_as_the_loader_loads_it(linked, loader):
    rs, write, sessions = linked
    below = loader(User.followers).selectinload(User.following)
    statement = sa.select(User).where(User.id == 2).options(below)
    users = load_with(sessions, statement)
    sub = rs.subscribe(users, assocs=[{"followers": ["following"]}])

    write(followers.insert().values(follower_id=3, followed_id=2))
    write(sa.update(Item).where(Item.id == 1).values(name="unfollowed"))
    write(followers.insert().values(follower_id=3, followed_id=1))
    write(followers.insert().values(follower_id=3, followed_id=1))
    write(one_copy(followers, follower_id=3, followed_id=1))
    write(sa.update(User).where(User.id == 1).values(name="u1, renamed"))
    users = apply_all(rs, sub, users)

    assert sorted(u.id for u in users[0].followers) == [1, 3]
    expected = snapshot(load_with(sessions, statement))
    assert snapshot(users) == expected, differences(snapshot(users), expected)


def test_an_updated_link_row_is_announced_as_the_old_row_deleted_and_the_new_one_inserted(linked):
    rs, write, _ = linked
    sub = rs.subscribe(followers)

    write(followers.update().values(followed_id=3))
    rs.flush()

    assert [(c.model, c.event, c.ids) for _, c in sub.drain()] == [
        (followers, "deleted", {"follower_id": 1, "followed_id": 2}),
        (followers, "inserted", {"follower_id": 1, "followed_id": 3}),
    ]


@pytest.mark.parametrize("loader", [selectinload, joinedload])
def test_a_set_of_links_without_primary_key_holds_each_pair_once(linked, loader):
    rs, write, sessions = linked
    statement = sa.select(User).order_by(User.id).options(loader(User.favourite_set))
    users = load_with(sessions, statement)
    sub = rs.subscribe(users, assocs=["favourite_set"])

    write(
        favourites.insert().values(user_id=1, item_id=1),
        favourites.insert().values(user_id=1, item_id=2),
    )
    write(one_copy(favourites, user_id=1, item_id=1))
    write(favourites.update().where(favourites.c.item_id == 2).values(user_id=2))
    users = apply_all(rs, sub, users)

    assert isinstance(users[0].favourite_set, set)
    assert {i.id for i in users[0].favourite_set} == {1} and {
        i.id for i in users[1].favourite_set
    } == {2}
    assert snapshot(users) == snapshot(load_with(sessions, statement))
