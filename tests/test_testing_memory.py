"""rowsync.testing.MemoryEvents: row changes made up in memory reach subscriptions and trees
as the database's own changes do, and rowsync never reads a database while it feeds them.

Every test but the one comparing with a real database runs on a RowSync whose engine
refuses to connect.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import rowsync
from fixtures import writer
from rowsync import Change, ConfigurationError, Resync, RowSync, Sync
from rowsync.fetch import RowSource
from rowsync.testing import MemoryEvents, NeedsDatabase, Recorder, _MemoryRows, loaded


class Base(DeclarativeBase):
    pass


post_tags = sa.Table(
    "post_tags",
    Base.metadata,
    sa.Column("post_id", sa.ForeignKey("posts.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("tag_id", sa.ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True),
)


class Person(Base):
    __tablename__ = "people"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    posts: Mapped[list[Post]] = relationship(order_by="Post.id", back_populates="author")
    published_posts: Mapped[list[Post]] = relationship(
        primaryjoin="and_(Person.id == foreign(Post.person_id), Post.published)",
        order_by="Post.id",
        viewonly=True,
    )


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    person_id: Mapped[int] = mapped_column(sa.ForeignKey("people.id"))
    published: Mapped[bool] = mapped_column(default=False)
    author: Mapped[Person] = relationship(back_populates="posts")
    tags: Mapped[list[Tag]] = relationship(secondary=post_tags, order_by="Tag.id")


class Tag(Base):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


ASSOCS: list[Any] = [{"posts": ["tags"]}, "published_posts"]
WATCHERS = rowsync.watchers(Person, ASSOCS)


@pytest.fixture
def offline() -> RowSync:
    """A RowSync whose engine fails the test if anything connects."""
    engine = sa.create_engine("postgresql+psycopg://nobody@offline.invalid/none")

    @sa.event.listens_for(engine, "do_connect")
    def refuse(*args: Any) -> None:
        pytest.fail("rowsync connected to a database while MemoryEvents fed it")

    return RowSync(engine, WATCHERS)


@pytest.fixture
def events(offline: RowSync) -> MemoryEvents:
    return MemoryEvents(offline)


def people() -> list[Person]:
    """Ada with one published post, Bob with none: as the query with ASSOCS loads them."""
    ada = Person(id=1, name="Ada", posts=[Post(id=1, title="a", person_id=1, published=True)])
    ada.posts[0].tags = []
    ada.published_posts = list(ada.posts)
    bob = Person(id=2, name="Bob", posts=[], published_posts=[])
    return loaded([ada, bob], ASSOCS)


def apply(rs: RowSync, sub: rowsync.Subscription, value: Any) -> Any:
    for message in sub.drain():
        value = rs.sync(value, message)
    return value


def shape(value: list[Person]) -> list[tuple[Any, ...]]:
    return [
        (
            p.name,
            [(q.id, q.title, [t.name for t in q.tags]) for q in p.posts],
            [q.id for q in p.published_posts],
        )
        for p in value
    ]


def test_an_update_of_a_held_row_reaches_its_subscription_and_patches_the_tree(offline, events):
    tree = people()
    sub = offline.subscribe(tree, assocs=ASSOCS)

    events.updated(tree[0].posts[0], title="b", within=[Person.published_posts])

    [message] = sub.drain()
    assert message == (Sync, Change(Post, "updated", {"id": 1, "person_id": 1}, 1))
    tree = offline.sync(tree, message)
    assert shape(tree) == [("Ada", [(1, "b", [])], [1]), ("Bob", [], [])]


def test_an_inserted_row_joins_its_parents_collection_in_order(offline, events):
    tree = people()
    sub = offline.subscribe(tree, assocs=ASSOCS)

    events.inserted(Post(id=3, title="c", person_id=1, tags=[]), within=())
    events.inserted(Post(id=2, title="b", person_id=1, tags=[]), within=())

    tree = apply(offline, sub, tree)
    assert shape(tree)[0] == ("Ada", [(1, "a", []), (2, "b", []), (3, "c", [])], [1])


def test_a_row_moved_to_another_parent_leaves_one_collection_and_enters_the_other(offline, events):
    tree = people()
    ada = offline.subscribe(tree[0], assocs=ASSOCS)
    bob = offline.subscribe(tree[1], assocs=ASSOCS)
    events.seed(tree[0].posts[0], within=[Person.published_posts])

    events.updated(Post, id=1, person_id=2, within=[Person.published_posts])

    assert [m[1].ids for m in ada.drain()] == [{"id": 1, "person_id": 2}]
    tree = apply(offline, bob, tree)
    assert shape(tree) == [("Ada", [], []), ("Bob", [(1, "a", [])], [1])]


def test_a_row_updated_out_of_the_criteria_leaves_the_filtered_collection(offline, events):
    tree = people()
    sub = offline.subscribe(tree, assocs=ASSOCS)

    events.updated(tree[0].posts[0], published=False, within=())

    tree = apply(offline, sub, tree)
    assert shape(tree)[0] == ("Ada", [(1, "a", [])], [])


def test_rows_of_a_table_with_criteria_must_say_which_criteria_they_meet(offline, events):
    tree = people()
    offline.subscribe(tree, assocs=ASSOCS)

    with pytest.raises(ConfigurationError, match=r"Person.published_posts .* within="):
        events.updated(tree[0].posts[0], title="b")


def test_a_deleted_row_leaves_the_tree(offline, events):
    tree = people()
    sub = offline.subscribe(tree, assocs=ASSOCS)

    events.deleted(tree[0].posts[0])

    [message] = sub.drain()
    assert message == (Sync, Change(Post, "deleted", {"id": 1, "person_id": 1}, 1))
    tree = offline.sync(tree, message)
    assert shape(tree) == [("Ada", [], []), ("Bob", [], [])]


def test_a_link_brings_in_the_seeded_row_and_an_unknown_row_needs_the_database(offline, events):
    tree = people()
    sub = offline.subscribe(tree, assocs=ASSOCS)
    events.seed(Tag(id=5, name="python"))

    events.inserted(post_tags, post_id=1, tag_id=5)
    tree = apply(offline, sub, tree)
    assert shape(tree)[0] == ("Ada", [(1, "a", ["python"])], [1])

    events.inserted(post_tags, post_id=1, tag_id=6)
    [message] = sub.drain()
    with pytest.raises(NeedsDatabase, match=r"tags row \(6,\) was never given"):
        offline.sync(tree, message)


def test_a_new_row_that_its_tree_loads_relationships_below_comes_as_the_object_given(
    offline, events
):
    tree = people()
    sub = offline.subscribe(tree, assocs=ASSOCS)
    sub.add(Person, "inserted", follow=True, assocs=ASSOCS)

    events.inserted(Person(id=3, name="Cy", posts=[], published_posts=[]))
    tree = apply(offline, sub, tree)
    assert shape(tree)[2] == ("Cy", [], [])

    # Without its relationships, only a query could tell what comes below the new row.
    with pytest.raises(NeedsDatabase, match="give the object with posts loaded"):
        events.inserted(Person(id=4, name="Di"))


def test_a_new_row_without_what_the_tree_loads_below_it_needs_the_database(offline, events):
    tree = people()  # loaded with posts.tags: the subscription follows tags as well
    offline.subscribe(tree, assocs=["posts"])

    with pytest.raises(NeedsDatabase, match=r"follows Post\.tags: give the object with tags"):
        events.inserted(Post(id=2, title="b", person_id=1), within=())


def test_a_primary_key_update_arrives_as_a_delete_and_an_insert(offline, events):
    sub = offline.subscribe(Tag)
    events.seed(Tag(id=5, name="python"))

    events.updated(Tag, id=5, name="python")  # known: the whole row is the seeded one
    events.updated(Tag(id=5, name="python"), id=6)

    assert [m[1][:3] for m in sub.drain()] == [
        (Tag, "updated", {"id": 5}),
        (Tag, "deleted", {"id": 5}),
        (Tag, "inserted", {"id": 6}),
    ]


def test_resync_tells_every_subscription(offline, events):
    subs = [offline.subscribe(Post), offline.subscribe(people(), assocs=ASSOCS)]

    events.resync()

    for sub in subs:
        [(kind, info)] = sub.drain()
        assert kind is Resync and info.reason == "reconnect"


def test_an_event_under_an_ignored_origin_is_not_delivered(offline, events):
    mine = offline.subscribe(Tag, ignore_origin="web-1")
    all_ = offline.subscribe(Tag)

    events.inserted(Tag(id=5, name="python"), origin="web-1")

    assert mine.drain() == [] and len(all_.drain()) == 1


def test_an_event_needs_the_identifying_columns_a_trigger_sends(offline, events):
    with pytest.raises(ConfigurationError, match=r"\['person_id'\] unknown"):
        events.deleted(Post, id=9)  # never given: person_id is not known
    with pytest.raises(ConfigurationError, match="the row before the update .* unknown"):
        events.updated(Post, id=9, person_id=1, title="x", within=())


def test_an_unwatched_event_an_unknown_column_or_a_bad_key_is_refused(events):
    only_inserts = RowSync(
        "postgresql://nobody@offline.invalid/none", rowsync.watchers(Tag, events=["inserted"])
    )
    with pytest.raises(ConfigurationError, match="tags deleted is not watched"):
        MemoryEvents(only_inserts).deleted(Tag, id=1)
    with pytest.raises(ConfigurationError, match="no column or attribute 'titel'"):
        events.inserted(Post, id=1, person_id=1, titel="x", within=())
    with pytest.raises(ConfigurationError, match="no usable primary key"):
        events.inserted(Tag, id="1", name="x")


def test_loaded_refuses_a_tree_missing_what_its_options_load():
    with pytest.raises(ConfigurationError, match="has published_posts not loaded"):
        loaded([Person(id=1, name="Ada", posts=[])], ASSOCS)


def test_resync_of_a_tree_needs_the_database(offline, events):
    with pytest.raises(NeedsDatabase, match="rs.resync"):
        offline.resync(people())


def test_wait_for_takes_each_matching_change_once(offline, events):
    with Recorder(offline) as recorder:
        events.inserted(Tag(id=5, name="a"))
        events.updated(Tag(id=5, name="a"), name="b")
        events.updated(Tag(id=5, name="b"), name="c")

        assert recorder.wait_for(Tag, "updated", id=5).ref == 2
        assert recorder.wait_for(Tag, "updated", id=5).ref == 3
        assert recorder.wait_for(Tag, "inserted").ref == 1
        with pytest.raises(TimeoutError, match="no tags deleted id=5 within 0 s"):
            recorder.wait_for(Tag, "deleted", timeout=0, id=5)
        with pytest.raises(ConfigurationError, match="cannot filter 'tags' on \\['name'\\]"):
            recorder.wait_for(Tag, name="c")


def test_every_read_of_the_row_source_is_answered_from_memory():
    reads = {
        name
        for name, member in vars(RowSource).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }
    through_the_cache = {"row"}  # reads with fetch, which is answered from memory
    not_a_read = {
        "release",  # gives back the held connection, which memory never takes
        "built",  # builds a row from a WAL change's text, no query; memory events carry none
        "judge",  # criteria of rows built from the WAL: memory events carry none
        "has_criteria",  # whether built rows need judge: no read
        "loaders",  # how the WAL decoder loads its texts: memory has no decoder
    }
    assert reads - through_the_cache - not_a_read <= set(vars(_MemoryRows))


def test_messages_are_those_the_same_changes_in_the_database_produce(engine):
    """The same writes, made in Postgres and made up in memory, give equal messages."""
    Base.metadata.create_all(engine)
    write = writer(sa.orm.sessionmaker(engine, expire_on_commit=False))
    write(Person(id=1, name="Ada"), Person(id=2, name="Bob"), Tag(id=5, name="python"))
    real = RowSync(engine, WATCHERS)
    real.install()
    with real, Recorder(real) as recorder:
        # each change read before the next, as in memory: a change is told with its row's values
        for change in [
            Post(id=1, title="a", person_id=1, published=True),
            post_tags.insert().values(post_id=1, tag_id=5),
            sa.update(Post).where(Post.id == 1).values(person_id=2, title="b"),
            sa.delete(post_tags),
            sa.update(Tag).values(id=6),
            sa.delete(Post),
        ]:
            write(change)
            real.flush()
        from_db = [m[1][:3] for m in recorder.sub.drain()]

    memory = RowSync("postgresql://nobody@offline.invalid/none", WATCHERS)
    events = MemoryEvents(memory)
    with Session(engine) as session:
        events.seed(*session.scalars(sa.select(Person)), Tag(id=5, name="python"))
    with Recorder(memory) as recorder:
        events.inserted(Post(id=1, title="a", person_id=1, published=True), within=[])
        events.inserted(post_tags, post_id=1, tag_id=5)
        events.updated(Post, id=1, person_id=2, title="b", within=[])
        events.deleted(post_tags, post_id=1, tag_id=5)
        events.updated(Tag(id=5, name="python"), id=6)
        events.deleted(Post, id=1)
        from_memory = [m[1][:3] for m in recorder.sub.drain()]

    assert from_memory == from_db
