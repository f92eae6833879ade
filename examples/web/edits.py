"""The page's edits: each one short transaction through SQLAlchemy, as any application writes.
Nothing here patches a page: the edited rows reach every page (this one too) as diffs of the
live queries, like the writer's changes and psql's.

Each edit returns the key of the element it changes (a suffix of its ``data-key``): the page
times the round trip from the click to the diff naming that key. The rows in the key are
held back from the random writer for ``HOLD`` seconds, so an edit is not undone at once.
"""

from __future__ import annotations

import re
import threading
import time
from typing import TypeVar

import sqlalchemy as sa
from demo_models import Person, Post, Tag
from sqlalchemy.orm import Session

HOLD = 30.0

T = TypeVar("T")


class Edited:
    """The rows edited from a page lately (thread-safe: the writer asks from its thread)."""

    def __init__(self, hold: float = HOLD) -> None:
        self.hold = hold
        self._at: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()

    def mark(self, key: str) -> None:
        """Mark every row named in ``key`` (``post-4/tags/tag-1``: post 4 and tag 1)."""
        now = time.monotonic()
        with self._lock:
            for kind, row_id in re.findall(r"([a-z]+)-(\d+)", key):
                self._at[kind, int(row_id)] = now

    def recent(self, kind: str, row_id: int) -> bool:
        with self._lock:
            at = self._at.get((kind, row_id))
        return at is not None and time.monotonic() - at < self.hold


def rename_person(session: Session, person_id: int, name: str) -> str:
    _get(session, Person, person_id).name = _text(name)
    return f"person-{person_id}"


def add_post(session: Session, person_id: int, title: str) -> str:
    post = Post(title=_text(title), author=_get(session, Person, person_id))
    session.add(post)
    session.flush()
    return f"person-{person_id}/posts/post-{post.id}"


def retitle_post(session: Session, post_id: int, title: str) -> str:
    _get(session, Post, post_id).title = _text(title)
    return f"post-{post_id}"


def delete_post(session: Session, post_id: int) -> str:
    session.delete(_get(session, Post, post_id))
    return f"post-{post_id}"


def tag_post(session: Session, post_id: int, name: str) -> str:
    """Tag the post with the tag of that name, made if there is none."""
    post = _get(session, Post, post_id)
    name = _text(name)
    tag = session.scalar(sa.select(Tag).where(Tag.name == name)) or Tag(name=name)
    if tag not in post.tags:
        post.tags.append(tag)
    session.flush()
    return f"post-{post_id}/tags/tag-{tag.id}"


def untag_post(session: Session, post_id: int, tag_id: int) -> str:
    post = _get(session, Post, post_id)
    post.tags = [tag for tag in post.tags if tag.id != tag_id]
    return f"post-{post_id}/tags/tag-{tag_id}"


def _get(session: Session, model: type[T], row_id: int) -> T:
    found = session.get(model, row_id)
    if found is None:
        raise LookupError(f"{model.__name__.lower()} #{row_id} is gone")
    return found


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a non-empty text is needed")
    return value.strip()
