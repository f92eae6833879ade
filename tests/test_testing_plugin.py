"""rowsync's pytest plugin, as an application's test suite uses it: pytester runs small
user test files against the real Postgres (``$ROWSYNC_TEST_DSN``, exported by ``make test``).
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester"]

MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import rowsync


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    notes: Mapped[list["Note"]] = relationship(order_by="Note.id")


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("authors.id"))
"""

CONFTEST = """
import pytest

import rowsync
from notes_app import Author


@pytest.fixture
def rowsync_watchers():
    return rowsync.watchers(Author, assocs=["notes"])
"""

USER_TESTS = """
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload

from notes_app import Author, Note


def test_wait_for_returns_the_change_a_write_made(rowsync_app, rowsync_engine, rowsync_wait_for):
    with Session(rowsync_engine) as session, session.begin():
        session.add(Author(id=1, name="Ada"))
        session.add(Note(id=7, text="hi", author_id=1))

    change = rowsync_wait_for(Note, "inserted", author_id=1)

    assert (change.model, change.event, change.ids) == (Note, "inserted", {"id": 7, "author_id": 1})
    assert rowsync_wait_for(Author, id=1).event == "inserted"


def test_a_loaded_tree_is_kept_current(rowsync_app, rowsync_engine):
    with Session(rowsync_engine) as session, session.begin():
        session.add(Author(id=1, name="Ada"))
    with Session(rowsync_engine) as session:
        authors = list(session.scalars(sa.select(Author).options(selectinload(Author.notes))))
    sub = rowsync_app.subscribe(authors, assocs=["notes"])
    with Session(rowsync_engine) as session, session.begin():
        session.add(Note(id=1, text="hi", author_id=1))
    rowsync_app.flush()
    for message in sub.drain():
        authors = rowsync_app.sync(authors, message)
    assert [n.text for n in authors[0].notes] == ["hi"]


def test_each_test_has_a_database_of_its_own(rowsync_engine, rowsync_dsn):
    with rowsync_engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(Author)) == 0
        assert conn.scalar(sa.text("SELECT current_database()")) == rowsync_dsn.rsplit("/", 1)[1]


def test_the_app_is_installed_and_started(rowsync_app):
    assert rowsync_app.status().ok and rowsync_app.running


def test_wait_for_says_what_arrived_when_nothing_matches(rowsync_engine, rowsync_wait_for):
    with Session(rowsync_engine) as session, session.begin():
        session.add(Author(id=1, name="Ada"))
    with pytest.raises(TimeoutError, match="no notes deleted .* pending: authors inserted id=1"):
        rowsync_wait_for(Note, "deleted", timeout=0.5)
"""


DURABLE_TESTS = """
from sqlalchemy.orm import Session

import pytest

from notes_app import Author


@pytest.fixture
def rowsync_options():
    return {"capture": "durable"}


def test_options_are_passed_to_the_app(rowsync_app, rowsync_engine, rowsync_wait_for):
    assert rowsync_app.capture == "durable"
    with Session(rowsync_engine) as session, session.begin():
        session.add(Author(id=2, name="Bob"))
    assert rowsync_wait_for(Author, "inserted", id=2).ids == {"id": 2}
"""


@pytest.fixture
def app_suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(
        notes_app=MODELS, conftest=CONFTEST, test_app=USER_TESTS, test_durable_app=DURABLE_TESTS
    )
    return pytester


def test_an_application_suite_uses_the_fixtures_against_postgres(app_suite):
    # A separate interpreter: the plugin is found through its pytest11 entry point.
    result = app_suite.runpytest_subprocess("-p", "no:cacheprovider")

    result.assert_outcomes(passed=6)


def test_the_server_can_come_from_the_ini_file(app_suite, monkeypatch):
    server = os.environ.get("ROWSYNC_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    monkeypatch.delenv("ROWSYNC_TEST_DSN", raising=False)
    app_suite.makeini(f"[pytest]\nrowsync_test_dsn = {server}\n")

    result = app_suite.runpytest("-p", "no:cacheprovider", "-k", "its_own or installed")

    result.assert_outcomes(passed=2)


def test_without_watchers_the_fixtures_say_what_to_define(pytester):
    pytester.makepyfile("def test_it(rowsync_app):\n    pass\n")

    result = pytester.runpytest("-p", "no:cacheprovider")

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*define a `rowsync_watchers` fixture in conftest.py*"])


def test_a_suite_that_does_not_use_the_fixtures_needs_no_database(pytester, monkeypatch):
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def engine():
            return "the suite's own"

        def test_it(engine):
            assert engine == "the suite's own"
        """
    )
    monkeypatch.setenv("ROWSYNC_TEST_DSN", "postgresql://nobody@unreachable.invalid/none")

    result = pytester.runpytest("-p", "no:cacheprovider")

    result.assert_outcomes(passed=1)
