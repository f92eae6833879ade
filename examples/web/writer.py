"""The web demo's writer: the console demo's random changes, plus (un)publishing a post so that
rows enter and leave the filtered list; switched on and off from the page. It leaves alone
the rows edited from a page lately."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import demo
import sqlalchemy as sa
from demo_models import Post

from .edits import Edited


class Writer(demo.Writer):
    """Commits a random change every ``interval`` seconds while ``enabled`` is set.

    It runs on a thread and a connection of its own, as another process would; each change's
    description goes to ``on_change`` (called on the writer's thread). Rows in ``edited``
    are left alone.
    """

    def __init__(
        self,
        url: sa.URL,
        rng: random.Random,
        interval: float,
        on_change: Callable[[str], None],
        edited: Edited,
    ) -> None:
        super().__init__(url, rng, interval)
        self.name = "web-demo-writer"
        self.enabled = threading.Event()
        self.busy = threading.Lock()
        """Held while a change is made: once ``pause`` returns, no change is under way."""
        self.on_change = on_change
        self.edited = edited
        self.committed: float | None = None
        """When (``time.monotonic()``) its last change was committed: since it runs in the
        server's process, the server can time its changes from commit to page."""

    def run(self) -> None:
        with self.engine.connect() as conn:
            while not self.stopping.wait(self.interval):
                with self.busy:
                    if self.enabled.is_set():
                        description = self.step(conn)
                        self.committed = time.monotonic()
                        self.on_change(description)

    def pause(self) -> None:
        """Switch off, and wait for a change under way to be committed."""
        self.enabled.clear()
        with self.busy:
            pass

    def spares(self, kind: str, row_id: int) -> bool:
        return self.edited.recent(kind, row_id)

    def change(self, conn: sa.Connection) -> str | None:
        if self.rng.random() < 0.25:
            return self.toggle_published(conn)
        return super().change(conn)

    def toggle_published(self, conn: sa.Connection) -> str | None:
        rows = conn.execute(sa.select(Post.id, Post.published))
        posts = [row for row in rows if not self.spares("post", row.id)]
        if not posts:
            return None
        post_id, published = self.rng.choice(posts)
        conn.execute(sa.update(Post).where(Post.id == post_id).values(published=not published))
        return f"post #{post_id} {'unpublished' if published else 'published'}"
