"""One page's feed of one view: a live query (``rs.live``) opened when the page connects, its
whole tree sent once, then each batch of diffs as it is applied. The page's list is never
queried again; rowsync keeps the tree current in the background.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from rowsync import LiveQuery, RowSync, RowsyncError

from .view import View

logger = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]


async def stream(rs: RowSync, sessions: sessionmaker[Session], view: View, send: Send) -> None:
    """Send ``view``'s tree, then its diffs, until the page goes (this task is cancelled).

    If the live query loses its tree (rowsync could not apply a change, nor run the query
    again), the page is told it is resyncing and gets the tree of a new live query.
    """
    while True:
        live = await _open(rs, sessions, view)
        try:
            kind = "snapshot"  # the first batch: the whole tree, as inserted diffs
            async for diffs in live.changes(initial=True):
                ops = [view.op(diff) for diff in diffs]
                await send({"type": kind, "view": view.name, "ops": ops})
                kind = "diff"
            return  # the live query was closed
        except RowsyncError:
            logger.exception("the %s live query lost its tree: starting again", view.name)
            await send({"type": "status", "status": "resyncing"})
        finally:
            live.close()


async def _open(rs: RowSync, sessions: sessionmaker[Session], view: View) -> LiveQuery:
    """``rs.live`` on a thread (it runs the statement); closed if the page leaves meanwhile."""
    opening = asyncio.ensure_future(asyncio.to_thread(rs.live, sessions, view.statement))
    try:
        live: LiveQuery = await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_opened)
        raise
    return live


def _close_opened(opening: asyncio.Future[LiveQuery]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()
