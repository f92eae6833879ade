"""Sensitive and excluded columns are never fetched, cached or patched by rowsync."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

import rowsync
from fixtures import apply_all
from oracle import fresh


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str | None]
    password_hash: Mapped[str | None]
    api_token: Mapped[str | None]
    notes: Mapped[str | None]
    hashtag: Mapped[str | None]  # not sensitive: "hash" is not a word of it
    keys: Mapped[list[Key]] = relationship()


class Key(Base):
    __tablename__ = "keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(sa.ForeignKey("accounts.id"))
    secret: Mapped[str | None]


QUERY = sa.select(Account).options(selectinload(Account.keys))


@pytest.fixture
def accounts(engine, write_to):
    Base.metadata.create_all(engine)
    rs = rowsync.RowSync(
        engine,
        rowsync.watchers(Account, ["keys"]),
        exclude={Account: ["notes"]},
        allow={Account: ["api_token"]},
    )
    rs.install()
    write = write_to(engine)
    write(Account(id=1, email="a@x", password_hash="h1", api_token="t1", notes="n1", hashtag="#1"))
    with rs:
        yield rs, write


def test_withheld_columns_are_never_fetched_cached_or_patched(accounts):
    rs, write = accounts
    accounts_ = fresh(write.sessions, QUERY)
    sub = rs.subscribe(accounts_, assocs=["keys"])

    write(
        sa.update(Account).values(
            email="b@x", password_hash="h2", api_token="t2", notes="n2", hashtag="#2"
        ),
        Key(id=1, account_id=1, secret="s"),
    )
    accounts_ = apply_all(rs, sub, accounts_)

    account = accounts_[0]
    assert (account.email, account.api_token, account.hashtag) == ("b@x", "t2", "#2")
    assert (account.password_hash, account.notes) == ("h1", "n1")  # as loaded, never patched
    assert "secret" not in sa.inspect(account.keys[0]).dict  # a new object: left unloaded
    cached = [row.values for row in rs.cache._data.values() if hasattr(row, "values")]
    assert cached and not any(
        {"password_hash", "notes", "secret"} & set(values) for values in cached
    )


def test_a_withheld_column_cannot_be_an_identifying_one(engine):
    Base.metadata.create_all(engine)
    with pytest.raises(rowsync.ConfigurationError, match="password_hash"):
        rowsync.RowSync(engine, rowsync.watchers(Account, extra_columns=["password_hash"]))
    rowsync.RowSync(
        engine,
        rowsync.watchers(Account, extra_columns=["password_hash"]),
        allow={Account: ["password_hash"]},
    )
