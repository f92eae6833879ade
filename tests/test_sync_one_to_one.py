"""Scenario 18: one-to-one (Person.profile, profiles.person_id unique) - EctoSync crashes on it."""

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import joinedload, selectinload

from fixtures import apply_all, messages, returning, sync_each
from models import Person, Profile
from oracle import fresh, snapshot

LOADERS = [pytest.param(selectinload, id="selectin"), pytest.param(joinedload, id="joined")]


def people_query(loader):
    return sa.select(Person).order_by(Person.id).options(loader(Person.profile))


@pytest.fixture
def profiled(rs, write):
    write(Person(id=1, name="a"), Person(id=2, name="b"), Profile(id=100, person_id=1, bio="old"))
    rs.flush()


@pytest.mark.parametrize("loader", LOADERS)
def test_one_to_one_related_row_updated_is_patched(rs, sessions, write, profiled, loader):
    people = fresh(sessions, people_query(loader))
    profile = people[0].profile
    sub = rs.subscribe(people, assocs=["profile"])

    write(sa.update(Profile).values(bio="new"))
    people = apply_all(rs, sub, people)

    assert people[0].profile is profile
    assert profile.bio == "new"
    assert snapshot(people) == snapshot(fresh(sessions, people_query(loader)))


@pytest.mark.parametrize("loader", LOADERS)
def test_one_to_one_related_row_replaced_in_one_transaction(rs, sessions, write, profiled, loader):
    people = fresh(sessions, people_query(loader))
    sub = rs.subscribe(people, assocs=["profile"])

    write(
        sa.delete(Profile).where(Profile.id == 100), Profile(id=101, person_id=1, bio="replacement")
    )
    people = apply_all(rs, sub, people)

    assert (people[0].profile.id, people[0].profile.bio) == (101, "replacement")
    assert snapshot(people) == snapshot(fresh(sessions, people_query(loader)))


@pytest.mark.parametrize(
    "reverse", [pytest.param(False, id="delivered-order"), pytest.param(True, id="reversed-order")]
)
def test_one_to_one_replaced_gives_the_new_row_whatever_the_order(
    rs, sessions, write, profiled, reverse
):
    people = fresh(sessions, people_query(selectinload))
    sub = rs.subscribe(people, assocs=["profile"])

    write(sa.delete(Profile).where(Profile.id == 100))
    write(Profile(id=101, person_id=1, bio="replacement"))
    msgs = messages(rs, sub)
    people = returning(lambda: sync_each(rs, people, msgs[::-1] if reverse else msgs))

    assert people[0].profile.id == 101
    assert snapshot(people) == snapshot(fresh(sessions, people_query(selectinload)))


@pytest.mark.parametrize("loader", LOADERS)
def test_one_to_one_related_row_moved_to_another_person(rs, sessions, write, profiled, loader):
    people = fresh(sessions, people_query(loader))
    sub = rs.subscribe(people, assocs=["profile"])

    write(sa.update(Profile).values(person_id=2))
    people = apply_all(rs, sub, people)

    assert people[0].profile is None
    assert people[1].profile.id == 100
    assert snapshot(people) == snapshot(fresh(sessions, people_query(loader)))


@pytest.mark.parametrize("loader", LOADERS)
def test_one_to_one_related_row_deleted_becomes_none(rs, sessions, write, profiled, loader):
    people = fresh(sessions, people_query(loader))
    sub = rs.subscribe(people, assocs=["profile"])

    write(sa.delete(Profile))
    people = apply_all(rs, sub, people)

    assert people[0].profile is None
    assert snapshot(people) == snapshot(fresh(sessions, people_query(loader)))


@pytest.mark.parametrize("loader", LOADERS)
def test_one_to_one_related_row_inserted_where_there_was_none(
    rs, sessions, write, profiled, loader
):
    people = fresh(sessions, people_query(loader))
    assert people[1].profile is None
    sub = rs.subscribe(people, assocs=["profile"])

    write(Profile(id=102, person_id=2, bio="first"))
    people = apply_all(rs, sub, people)

    assert people[1].profile.bio == "first"
    assert snapshot(people) == snapshot(fresh(sessions, people_query(loader)))


def test_one_to_one_from_the_other_side(rs, sessions, write, profiled):
    query = sa.select(Profile).options(selectinload(Profile.person).selectinload(Person.profile))
    profiles = fresh(sessions, query)
    sub = rs.subscribe(profiles, assocs=[{"person": ["profile"]}])

    write(sa.update(Person).where(Person.id == 1).values(name="renamed"))
    write(sa.update(Profile).values(person_id=2))
    profiles = apply_all(rs, sub, profiles)

    assert profiles[0].person.name == "b"
    assert snapshot(profiles) == snapshot(fresh(sessions, query))
