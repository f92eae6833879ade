"""``python -m rowsync``: the ``rowsync`` command."""

from rowsync.cli import main

raise SystemExit(main())
