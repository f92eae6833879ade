"""rowsync's advisory locks: their keys, and who holds one.

Postgres checks no privilege on advisory locks: any role that may connect can take any key,
and ``pg_locks`` shows every held key to every role, so a key of rowsync's can be neither
reserved nor kept secret. A session holding one of rowsync's (a stuck process, or a role
squatting it) would make whoever waits for it wait forever: rowsync waits a bounded time, or
not at all, and then names the holder, so an operator can end that session.
"""

from __future__ import annotations

import hashlib

from psycopg import sql


def key(name: str) -> int:
    """The bigint key of the lock called ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def holder(lock: int) -> sql.Composed:
    """``SELECT application_name, pid, usename`` of the session that holds the advisory lock
    ``lock`` in this database (no row if none does). ``pg_locks`` shows a bigint key as its
    high and low 32 bits, unsigned."""
    bits = lock & 0xFFFF_FFFF_FFFF_FFFF
    return sql.SQL(
        """
SELECT a.application_name, a.pid, a.usename
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = {} AND l.objid::bigint = {}
"""
    ).format(sql.Literal(bits >> 32), sql.Literal(bits & 0xFFFF_FFFF))
