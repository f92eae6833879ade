"""Postgres' ``ORDER BY``, read off SQLAlchemy clauses and applied to values in Python.

Relationships (``relationship(order_by=...)``) and live queries (``select().order_by()``)
both keep rows in the order Postgres would return them, so both read their terms and compare
rows here. A term's NULLs go where Postgres puts them: last ascending, first descending,
unless it says ``NULLS FIRST`` / ``NULLS LAST``.

Python compares two values the way Postgres does only for some types: numbers, booleans,
dates and times, UUIDs, bytes, and text under a code-point collation (``C``). For any other
term (a text column with another collation, an enum, JSON, a type decorator whose Python
values are not the stored ones, an expression of unknown type) :func:`in_python` is false
and the caller lets Postgres order the rows instead. A text column without an explicit
collation is taken to use a code-point one: the database's default collation is not read.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import math
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Final, NamedTuple

import sqlalchemy as sa
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import CollationClause, UnaryExpression


class Term(NamedTuple):
    """One ``ORDER BY`` term, with Postgres' NULLS default made explicit."""

    expr: sa.ColumnElement[Any]
    descending: bool
    nulls_first: bool


_MODIFIERS: Final = (
    operators.desc_op,
    operators.asc_op,
    operators.nulls_first_op,
    operators.nulls_last_op,
)


def term(clause: sa.ColumnElement[Any]) -> Term:
    """The term of one ``ORDER BY`` clause: ``col``, ``col.desc()``,
    ``col.asc().nulls_first()``, ``nulls_last(desc(expr))``..."""
    expr, descending, nulls_first = clause, False, None
    while isinstance(expr, UnaryExpression) and expr.modifier in _MODIFIERS:
        if expr.modifier is operators.desc_op:
            descending = True
        elif nulls_first is None and expr.modifier is not operators.asc_op:
            nulls_first = expr.modifier is operators.nulls_first_op
        expr = expr.element
    return Term(expr, descending, descending if nulls_first is None else nulls_first)


def terms(clauses: Iterable[sa.ColumnElement[Any]] | None) -> tuple[Term, ...]:
    return tuple(term(clause) for clause in clauses or ())


def column(t: Term) -> sa.Column[Any] | None:
    """The table column a term orders by, when it is one (not an expression)."""
    expr = t.expr
    while isinstance(expr, sa.Label):
        expr = expr.element
    return expr if isinstance(expr, sa.Column) else None


_ORDERED: Final = frozenset(
    {
        int,
        float,
        decimal.Decimal,
        bool,
        datetime.date,
        datetime.datetime,
        datetime.time,
        uuid.UUID,
        bytes,
    }
)
"""Python types whose order is Postgres' order for the matching SQL types (``bytea`` and
``uuid`` compare bytewise; NaN is handled by :func:`compare`). Not ``timedelta``: Postgres
counts an interval's month as 30 days and its year as 12 months, psycopg a year as 365 days."""

_CODE_POINT: Final = frozenset({"c", "posix", "c.utf8", "c.utf-8", "ucs_basic", "pg_c_utf8"})
"""Collations ordering text by code point, as Python orders ``str``."""


def in_python(t: Term) -> bool:
    """Whether Python compares this term's values as Postgres orders them."""
    for element in visitors.iterate(t.expr):
        if isinstance(element, CollationClause) and not _code_point(element.collation):
            return False
    type_ = t.expr.type
    if isinstance(type_, (sa.TypeDecorator, sa.Enum, sa.CHAR, sa.ARRAY, sa.JSON, sa.Interval)):
        return False
    try:
        python = type_.python_type
    except NotImplementedError:
        return False
    if python is str:
        return _code_point(getattr(type_, "collation", None))
    return python in _ORDERED


def _code_point(collation: str | None) -> bool:
    return collation is None or collation.strip('"').lower() in _CODE_POINT


def compare(order: Sequence[Term], a: Sequence[Any], b: Sequence[Any]) -> int:
    """Postgres' order of two rows given by their values of ``order``'s terms: -1, 0 or 1.
    Rows it leaves tied (0) are in no particular order in Postgres either."""
    for t, x, y in zip(order, a, b, strict=True):
        if x is None or y is None:
            if x is None and y is None:
                continue
            return (-1 if x is None else 1) * (1 if t.nulls_first else -1)
        if isinstance(x, decimal.Decimal) or isinstance(y, decimal.Decimal):
            result = _compare_values(x, y)  # a Decimal NaN refuses to be ordered
        elif x < y:
            result = -1
        elif y < x:
            result = 1
        else:  # a tie, or a float NaN: neither less nor greater than anything
            result = _compare_values(x, y)
        if result:
            return -result if t.descending else result
    return 0


def _compare_values(x: Any, y: Any) -> int:
    """Two non-NULL values, ascending; NaN sorts after every number and equals NaN."""
    x_nan, y_nan = _nan(x), _nan(y)
    if x_nan or y_nan:
        return int(x_nan) - int(y_nan)
    return -1 if x < y else 1 if y < x else 0


def _nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, decimal.Decimal) and value.is_nan()


def sort_key(order: Sequence[Term]) -> Any:
    """A ``sorted()`` key over tuples of the terms' values."""
    return functools.cmp_to_key(functools.partial(compare, order))
