"""Exceptions rowsync raises on purpose."""


class RowsyncError(Exception):
    """Base class of every error rowsync raises itself."""


class ConfigurationError(RowsyncError, ValueError):
    """A watcher, subscription or option names something that does not exist or cannot work."""


class NotRunningError(RowsyncError, RuntimeError):
    """The operation needs a started listener (``rs.start()`` or ``with rs:``)."""
