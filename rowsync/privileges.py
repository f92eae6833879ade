"""Who may do what with rowsync's own objects: the grants a listener role needs, and checks.

Nothing of rowsync's belongs to PUBLIC (migration 0004): the change log and the parked
events name rows that not every role may read, and the functions move the positions and
the history that listeners rely on. A listener role may read the log and the saved
positions, save positions of its own, prune no further than the installed retention, read
parked events back through a function that checks their seal, and check the seal of an
update's values before (migration 0005); only the triggers seal. Writers need nothing:
the trigger functions run as their owner, and firing a trigger checks no privilege on its
function. Installing, announcing and uninstalling are the owner's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow


@dataclass(frozen=True)
class Grant:
    """One privilege on one of rowsync's objects (``name`` empty: the schema itself)."""

    kind: Literal["SCHEMA", "TABLE", "FUNCTION"]
    name: str
    privilege: str
    args: str = ""
    """A function's argument types, as ``GRANT`` and ``has_function_privilege`` name it."""

    def target(self, schema: str) -> sql.Composable:
        if self.kind == "SCHEMA":
            return sql.Identifier(schema)
        target = sql.Identifier(schema, self.name)
        return sql.SQL("{}({})").format(target, sql.SQL(self.args)) if self.args else target

    def describe(self, schema: str) -> str:
        return f"{self.privilege} on {self.kind.lower()} {self.target(schema).as_string()}"


LISTENER: tuple[Grant, ...] = (
    Grant("SCHEMA", "", "USAGE"),
    Grant("TABLE", "migrations", "SELECT"),
    Grant("TABLE", "log", "SELECT"),
    Grant("TABLE", "log_pruned", "SELECT"),
    Grant("TABLE", "cursors", "SELECT"),
    Grant("FUNCTION", "parked", "EXECUTE", "bigint[], text[], integer"),
    Grant("FUNCTION", "sealed", "EXECUTE", "text[], text[]"),
    Grant("FUNCTION", "save_cursor", "EXECUTE", "text, pg_snapshot"),
    Grant("FUNCTION", "prune_log", "EXECUTE", "interval, integer, pg_snapshot"),
)
"""What a listener role needs of rowsync's, in every capture mode (plus, outside rowsync's
schema, CONNECT on the database and SELECT on the watched tables)."""


def install_statements(
    schema: str, *, listener_roles: Sequence[str] = (), retention: float | None = None
) -> list[sql.Composed]:
    """Grants to each listener role, and the retention no prune may go below (when given)."""
    statements = []
    if retention is not None:
        statements.append(
            sql.SQL("UPDATE {}.settings SET retention = make_interval(secs => {})").format(
                sql.Identifier(schema), sql.Literal(retention)
            )
        )
    for role in listener_roles:
        for grant in LISTENER:
            statements.append(
                sql.SQL("GRANT {} ON {} {} TO {}").format(
                    sql.SQL(grant.privilege),
                    sql.SQL(grant.kind),
                    grant.target(schema),
                    sql.Identifier(role),
                )
            )
    return statements


_PUBLIC = """
SELECT o.what, a.privilege_type
FROM (
    SELECT 'schema ' || quote_ident(n.nspname), coalesce(n.nspacl, acldefault('n', n.nspowner))
    FROM pg_namespace AS n WHERE n.nspname = %(schema)s
    UNION ALL
    SELECT 'relation ' || c.oid::regclass::text,
        coalesce(c.relacl,
            acldefault((CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END)::"char", c.relowner))
    FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
    WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
    UNION ALL
    SELECT 'function ' || p.oid::regprocedure::text, coalesce(p.proacl, acldefault('f', p.proowner))
    FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
    WHERE n.nspname = %(schema)s
) AS o (what, acl), aclexplode(o.acl) AS a
WHERE a.grantee = 0
ORDER BY 1, 2
"""

_HAS = {
    "SCHEMA": "has_schema_privilege",
    "TABLE": "has_table_privilege",
    "FUNCTION": "has_function_privilege",
}


def problems(
    conn: psycopg.Connection[TupleRow], schema: str, listener_roles: Sequence[str]
) -> list[str]:
    """What is wrong with the privileges on an installed schema, one line each: anything
    PUBLIC holds, anything a listener role lacks."""
    found = [
        f"PUBLIC may {privilege} {what}"
        for what, privilege in conn.execute(_PUBLIC, {"schema": schema})
    ]
    for role in listener_roles:
        exists = conn.execute("SELECT FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if exists is None:
            found.append(f"listener role {role!r} does not exist")
            continue
        for grant in LISTENER:
            check = sql.SQL("SELECT {}(%s, %s, %s)").format(sql.Identifier(_HAS[grant.kind]))
            # a schema is named as it is, a table or function as SQL text (quoted)
            target = schema if grant.kind == "SCHEMA" else grant.target(schema).as_string()
            row = conn.execute(check, (role, target, grant.privilege)).fetchone()
            if row is None or not row[0]:
                found.append(f"listener role {role!r} lacks {grant.describe(schema)}")
    return found
