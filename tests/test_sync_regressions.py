"""Shrunk failures of the convergence oracle (tests/test_convergence.py) and of the mapping
oracle (tests/test_oracle_mappings.py), kept as plain tests."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    contains_eager,
    defaultload,
    immediateload,
    joinedload,
    load_only,
    mapped_column,
    noload,
    raiseload,
    relationship,
    selectinload,
)

import rowsync
from fixtures import apply_all
from models import Person, Post, PostTag, Profile, Tag, favourite_people
from oracle import assocs_of, differences, fresh, snapshot, trees

# noload (an option, a lazy= default) is deprecated in SQLAlchemy 2.1, and still in use.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The (``)?noload:sqlalchemy.exc.SADeprecationWarning"
)

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


# -- shrunk failures of the restart oracle (tests/test_restart_oracle.py): a subscriber that
# applies many messages late, after the database has moved on --------------------------


def _lagging(rs, sessions, tree, statements):
    """Load ``tree``, commit ``statements``, and only then apply every message."""
    tree.value = fresh(sessions, tree.statement, many=tree.many)
    sub = rs.subscribe(tree.value, assocs=assocs_of(tree))
    entity = tree.statement.column_descriptions[0]["entity"]
    sub.add(entity, "inserted", follow=True, assocs=assocs_of(tree))
    for statement in statements:
        with sessions() as session, session.begin():
            session.execute(statement)
    rs.flush()
    for message in sub.drain():
        tree.value = rs.sync(tree.value, message, tree.preloads)
    return snapshot(tree.value), snapshot(fresh(sessions, tree.statement, many=tree.many))


def test_an_emptied_root_list_takes_inserts_of_its_own_model_only(rs, sessions, write):
    """Once every person is gone, a tag the subscription hears of must not become a root."""
    write(*[Person(id=i, name="p") for i in (1, 2, 3)], Tag(id=1, name="t1"))
    write(Post(id=1, person_id=1, name="test"))
    (people,) = [t for t in trees(favourites=False) if t.name == "people, everything"]
    upsert = "INSERT INTO persons (id, name) VALUES (2, 'q') ON CONFLICT (id) DO NOTHING"
    synced, expected = _lagging(
        rs,
        sessions,
        people,
        [
            sa.delete(Person).where(Person.id == 2),
            sa.text(upsert),
            sa.delete(Tag).where(Tag.id == 1),
            sa.delete(Person).where(Person.id == 3),
            sa.delete(Person).where(Person.id == 1),
            sa.insert(Tag).values(id=1, name="test"),
            sa.delete(Person).where(Person.id == 2),
        ],
    )
    assert synced == expected == []


def test_a_late_root_first_loaded_as_a_favourite_gets_the_roots_loader_options(rs, sessions, write):
    write(*[Person(id=i, name="p") for i in (1, 2, 3)])
    (people,) = [t for t in trees() if t.name == "people, everything"]
    upsert = "INSERT INTO persons (id, name) VALUES (:i, 'p') ON CONFLICT (id) DO NOTHING"
    synced, expected = _lagging(
        rs,
        sessions,
        people,
        [
            sa.delete(Person).where(Person.id == 3),
            sa.text(upsert).bindparams(i=6),
            sa.text(upsert).bindparams(i=3),
            sa.insert(favourite_people).values(person_id=6, favourite_id=3),
            sa.insert(Post).values(id=6, person_id=3),
            sa.delete(Post).where(Post.id == 6),
            sa.insert(Post).values(id=6, name="bad", person_id=3),
        ],
    )
    assert synced == expected


# Shrunk failures of the mapping oracle (tests/test_oracle_mappings.py).


@pytest.mark.parametrize("loader", [selectinload, joinedload])
@pytest.mark.parametrize("step", ["joins", "repoints", "target_updated", "target_deleted"])
def test_a_many_to_one_whose_foreign_key_load_only_left_out_is_synced(
    rs, sessions, write, loader, step
):
    """The oracle's ``load_only`` failure was SQLAlchemy's own: its ``subqueryload`` of a
    many-to-one cannot run without the foreign key (tests/genmap.py keeps it for that one).
    Without the foreign key loaded, the post's person is still followed and kept: through the
    row (the flush makes the subscription start after the rows' own events, which had
    registered it by chance)."""
    write(Person(id=1, name="a"), Person(id=2, name="b"), Post(id=10, person_id=1))
    rs.flush()
    statement = sa.select(Post).options(loader(Post.person), load_only(Post.id, Post.name))
    posts = fresh(sessions, statement)
    assert "person_id" not in sa.inspect(posts[0]).dict
    sub = rs.subscribe(posts, assocs=["person"])
    sub.add(Post, "inserted", follow=True, assocs=["person"])

    write(
        {
            "joins": Post(id=11, person_id=2),
            "repoints": sa.update(Post).values(person_id=2),
            "target_updated": sa.update(Person).values(name="z"),
            "target_deleted": sa.delete(Person).where(Person.id == 1),
        }[step]
    )
    posts = apply_all(rs, sub, posts)

    assert not differences(snapshot(posts), snapshot(fresh(sessions, statement)))


POSTS_WITH_EAGER_PERSON = (
    sa.select(Post)
    .outerjoin(Post.person)
    .options(contains_eager(Post.person), defaultload(Post.tags))
    .order_by(Post.id)
)


def test_a_row_joining_roots_loaded_with_load_only_is_synced(rs, sessions, write):
    write(Person(id=1, name="a"))
    statement = sa.select(Person).options(load_only(Person.id))
    people = fresh(sessions, statement)
    sub = rs.subscribe(people, assocs=[])
    sub.add(Person, "inserted", follow=True)

    write(Person(id=2, name="b"))
    people = apply_all(rs, sub, people)

    assert not differences(snapshot(people), snapshot(fresh(sessions, statement)))


def test_a_row_joining_roots_gets_what_contains_eager_loads(rs, sessions, write):
    write(Person(id=1, name="a"), Post(id=10, person_id=1))
    posts = fresh(sessions, POSTS_WITH_EAGER_PERSON)
    sub = rs.subscribe(posts, assocs=["person"])
    sub.add(Post, "inserted", follow=True, assocs=["person"])

    write(Post(id=11, person_id=1))
    posts = apply_all(rs, sub, posts)

    assert not differences(snapshot(posts), snapshot(fresh(sessions, POSTS_WITH_EAGER_PERSON)))


def test_resync_keeps_what_contains_eager_loaded(rs, sessions, write):
    write(Person(id=1, name="a"), Post(id=10, person_id=1))
    posts = fresh(sessions, POSTS_WITH_EAGER_PERSON)

    posts = rs.resync(posts)

    assert not differences(snapshot(posts), snapshot(fresh(sessions, POSTS_WITH_EAGER_PERSON)))


def test_a_row_joining_roots_gets_the_empty_value_noload_sets(rs, sessions, write):
    write(Person(id=1, name="a"))
    statement = sa.select(Person).options(noload(Person.posts))
    people = fresh(sessions, statement)
    sub = rs.subscribe(people, assocs=[])
    sub.add(Person, "inserted", follow=True)

    write(Person(id=2, name="b"))
    people = apply_all(rs, sub, people)

    assert not differences(snapshot(people), snapshot(fresh(sessions, statement)))


def test_a_new_row_stays_out_of_a_collection_noload_sets_empty(rs, sessions, write):
    write(Person(id=1, name="a"))
    statement = sa.select(Person).options(noload(Person.posts))
    people = fresh(sessions, statement)
    sub = rs.subscribe(people, assocs=["posts"])

    write(Post(id=10, person_id=1))
    people = apply_all(rs, sub, people)

    assert people[0].posts == []
    assert not differences(snapshot(people), snapshot(fresh(sessions, statement)))


def test_a_root_joining_an_emptied_list_gets_the_empty_value_noload_sets(rs, sessions, write):
    write(Person(id=1, name="a"))
    statement = sa.select(Person).options(noload(Person.posts))
    people = fresh(sessions, statement)
    sub = rs.subscribe(people, assocs=[])
    sub.add(Person, "inserted", follow=True)

    write(sa.delete(Person))
    people = apply_all(rs, sub, people, preloads={Person: []})
    write(Person(id=2, name="b"))
    people = apply_all(rs, sub, people, preloads={Person: []})

    assert people[0].posts == []
    assert not differences(snapshot(people), snapshot(fresh(sessions, statement)))


@pytest.mark.xfail(
    strict=True,
    reason="a list empty when subscribed says nothing of its statement's options: new roots "
    "are loaded as preloads say, and preloads (assocs) cannot say noload",
)
def test_a_root_joining_a_list_empty_when_subscribed_gets_the_empty_value_noload_sets(
    rs, sessions, write
):
    statement = sa.select(Person).options(noload(Person.posts))
    people = fresh(sessions, statement)
    sub = rs.subscribe(people, assocs=[])
    sub.add(Person, "inserted", follow=True)

    write(Person(id=1, name="a"))
    people = apply_all(rs, sub, people, preloads={Person: []})

    assert not differences(snapshot(people), snapshot(fresh(sessions, statement)))


def test_resync_gives_the_empty_value_noload_sets(rs, sessions, write):
    write(Person(id=1, name="a"), Post(id=10, person_id=1))
    statement = sa.select(Person).options(noload(Person.posts))
    people = fresh(sessions, statement)

    people = rs.resync(people)

    assert people[0].posts == []
    assert not differences(snapshot(people), snapshot(fresh(sessions, statement)))


class _EagerBase(DeclarativeBase):
    pass


class _Owner(_EagerBase):
    __tablename__ = "owners"
    id: Mapped[int] = mapped_column(primary_key=True)
    badge: Mapped[_Badge | None] = relationship(lazy="selectin", viewonly=True)


class _Badge(_EagerBase):
    __tablename__ = "badges"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(sa.ForeignKey("owners.id"), unique=True)


def test_resync_leaves_unloaded_what_raiseload_kept_unloaded_over_an_eager_default(
    engine, write_to
):
    _EagerBase.metadata.create_all(engine)
    write = write_to(engine)
    write(_Owner(id=1), _Badge(id=1, owner_id=1))
    statement = sa.select(_Owner).options(raiseload(_Owner.badge))
    owners = fresh(write.sessions, statement)
    rs = rowsync.RowSync(engine, rowsync.watchers(_Owner, ["badge"]))
    rs.install()
    with rs:
        owners = rs.resync(owners)

    assert not differences(snapshot(owners), snapshot(fresh(write.sessions, statement)))


class _NoloadBase(DeclarativeBase):
    pass


class _Node(_NoloadBase):
    """A tree whose relationships a query never loads (``lazy="noload"``): it sets them empty."""

    __tablename__ = "nodes"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("nodes.id"))
    parent: Mapped[_Node | None] = relationship(
        lazy="noload", remote_side=[id], back_populates="children"
    )
    children: Mapped[list[_Node]] = relationship(lazy="noload", back_populates="parent")


@pytest.fixture
def nodes(engine, write_to):
    _NoloadBase.metadata.create_all(engine)
    write = write_to(engine)
    rs = rowsync.RowSync(engine, rowsync.watchers(_Node, ["parent", "children"]))
    rs.install()
    with rs:
        yield rs, write


def test_resync_leaves_empty_what_a_noload_default_sets_empty(nodes):
    rs, write = nodes
    write(_Node(id=1), _Node(id=2, parent_id=1))
    statement = sa.select(_Node)
    found = fresh(write.sessions, statement)

    found = rs.resync(found)

    assert not differences(snapshot(found), snapshot(fresh(write.sessions, statement)))


def test_a_new_row_stays_out_of_a_collection_a_noload_default_sets_empty(nodes):
    rs, write = nodes
    write(_Node(id=1))
    statement = sa.select(_Node)
    found = fresh(write.sessions, statement)
    sub = rs.subscribe(found, assocs=[])
    sub.add(_Node, "inserted", follow=True)

    write(_Node(id=2, parent_id=1))
    found = apply_all(rs, sub, found)

    assert not differences(snapshot(found), snapshot(fresh(write.sessions, statement)))


class _KindsBase(DeclarativeBase):
    pass


class _Shelf(_KindsBase):
    __tablename__ = "shelves"
    id: Mapped[int] = mapped_column(primary_key=True)
    boxes: Mapped[list[_Box]] = relationship(viewonly=True)


class _Box(_KindsBase):
    """Boxes and their subclass, in one table told apart by ``kind``."""

    __tablename__ = "boxes"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str]
    shelf_id: Mapped[int | None] = mapped_column(sa.ForeignKey("shelves.id"))
    items: Mapped[list[_Item]] = relationship(viewonly=True)
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "box"}


class _BigBox(_Box):
    __mapper_args__ = {"polymorphic_identity": "big"}


class _Item(_KindsBase):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    box_id: Mapped[int | None] = mapped_column(sa.ForeignKey("boxes.id"))


def test_a_new_row_below_an_immediateload_of_a_polymorphic_entity_loads_what_the_query_does(
    engine, write_to
):
    """SQLAlchemy lazy-loads an immediateload's rows as the plain class: what is chained
    below its ``with_polymorphic`` alias is not loaded, on the rows rowsync adds either."""
    _KindsBase.metadata.create_all(engine)
    write = write_to(engine)
    write(_Shelf(id=1))
    boxes = sa.orm.with_polymorphic(_Box, [_BigBox], flat=True)
    statement = sa.select(_Shelf).options(
        immediateload(_Shelf.boxes.of_type(boxes)).immediateload(boxes.items)
    )
    shelves = fresh(write.sessions, statement)
    rs = rowsync.RowSync(engine, rowsync.watchers(_Shelf, [{"boxes": ["items"]}]))
    rs.install()
    with rs:
        sub = rs.subscribe(shelves, assocs=[{"boxes": ["items"]}])
        write(_Box(id=2, kind="box", shelf_id=1))
        shelves = apply_all(rs, sub, shelves)

    assert not differences(snapshot(shelves), snapshot(fresh(write.sessions, statement)))


class _FoldersBase(DeclarativeBase):
    pass


class _Folder(_FoldersBase):
    """A tree of folders, each with documents."""

    __tablename__ = "folders"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("folders.id"))
    name: Mapped[str | None]
    parent: Mapped[_Folder | None] = relationship(remote_side=[id], viewonly=True)
    docs: Mapped[list[_Doc]] = relationship(viewonly=True)


class _Doc(_FoldersBase):
    __tablename__ = "docs"
    id: Mapped[int] = mapped_column(primary_key=True)
    folder_id: Mapped[int | None] = mapped_column(sa.ForeignKey("folders.id"))


_FOLDERS_WITH_PARENTS = sa.select(_Folder).options(
    immediateload(_Folder.parent).joinedload(_Folder.docs)
)
"""An immediateload of a many-to-one finds a parent that is a root in the session (a query
loads its roots first): the options chained below it load nothing on it."""


@pytest.mark.parametrize("hold", ["subscribe", "live"])
def test_a_root_that_becomes_a_new_roots_parent_keeps_what_the_roots_load_only(
    engine, write_to, hold
):
    _FoldersBase.metadata.create_all(engine)
    write = write_to(engine)
    write(_Folder(id=1), _Doc(id=1, folder_id=1))
    assocs = [{"parent": ["docs"]}]
    rs = rowsync.RowSync(engine, rowsync.watchers(_Folder, assocs))
    rs.install()
    with rs:
        if hold == "live":
            live = rs.live(write.sessions, _FOLDERS_WITH_PARENTS, idle_timeout=None)
            write(_Folder(id=2, parent_id=1))
            rs.flush()
            live.flush()
            folders = live.value
            live.close()
        else:
            folders = fresh(write.sessions, _FOLDERS_WITH_PARENTS)
            sub = rs.subscribe(folders, assocs=assocs).add(
                _Folder, "inserted", follow=True, assocs=assocs
            )
            write(_Folder(id=2, parent_id=1))
            folders = apply_all(rs, sub, folders, preloads={_Folder: assocs})

    expected = fresh(write.sessions, _FOLDERS_WITH_PARENTS)
    assert not differences(snapshot(folders), snapshot(expected))
    assert "docs" not in sa.inspect(next(f for f in folders if f.id == 1)).dict


def test_a_root_that_becomes_a_roots_parent_gets_the_columns_the_loader_there_reads(
    engine, write_to
):
    """A loader that queries a row the query holds already (a selectinload of a parent that
    is a root) fills the columns the root's load_only left unloaded."""
    _FoldersBase.metadata.create_all(engine)
    write = write_to(engine)
    write(_Folder(id=1, name="a"), _Folder(id=2, name="b"))
    statement = sa.select(_Folder).options(
        load_only(_Folder.id, _Folder.parent_id), selectinload(_Folder.parent)
    )
    folders = fresh(write.sessions, statement)
    rs = rowsync.RowSync(engine, rowsync.watchers(_Folder, ["parent"]))
    rs.install()
    with rs:
        sub = rs.subscribe(folders, assocs=["parent"])
        write(sa.update(_Folder).where(_Folder.id == 2).values(parent_id=1))
        folders = apply_all(rs, sub, folders)

    assert not differences(snapshot(folders), snapshot(fresh(write.sessions, statement)))


