"""Inheritance: a row's identity is its hierarchy's (base table, primary key), whichever table
of the hierarchy changed, and its class is what its discriminator says.

Joined-table (JTI): ``employee`` is the base table, ``engineer`` and ``manager`` hold the
subclass columns (loaded inline, so a query of the base loads every column of each row's
class, as rowsync loads new objects). Single-table (STI): ``worker`` holds clerks and bosses.
Joined-table loaded when asked: ``vehicle`` and ``truck`` (a truck's own columns are loaded
only through ``with_polymorphic``/``of_type``; a query of the base leaves them unloaded).
Every check applies each delivered message and compares with a fresh query of the same
statement (the snapshot compares classes too).
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    mapped_column,
    relationship,
    selectinload,
    with_polymorphic,
)

import rowsync
from fixtures import apply_all
from oracle import differences, fresh, snapshot


class Base(DeclarativeBase):
    pass


class Company(Base):
    __tablename__ = "company"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None]
    employees: Mapped[list[Employee]] = relationship(order_by="Employee.id")


class Employee(Base):
    __tablename__ = "employee"
    id: Mapped[int] = mapped_column(primary_key=True)
    type: Mapped[str]
    name: Mapped[str | None]
    company_id: Mapped[int | None] = mapped_column(sa.ForeignKey("company.id"))
    __mapper_args__ = {"polymorphic_on": "type", "polymorphic_identity": "employee"}


class Engineer(Employee):
    __tablename__ = "engineer"
    id: Mapped[int] = mapped_column(
        sa.ForeignKey("employee.id", ondelete="CASCADE"), primary_key=True
    )
    language: Mapped[str | None]
    machines: Mapped[list[Machine]] = relationship(order_by="Machine.id")
    __mapper_args__ = {"polymorphic_identity": "engineer", "polymorphic_load": "inline"}


class Machine(Base):
    __tablename__ = "machine"
    id: Mapped[int] = mapped_column(primary_key=True)
    engineer_id: Mapped[int | None] = mapped_column(sa.ForeignKey("engineer.id"))


class Manager(Employee):
    __tablename__ = "manager"
    id: Mapped[int] = mapped_column(
        sa.ForeignKey("employee.id", ondelete="CASCADE"), primary_key=True
    )
    budget: Mapped[int | None]
    __mapper_args__ = {"polymorphic_identity": "manager", "polymorphic_load": "inline"}


class Project(Base):
    __tablename__ = "project"
    id: Mapped[int] = mapped_column(primary_key=True)
    lead_id: Mapped[int | None] = mapped_column(sa.ForeignKey("engineer.id"))
    lead: Mapped[Engineer | None] = relationship()


class Shop(Base):
    __tablename__ = "shop"
    id: Mapped[int] = mapped_column(primary_key=True)
    staff: Mapped[list[Worker]] = relationship(order_by="Worker.id")
    bosses: Mapped[list[Boss]] = relationship(order_by="Boss.id", viewonly=True)


class Worker(Base):
    __tablename__ = "worker"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str]
    name: Mapped[str | None]
    level: Mapped[int | None]
    shop_id: Mapped[int | None] = mapped_column(sa.ForeignKey("shop.id"))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "worker"}


class Clerk(Worker):
    __mapper_args__ = {"polymorphic_identity": "clerk"}


class Boss(Worker):
    __mapper_args__ = {"polymorphic_identity": "boss"}


class Task(Base):
    __tablename__ = "task"
    id: Mapped[int] = mapped_column(primary_key=True)
    boss_id: Mapped[int | None] = mapped_column(sa.ForeignKey("worker.id"))
    boss: Mapped[Boss | None] = relationship()


class Garage(Base):
    __tablename__ = "garage"
    id: Mapped[int] = mapped_column(primary_key=True)
    vehicles: Mapped[list[Vehicle]] = relationship(order_by="Vehicle.id")


class Vehicle(Base):
    __tablename__ = "vehicle"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str]
    garage_id: Mapped[int | None] = mapped_column(sa.ForeignKey("garage.id"))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "vehicle"}


class Truck(Vehicle):
    __tablename__ = "truck"
    truck_id: Mapped[int] = mapped_column(
        "id", sa.ForeignKey("vehicle.id", ondelete="CASCADE"), primary_key=True
    )
    payload: Mapped[int | None]
    __mapper_args__ = {"polymorphic_identity": "truck"}


@pytest.fixture
def db(engine: sa.Engine, write_to: Any) -> Any:
    Base.metadata.create_all(engine)
    return write_to(engine)


@pytest.fixture
def rs(db: Any, engine: sa.Engine) -> Any:
    instance = rowsync.RowSync(
        engine,
        rowsync.watchers(Company, [{"employees": ["machines"]}])
        + rowsync.watchers(Project, ["lead"])
        + rowsync.watchers(Shop, ["staff", "bosses"])
        + rowsync.watchers(Task, ["boss"])
        + rowsync.watchers(Garage, ["vehicles"])
        + rowsync.watchers(Employee)
        + rowsync.watchers(Worker),
    )
    instance.install()
    with instance:
        yield instance


def check(rs: Any, db: Any, statement: sa.Select[Any], value: Any, sub: Any) -> Any:
    """Apply every message, then compare with a fresh query of ``statement``."""
    value = apply_all(rs, sub, value)
    expected = fresh(db.sessions, statement)
    assert differences(snapshot(value), snapshot(expected)) == []
    return value


COMPANIES = sa.select(Company).order_by(Company.id).options(selectinload(Company.employees))
EMPLOYEES = sa.select(Employee).order_by(Employee.id)
ENGINEERS = sa.select(Engineer).order_by(Engineer.id)
WITH_MACHINES = (
    sa.select(Company)
    .order_by(Company.id)
    .options(selectinload(Company.employees.of_type(Engineer)).selectinload(Engineer.machines))
)
PROJECTS = sa.select(Project).order_by(Project.id).options(selectinload(Project.lead))
SHOPS = sa.select(Shop).options(selectinload(Shop.staff), selectinload(Shop.bosses))
WORKERS = sa.select(Worker).order_by(Worker.id)
BOSSES = sa.select(Boss).order_by(Boss.id)
TASKS = sa.select(Task).order_by(Task.id).options(selectinload(Task.boss))


def companies(db: Any) -> None:
    db(
        Company(id=1, name="one"),
        Company(id=2, name="two"),
        Employee(id=1, name="e", company_id=1),
        Engineer(id=2, name="g", language="py", company_id=1),
        Manager(id=3, name="m", budget=10, company_id=2),
    )


def shops(db: Any) -> None:
    db(
        Shop(id=1),
        Shop(id=2),
        Worker(id=1, name="w", shop_id=1),
        Clerk(id=2, name="c", shop_id=1),
        Boss(id=3, name="b", level=1, shop_id=2),
    )


# -- joined-table inheritance -----------------------------------------------------------


def test_base_table_update_of_a_subclass_row_reaches_its_collection(rs, db):
    companies(db)
    rs.flush()
    value = fresh(db.sessions, COMPANIES)
    sub = rs.subscribe(value, assocs=["employees"])

    db(sa.update(Employee).where(Employee.id == 2).values(name="renamed"))

    check(rs, db, COMPANIES, value, sub)


def test_subclass_table_update_reaches_its_collection(rs, db):
    companies(db)
    rs.flush()
    value = fresh(db.sessions, COMPANIES)
    sub = rs.subscribe(value, assocs=["employees"])

    db(sa.update(Engineer.__table__).where(Engineer.__table__.c.id == 2).values(language="go"))

    value = check(rs, db, COMPANIES, value, sub)
    assert value[0].employees[1].language == "go"


def test_subclass_row_moved_to_another_parent_moves_as_its_class(rs, db):
    companies(db)
    rs.flush()
    value = fresh(db.sessions, COMPANIES)
    sub = rs.subscribe(value, assocs=["employees"])

    db(sa.update(Employee).where(Employee.id == 2).values(company_id=2))

    value = check(rs, db, COMPANIES, value, sub)
    assert [type(e) for e in value[1].employees] == [Engineer, Manager]


def test_subclass_row_deleted_leaves_its_collection(rs, db):
    companies(db)
    rs.flush()
    value = fresh(db.sessions, COMPANIES)
    sub = rs.subscribe(value, assocs=["employees"])

    with db.sessions() as session, session.begin():
        session.delete(session.get(Engineer, 2))

    check(rs, db, COMPANIES, value, sub)


def test_new_subclass_row_joins_a_collection_as_its_class_with_every_column(rs, db):
    companies(db)
    rs.flush()
    value = fresh(db.sessions, COMPANIES)
    sub = rs.subscribe(value, assocs=["employees"])

    db(Engineer(id=4, name="n", language="rust", company_id=1))

    value = check(rs, db, COMPANIES, value, sub)
    assert value[0].employees[-1].language == "rust"


def test_new_subclass_row_joins_a_base_class_root_list(rs, db):
    companies(db)
    rs.flush()
    value = fresh(db.sessions, EMPLOYEES)
    sub = rs.subscribe(value).add(Employee, "inserted", follow=True)

    db(Engineer(id=4, name="n", language="rust"), Manager(id=5, name="o", budget=3))

    value = check(rs, db, EMPLOYEES, value, sub)
    assert [type(e) for e in value[-2:]] == [Engineer, Manager]


def test_a_subclass_root_list_gains_only_rows_of_its_class(rs, db):
    companies(db)
    rs.flush()
    value = fresh(db.sessions, ENGINEERS)
    sub = rs.subscribe(value).add(Engineer, "inserted", follow=True)

    db(Engineer(id=4, name="n", language="rust"), Manager(id=5, name="o", budget=3))
    value = check(rs, db, ENGINEERS, value, sub)
    db(sa.update(Employee).where(Employee.id == 4).values(name="renamed"))
    db(sa.update(Engineer.__table__).where(Engineer.__table__.c.id == 4).values(language="c"))

    value = check(rs, db, ENGINEERS, value, sub)
    assert [e.id for e in value] == [2, 4]


def test_subclass_root_list_follows_both_tables_of_its_rows(rs, db):
    companies(db)
    rs.flush()
    value = fresh(db.sessions, ENGINEERS)
    sub = rs.subscribe(value)

    db(sa.update(Employee).where(Employee.id == 2).values(name="renamed"))
    db(sa.update(Engineer.__table__).where(Engineer.__table__.c.id == 2).values(language="c"))

    check(rs, db, ENGINEERS, value, sub)


def test_many_to_one_to_a_subclass_follows_the_key_and_both_tables(rs, db):
    companies(db)
    db(Engineer(id=4, name="n", language="rust"), Project(id=1, lead_id=2))
    rs.flush()
    value = fresh(db.sessions, PROJECTS)
    sub = rs.subscribe(value, assocs=["lead"])

    db(sa.update(Employee).where(Employee.id == 2).values(name="renamed"))
    value = check(rs, db, PROJECTS, value, sub)
    db(sa.update(Project).values(lead_id=4))
    value = check(rs, db, PROJECTS, value, sub)
    db(sa.update(Engineer.__table__).where(Engineer.__table__.c.id == 4).values(language="c"))

    value = check(rs, db, PROJECTS, value, sub)
    assert value[0].lead.language == "c"


def test_with_polymorphic_root_list_gains_rows_as_their_class(rs, db):
    companies(db)
    rs.flush()
    every = with_polymorphic(Employee, "*")
    statement = sa.select(every).order_by(every.id)
    value = fresh(db.sessions, statement)
    sub = rs.subscribe(value).add(Employee, "inserted", follow=True)

    db(Engineer(id=4, name="n", language="rust"))
    value = check(rs, db, statement, value, sub)
    db(sa.update(Engineer.__table__).where(Engineer.__table__.c.id == 4).values(language="c"))

    value = check(rs, db, statement, value, sub)
    assert type(value[-1]) is Engineer


def test_a_row_that_becomes_a_subclass_row_is_replaced_by_an_object_of_that_class(rs, db):
    companies(db)
    rs.flush()
    value = fresh(db.sessions, COMPANIES)
    sub = rs.subscribe(value, assocs=["employees"])
    employees = fresh(db.sessions, EMPLOYEES)
    employees_sub = rs.subscribe(employees)

    db(
        sa.update(Employee).where(Employee.id == 1).values(type="engineer"),
        sa.insert(Engineer.__table__).values(id=1, language="ml"),
    )

    value = check(rs, db, COMPANIES, value, sub)
    assert type(value[0].employees[0]) is Engineer
    check(rs, db, EMPLOYEES, employees, employees_sub)


def test_a_row_deleted_from_a_subclass_root_list_leaves_it(rs, db):
    companies(db)
    db(Engineer(id=4, name="n", language="rust"))
    rs.flush()
    value = fresh(db.sessions, ENGINEERS)
    sub = rs.subscribe(value)

    with db.sessions() as session, session.begin():
        session.delete(session.get(Engineer, 2))

    assert [e.id for e in check(rs, db, ENGINEERS, value, sub)] == [4]


def test_a_row_deleted_from_a_base_root_list_leaves_it(rs, db):
    companies(db)
    rs.flush()
    value = fresh(db.sessions, EMPLOYEES)
    sub = rs.subscribe(value)

    with db.sessions() as session, session.begin():
        session.delete(session.get(Manager, 3))

    check(rs, db, EMPLOYEES, value, sub)


def test_of_type_path_loads_a_subclass_relationship_on_new_and_moved_rows(rs, db):
    companies(db)
    db(Machine(id=1, engineer_id=2))
    rs.flush()
    value = fresh(db.sessions, WITH_MACHINES)
    sub = rs.subscribe(value, assocs=[{"employees": ["machines"]}])

    db(Engineer(id=4, name="n", language="rust", company_id=2), Machine(id=2, engineer_id=4))
    value = check(rs, db, WITH_MACHINES, value, sub)
    db(sa.update(Employee).where(Employee.id == 2).values(company_id=2))
    value = check(rs, db, WITH_MACHINES, value, sub)
    db(Machine(id=3, engineer_id=2), Manager(id=5, name="p", company_id=2))

    value = check(rs, db, WITH_MACHINES, value, sub)
    assert [m.id for m in value[1].employees[0].machines] == [1, 3]


def test_with_polymorphic_loader_path_keeps_subclass_columns_current(rs, db):
    companies(db)
    rs.flush()
    every = with_polymorphic(Employee, "*")
    statement = (
        sa.select(Company)
        .order_by(Company.id)
        .options(selectinload(Company.employees.of_type(every)))
    )
    value = fresh(db.sessions, statement)
    sub = rs.subscribe(value, assocs=["employees"])

    db(Manager(id=4, name="q", budget=7, company_id=1))
    value = check(rs, db, statement, value, sub)
    db(sa.update(Manager.__table__).where(Manager.__table__.c.id == 4).values(budget=8))

    value = check(rs, db, statement, value, sub)
    assert value[0].employees[-1].budget == 8


def test_watchers_of_a_subclass_cover_every_table_of_its_hierarchy_and_its_discriminator():
    found = {(w.table, w.event): w.columns for w in rowsync.watchers(Engineer)}

    assert {table for table, _ in found} == {"employee", "engineer", "manager"}
    assert "type" in found[("employee", "updated")]


# -- single-table inheritance -----------------------------------------------------------


def test_inserted_rows_join_a_collection_as_their_class(rs, db):
    shops(db)
    rs.flush()
    value = fresh(db.sessions, SHOPS)
    sub = rs.subscribe(value, assocs=["staff", "bosses"])

    db(Boss(id=4, name="n", level=2, shop_id=1), Clerk(id=5, name="k", shop_id=1))

    value = check(rs, db, SHOPS, value, sub)
    assert [type(w) for w in value[0].staff] == [Worker, Clerk, Boss, Clerk]


def test_inserted_rows_join_a_base_root_list_as_their_class(rs, db):
    shops(db)
    rs.flush()
    value = fresh(db.sessions, WORKERS)
    sub = rs.subscribe(value).add(Worker, "inserted", follow=True)

    db(Boss(id=4, name="n", level=2), Clerk(id=5, name="k"))

    check(rs, db, WORKERS, value, sub)


def test_a_followed_subclass_root_list_gains_only_its_class(rs, db):
    shops(db)
    rs.flush()
    value = fresh(db.sessions, BOSSES)
    sub = rs.subscribe(value).add(Boss, "inserted", follow=True)

    db(Boss(id=4, name="n", level=2), Clerk(id=5, name="k"))
    value = check(rs, db, BOSSES, value, sub)
    db(sa.update(Worker).where(Worker.id == 5).values(name="renamed"))

    assert rs.flush() is None and sub.drain() == []
    assert [b.id for b in value] == [3, 4]


def test_discriminator_change_replaces_the_object_in_every_place(rs, db):
    shops(db)
    db(Task(id=1, boss_id=3))
    rs.flush()
    shops_value = fresh(db.sessions, SHOPS)
    shops_sub = rs.subscribe(shops_value, assocs=["staff", "bosses"])
    workers = fresh(db.sessions, WORKERS)
    workers_sub = rs.subscribe(workers)
    tasks = fresh(db.sessions, TASKS)
    tasks_sub = rs.subscribe(tasks, assocs=["boss"])

    db(sa.update(Worker).where(Worker.id == 2).values(kind="boss", shop_id=2))
    db(sa.update(Worker).where(Worker.id == 3).values(kind="clerk"))

    check(rs, db, SHOPS, shops_value, shops_sub)
    workers = check(rs, db, WORKERS, workers, workers_sub)
    assert [type(w) for w in workers] == [Worker, Boss, Clerk]
    tasks = check(rs, db, TASKS, tasks, tasks_sub)
    assert tasks[0].boss is None


def test_discriminator_change_leaves_a_subclass_root_list(rs, db):
    shops(db)
    rs.flush()
    value = fresh(db.sessions, BOSSES)
    sub = rs.subscribe(value)

    db(sa.update(Worker).where(Worker.id == 3).values(kind="clerk"))

    assert check(rs, db, BOSSES, value, sub) == []


def test_discriminator_change_to_its_class_joins_a_followed_subclass_root_list(rs, db):
    shops(db)
    rs.flush()
    value = fresh(db.sessions, BOSSES)
    sub = rs.subscribe(value).add(Boss, follow=True)

    db(sa.update(Worker).where(Worker.id == 2).values(kind="boss"))
    value = check(rs, db, BOSSES, value, sub)
    db(sa.update(Worker).where(Worker.id == 2).values(level=5))

    value = check(rs, db, BOSSES, value, sub)
    assert sorted((b.id, type(b), b.level) for b in value) == [(2, Boss, 5), (3, Boss, 1)]


def test_row_moved_between_parents_and_deleted_leaves_each_place(rs, db):
    shops(db)
    rs.flush()
    value = fresh(db.sessions, SHOPS)
    sub = rs.subscribe(value, assocs=["staff", "bosses"])

    db(sa.update(Worker).where(Worker.id == 3).values(shop_id=1))
    value = check(rs, db, SHOPS, value, sub)
    db(sa.delete(Worker).where(Worker.id == 3))

    check(rs, db, SHOPS, value, sub)


def test_resync_reads_roots_as_the_class_they_have_now(rs, db):
    shops(db)
    workers = fresh(db.sessions, WORKERS)
    bosses = fresh(db.sessions, BOSSES)

    db(sa.update(Worker).where(Worker.id == 2).values(kind="boss"))
    db(sa.update(Worker).where(Worker.id == 3).values(kind="clerk"))

    assert snapshot(rs.resync(workers)) == snapshot(fresh(db.sessions, WORKERS))
    assert rs.resync(bosses) == []  # 3 is a clerk now (2 is a row this list never held)


def test_resync_loads_joined_subclass_columns_below_the_roots_as_of_type_did(rs, db):
    db(Garage(id=1), Vehicle(id=1, garage_id=1), Truck(id=2, payload=5, garage_id=1))
    trucks = with_polymorphic(Vehicle, [Truck])
    statement = sa.select(Garage).options(selectinload(Garage.vehicles.of_type(trucks)))
    garages = fresh(db.sessions, statement)

    db(sa.update(Truck).values(payload=6))
    garages = rs.resync(garages)

    assert differences(snapshot(garages), snapshot(fresh(db.sessions, statement))) == []
    assert garages[0].vehicles[1].payload == 6  # loaded: the tree is detached


def test_resync_loads_a_subclass_relationship_below_the_roots(rs, db):
    companies(db)
    db(Machine(id=1, engineer_id=2))
    value = fresh(db.sessions, WITH_MACHINES)

    db(Machine(id=2, engineer_id=2))
    value = rs.resync(value)

    assert differences(snapshot(value), snapshot(fresh(db.sessions, WITH_MACHINES))) == []
    assert [m.id for m in value[0].employees[1].machines] == [1, 2]


def test_a_loaded_subclass_statement_keeps_its_rows_and_classes(rs, db):
    shops(db)
    db(Boss(id=4, name="n", level=2))
    rs.flush()
    statement = BOSSES.where(Worker.level < 5)
    with db.sessions() as session:
        value, sub = rs.load(session, statement)

    db(sa.update(Worker).where(Worker.id == 2).values(kind="boss", level=1))
    db(sa.update(Worker).where(Worker.id == 3).values(kind="clerk"))
    db(sa.update(Worker).where(Worker.id == 4).values(level=7), Clerk(id=5, level=1))

    value = check(rs, db, statement, value, sub)
    assert [(type(b), b.id) for b in value] == [(Boss, 2)]


def test_a_loaded_joined_subclass_statement_follows_its_base_table(rs, db):
    companies(db)
    rs.flush()
    statement = ENGINEERS.where(Employee.name != "hidden")
    with db.sessions() as session:
        value, sub = rs.load(session, statement)

    db(Engineer(id=4, name="n", language="rust"), Manager(id=5, name="o", budget=3))
    db(sa.update(Employee).where(Employee.id == 2).values(name="hidden"))
    db(sa.update(Engineer.__table__).where(Engineer.__table__.c.id == 4).values(language="c"))

    value = check(rs, db, statement, value, sub)
    assert [(e.id, e.language) for e in value] == [(4, "c")]


def test_many_to_one_to_a_subclass_follows_its_key(rs, db):
    shops(db)
    db(Boss(id=4, name="n", level=2), Task(id=1, boss_id=3), Task(id=2, boss_id=2))
    rs.flush()
    value = fresh(db.sessions, TASKS)
    sub = rs.subscribe(value, assocs=["boss"])

    db(sa.update(Task).where(Task.id == 1).values(boss_id=4))
    value = check(rs, db, TASKS, value, sub)
    db(sa.update(Worker).where(Worker.id == 4).values(level=9))

    value = check(rs, db, TASKS, value, sub)
    assert value[0].boss.level == 9


# -- what rowsync refuses ---------------------------------------------------------------


def test_a_live_query_over_an_inheritance_hierarchy_is_refused_naming_it(rs, db):
    with pytest.raises(rowsync.ConfigurationError, match=r"inheritance hierarchy \(Employee\)"):
        rs.live(db.sessions, COMPANIES)


def test_concrete_inheritance_is_refused_naming_it():
    class Other(DeclarativeBase):
        pass

    class Animal(Other):
        __tablename__ = "animal"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Dog(Animal):
        __tablename__ = "dog"
        id: Mapped[int] = mapped_column(primary_key=True)
        __mapper_args__ = {"concrete": True}

    with pytest.raises(rowsync.ConfigurationError, match="concrete"):
        rowsync.watchers(Dog)
