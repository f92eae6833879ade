"""Alembic revisions that install rowsync's triggers, upgraded and downgraded for real."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import rowsync
from fixtures import reference_watchers
from models import Person
from rowsync import RowSync, Sync
from rowsync.alembic import install_sql
from rowsync.cli import main

ENV_PY = """
import sqlalchemy as sa
from alembic import context

config = context.config
url = config.get_main_option("sqlalchemy.url")

if context.is_offline_mode():
    context.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
"""

HEADER = '''
"""rowsync triggers"""

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None
'''

# What a user writes: the helpers compute the DDL from the app's watchers.
REFERENCE_REVISION = (
    HEADER
    + """
from alembic import op

from fixtures import reference_watchers
from rowsync.alembic import install_sql, uninstall_sql


def upgrade() -> None:
    op.execute(install_sql(reference_watchers()))


def downgrade() -> None:
    op.execute(uninstall_sql(reference_watchers(), drop_schema=True))
"""
)

# The same, with the watchers handed over by the test (config.attributes["watchers"]).
GIVEN_REVISION = (
    HEADER
    + """
from alembic import context, op

from rowsync.alembic import install_sql, uninstall_sql


def upgrade() -> None:
    op.execute(install_sql(context.config.attributes["watchers"]))


def downgrade() -> None:
    op.execute(uninstall_sql(context.config.attributes["watchers"], drop_schema=True))
"""
)


def alembic_env(tmp_path: Path, engine: sa.Engine, revision: str) -> Config:
    """A throwaway Alembic environment in ``tmp_path``: one revision, on ``engine``'s database."""
    (tmp_path / "versions").mkdir()
    (tmp_path / "env.py").write_text(ENV_PY)
    (tmp_path / "versions" / "0001_rowsync.py").write_text(revision)
    config = Config(output_buffer=io.StringIO())
    config.set_main_option("script_location", str(tmp_path))
    url = engine.url.render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def rowsync_objects(engine: sa.Engine) -> tuple[int, int]:
    """How many rowsync triggers and trigger functions the database holds."""
    with engine.connect() as conn:
        trigs = conn.execute(
            sa.text("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'rowsync\\_%'")
        ).scalar()
        funcs = conn.execute(
            sa.text("SELECT count(*) FROM pg_proc WHERE proname LIKE 'rowsync\\_%'")
        ).scalar()
    return int(trigs or 0), int(funcs or 0)


def test_upgrade_installs_the_triggers_and_downgrade_removes_them(schema, tmp_path, write):
    config = alembic_env(tmp_path, schema, REFERENCE_REVISION)
    rs = RowSync(schema, reference_watchers())

    command.upgrade(config, "head")
    status = rs.status()
    assert status.ok
    assert len(status.installed) == len(rs.triggers)
    with rs, rs.subscribe(Person, "inserted") as sub:
        write(Person(id=1, name="a"))
        rs.flush()
        [(marker, change)] = sub.drain()
    assert marker is Sync and change.model is Person and change.ids == {"id": 1}

    command.downgrade(config, "base")
    status = rs.status()
    assert not status.installed and len(status.missing) == len(rs.triggers)
    assert not status.schema_ready
    assert rowsync_objects(schema) == (0, 0)


def test_the_revision_is_a_no_op_where_rowsync_install_already_ran(schema, tmp_path):
    rs = RowSync(schema, reference_watchers())
    rs.install()
    command.upgrade(alembic_env(tmp_path, schema, REFERENCE_REVISION), "head")
    status = rs.status()
    assert status.ok and len(status.installed) == len(rs.triggers)


def test_offline_mode_writes_sql_that_installs_the_same_triggers(schema, tmp_path):
    config = alembic_env(tmp_path, schema, REFERENCE_REVISION)
    command.upgrade(config, "head", sql=True)
    script = config.output_buffer.getvalue()
    assert 'CREATE OR REPLACE TRIGGER "rowsync_ins_posts_' in script
    rs = RowSync(schema, reference_watchers())
    assert not rs.status().ok  # offline mode only wrote SQL
    with rs.connect(autocommit=True) as conn:
        conn.execute(script)
    assert rs.status().ok


class HostileBase(DeclarativeBase):
    pass


class Hostile(HostileBase):
    """A table whose quoted name holds what text() would take for a bind or a format."""

    __tablename__ = 'odd:name "100%" \\:x'
    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str | None] = mapped_column(":colon %s")


def test_hostile_identifiers_pass_through_op_execute_verbatim(engine, tmp_path):
    HostileBase.metadata.create_all(engine)
    watchers = rowsync.watchers(Hostile, extra_columns=[Hostile.note])
    config = alembic_env(tmp_path, engine, GIVEN_REVISION)
    config.attributes["watchers"] = watchers
    rs = RowSync(engine, watchers)

    command.upgrade(config, "head")
    assert rs.status().ok
    with rs, rs.subscribe(Hostile) as sub:
        with engine.begin() as conn:
            conn.execute(sa.insert(Hostile).values(id=7, note="n"))
        rs.flush()
        [(_, change)] = sub.drain()
    assert change.ids == {"id": 7, ":colon %s": "n"}

    command.downgrade(config, "base")
    assert rowsync_objects(engine) == (0, 0)


def test_a_frozen_revision_from_rowsync_sql_alembic_upgrades_and_downgrades(
    schema, tmp_path, capsys
):
    assert main(["--app", "cli_app:watchers", "sql", "--alembic"]) == 0
    body = capsys.readouterr().out
    config = alembic_env(tmp_path, schema, HEADER + body)
    rs = RowSync(schema, reference_watchers())

    command.upgrade(config, "head")
    assert rs.status().ok
    command.downgrade(config, "base")
    assert rowsync_objects(schema) == (0, 0)
    assert rs.status().schema_ready  # the frozen downgrade leaves rowsync's own schema


@pytest.mark.parametrize("target", [[], [42]])
def test_install_sql_rejects_what_is_not_watchers(target):
    with pytest.raises(rowsync.ConfigurationError):
        install_sql(target)
