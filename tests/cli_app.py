"""An application module for the CLI tests (``--app cli_app:watchers``; tests/ is on sys.path)."""

from __future__ import annotations

import os

import rowsync
from fixtures import reference_watchers
from models import Post
from rowsync import RowSync

watchers = reference_watchers()

posts_only = rowsync.watchers(Post)
"""A smaller set: installed after ``watchers``, the other tables' triggers become orphans."""

not_watchers = 42


def make_rowsync() -> RowSync:
    """The callable form, returning a RowSync the way an app would build one."""
    return RowSync(os.environ["DATABASE_URL"], reference_watchers(), channel="cli_app")
