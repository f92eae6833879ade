"""What the page shows: the demo's two live queries, and their diffs as operations on the
page's elements, each named by a key (its ``data-key``) spelled from the diff's path.

A key names the row and where it sits: ``person-2``, ``person-2/posts/post-4``,
``person-2/posts/post-4/tags/tag-1`` in the people list; ``published/post-4``,
``published/post-4/author/person-2`` in the published one. A post moving to another person
is removed under one key and inserted under another.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from demo_models import Person, Post
from sqlalchemy.orm import Mapper, selectinload

import rowsync
from rowsync import Diff

WATCHERS = rowsync.watchers(Person, [{"posts": ["tags"]}]) + rowsync.watchers(
    Post, ["tags", "author"]
)


class View:
    """One live query shown on the page, in the element whose ``id`` is ``name``."""

    def __init__(self, name: str, statement: sa.Select[Any], prefix: str = "") -> None:
        self.name = name
        self.statement = statement
        self.prefix = prefix
        self.root: Mapper[Any] = sa.inspect(statement.column_descriptions[0]["entity"])

    def op(self, diff: Diff) -> dict[str, Any]:
        """The diff as the page applies it: which element, below which, at which index."""
        data = diff.to_json()
        mapper = self.root
        parts = [_own(mapper, diff.path[0])]
        for name, key in zip(diff.path[1::2], diff.path[2::2], strict=True):
            mapper = mapper.relationships[name].mapper
            parts += [name, _own(mapper, key)]
        return {
            "op": diff.kind,
            "key": self.prefix + "/".join(parts),
            "parent": self.prefix + "/".join(parts[:-2]) if len(parts) > 1 else None,
            "list": parts[-2] if len(parts) > 1 else self.name,
            "index": diff.index,
            "values": data["values"],
        }


def _own(mapper: Mapper[Any], key: tuple[Any, ...]) -> str:
    return "-".join([mapper.class_.__name__.lower(), *map(str, key)])


PEOPLE = View(
    "people",
    sa.select(Person)
    .options(selectinload(Person.posts).selectinload(Post.tags))
    .order_by(Person.id),
)
PUBLISHED = View(
    "published",
    sa.select(Post)
    .where(Post.published)
    .options(selectinload(Post.author), selectinload(Post.tags))
    .order_by(Post.title, Post.id),
    prefix="published/",
)
VIEWS = (PEOPLE, PUBLISHED)
