"""Which columns rowsync reads and keeps: every column but those excluded and those whose
names look sensitive (password, secret, token, API key…), unless explicitly allowed.

Withheld columns are never fetched, cached or patched; objects rowsync builds have them
unloaded (deferred), and a tree keeps whatever value it loaded itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapper, defer
from sqlalchemy.orm.strategy_options import _AbstractLoad

from rowsync.errors import ConfigurationError

SENSITIVE = re.compile(
    r"(^|_)(pass|password|passwd|passphrase|pwd|secrets?|tokens?|api_?key|private_?key"
    r"|credentials?|salt|otp|hash)(_|$)",
    re.IGNORECASE,
)
"""A column name made of ``_``-separated words, one of which is one of these."""

ColumnsArg = Mapping[Any, Iterable[Any]]
"""``{Model or Table: [column names or attributes]}``."""


class ColumnPolicy:
    """What may be read of each table; built once from ``RowSync(exclude=..., allow=...)``."""

    def __init__(self, exclude: ColumnsArg | None = None, allow: ColumnsArg | None = None) -> None:
        self._exclude = _by_table(exclude)
        self._allow = _by_table(allow)
        self.withheld = cache(self._withheld)

    def _withheld(self, table: sa.Table) -> frozenset[str]:
        allowed = self._allow.get(table, frozenset())
        return frozenset(
            c.name
            for c in table.columns
            if (c.name in self._exclude.get(table, ()) or SENSITIVE.search(c.name))
            and c.name not in allowed
        )

    def columns(self, table: sa.Table) -> list[sa.Column[Any]]:
        """The columns rowsync may select from ``table``."""
        withheld = self.withheld(table)
        return [c for c in table.columns if c.name not in withheld]

    def defer(self, mapper: Mapper[Any], entity: Any = None) -> list[_AbstractLoad]:
        """ORM options leaving the withheld columns of ``mapper`` (of each of its tables)
        unloaded, for ``entity`` (an alias of ``mapper``; default: its class)."""
        entity = mapper.class_ if entity is None else entity
        return [
            defer(getattr(entity, prop.key))
            for prop in mapper.column_attrs
            if any(
                isinstance(c, sa.Column)
                and isinstance(c.table, sa.Table)
                and c.name in self.withheld(c.table)
                for c in prop.columns
            )
        ]

    def check(self, table: sa.Table, identifying: Iterable[str]) -> None:
        """Identifying columns travel in every notification: none may be withheld."""
        if clash := sorted(set(identifying) & self.withheld(table)):
            raise ConfigurationError(
                f"{table.name}.{', '.join(clash)} would travel in notifications but is withheld "
                "(excluded, or a sensitive name): allow it explicitly, or do not watch it"
            )


def _by_table(arg: ColumnsArg | None) -> dict[sa.Table, frozenset[str]]:
    result: dict[sa.Table, frozenset[str]] = {}
    for model, columns in (arg or {}).items():
        table = model if isinstance(model, sa.Table) else sa.inspect(model).local_table
        names = frozenset(c if isinstance(c, str) else c.property.columns[0].name for c in columns)
        for name in names:
            if name not in table.c:
                raise ConfigurationError(f"{table.name!r} has no column {name!r}")
        result[table] = names
    return result
