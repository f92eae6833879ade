"""Composite primary and foreign keys: routing, batched fetches and sync match on every
column of the key, through a one-to-many, its many-to-one, and an association table."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

import rowsync
from fixtures import apply_all
from oracle import fresh, snapshot


class Base(DeclarativeBase):
    pass


order_labels = sa.Table(
    "order_labels",
    Base.metadata,
    sa.Column("region", sa.String, primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("label_id", sa.ForeignKey("labels_ck.id", ondelete="CASCADE"), primary_key=True),
    sa.ForeignKeyConstraint(
        ["region", "number"], ["orders.region", "orders.number"], ondelete="CASCADE"
    ),
)


class Order(Base):
    __tablename__ = "orders"
    region: Mapped[str] = mapped_column(primary_key=True)
    number: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str | None]
    lines: Mapped[list[Line]] = relationship(back_populates="order", order_by="Line.position")
    labels: Mapped[list[LabelCK]] = relationship(secondary=order_labels)


class Line(Base):
    __tablename__ = "lines"
    region: Mapped[str] = mapped_column(primary_key=True)
    number: Mapped[int] = mapped_column(primary_key=True)
    position: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str | None]
    order: Mapped[Order] = relationship(back_populates="lines")
    __table_args__ = (
        sa.ForeignKeyConstraint(
            ["region", "number"], ["orders.region", "orders.number"], ondelete="CASCADE"
        ),
    )


class LabelCK(Base):
    __tablename__ = "labels_ck"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None]


QUERY = sa.select(Order).options(selectinload(Order.lines), selectinload(Order.labels))


def test_composite_keys_route_fetch_and_sync_on_every_column(engine, write_to):
    Base.metadata.create_all(engine)
    rs = rowsync.RowSync(engine, rowsync.watchers(Order, ["lines", "labels"]))
    rs.install()
    write = write_to(engine)
    write(
        Order(region="eu", number=1),
        Order(region="us", number=1),
        Line(region="eu", number=1, position=2, item="b"),
        LabelCK(id=1, name="x"),
    )
    with rs:
        sessions = write.sessions
        orders = fresh(sessions, QUERY)
        sub = rs.subscribe(orders, assocs=["lines", "labels"])

        write(
            Line(region="eu", number=1, position=1, item="a"),  # same number, other region: no
            Line(region="us", number=1, position=1, item="c"),
            order_labels.insert().values(region="us", number=1, label_id=1),
        )
        write(sa.update(Line).where(Line.position == 2).values(item="B"))
        orders = apply_all(rs, sub, orders)
        assert snapshot(orders) == snapshot(fresh(sessions, QUERY))
        by_region = {o.region: o for o in orders}
        assert [ln.item for ln in by_region["eu"].lines] == ["a", "B"]
        assert [ln.item for ln in by_region["us"].lines] == ["c"]
        assert [lb.id for lb in by_region["us"].labels] == [1]

        write(sa.delete(Order).where(Order.region == "eu"))
        orders = apply_all(rs, sub, orders)
        assert snapshot(orders) == snapshot(fresh(sessions, QUERY))
        assert [o.region for o in orders] == ["us"]