@pytest.mark.xfail(
    strict=True,
    reason="new (mapping oracle soak, also on main): a live query of A, whose one-to-one A.o "
    "loads by lazy='immediate' and whose classes define __eq__ (all equal) without __hash__, "
    "gains the O row inserted for it where a fresh query leaves A.o unloaded: SQLAlchemy's "
    "immediate loader sets the value only if `value not in (ATTR_WAS_SET, PASSIVE_NO_RESULT)`, "
    "which calls O.__eq__; matching that would mean rowsync calling a user's __eq__",
)
def test_a_live_query_with_an_immediate_one_to_one_and_custom_eq_equals_a_fresh_query(engine):
    from sqlalchemy.orm import sessionmaker

    import genmap
    from test_oracle_mappings import commit, started

    mapping = genmap.Mapping(
        features=frozenset({"custom_eq", "lazy_defaults", "one_to_one"}),
        rels=(("A.o", genmap.Rel(lazy="immediate")),),
    )
    built = genmap.build(mapping)
    with started(engine, built) as rs:
        sessions = sessionmaker(engine, expire_on_commit=False)
        commit(sessions, built, (genmap.Insert("A", (("id", 1), ("name", "a"))),))
        statement = sa.select(built.root)
        live = rs.live(sessions, statement, idle_timeout=None)
        try:
            commit(sessions, built, (genmap.Insert("O", (("id", 1), ("a_id", 1))),))
            rs.flush()
            live.flush()
            got = snapshot(live.value)
        finally:
            live.close()
        assert not differences(got, snapshot(fresh(sessions, statement)))
