"""rowsync keeps loaded SQLAlchemy object trees in sync with Postgres rows as they change."""

from rowsync.app import RowSync, sync
from rowsync.errors import ConfigurationError, NotRunningError, RowsyncError
from rowsync.live import Diff, LiveQuery
from rowsync.messages import EVENTS, Change, Event, Message, Resync, ResyncInfo, Sync
from rowsync.position import Position
from rowsync.subscription import Subscription
from rowsync.triggers import Status
from rowsync.watchers import Watcher, watchers

__all__ = [
    "EVENTS",
    "Change",
    "ConfigurationError",
    "Diff",
    "Event",
    "LiveQuery",
    "Message",
    "NotRunningError",
    "Position",
    "Resync",
    "ResyncInfo",
    "RowSync",
    "RowsyncError",
    "Status",
    "Subscription",
    "Sync",
    "Watcher",
    "sync",
    "watchers",
]

__version__ = "0.1.0"
