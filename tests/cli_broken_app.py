"""An application module whose import fails (``--app cli_broken_app:watchers``), the way one
that writes rows at import time fails on its second run: with a database error that has
nothing to do with the command."""

import psycopg

raise psycopg.errors.UniqueViolation('duplicate key value violates unique constraint "people_pkey"')
