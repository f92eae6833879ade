"""rowsync live web demo: a page of people, posts and tags kept current over a websocket.

    make demo                             # http://127.0.0.1:8000/ (PORT=8080 make demo: another)
    DEMO_ARGS="--no-writer" make demo     # start with the writer off (the page has a switch)
    cd examples && python -m web --help   # by hand; $DATABASE_URL names the server

It creates the database ``rowsync_web_demo`` on the server of ``$DATABASE_URL`` (default: the
local one) with tables and rows if missing, installs rowsync's triggers and serves the page.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Sequence

import psycopg
import sqlalchemy as sa
import uvicorn
from demo import DEFAULT_SERVER

from .app import create_app
from .database import DATABASE, prepare


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m web", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--writer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start with the random writer on (default) or off",
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between the writer's changes"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed of the writer")
    parser.add_argument(
        "--database", default=DATABASE, help=f"database to create and use ({DATABASE})"
    )
    parser.add_argument("--reset", action="store_true", help="drop and recreate the tables first")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("PORT") or 8000),
        help="port to serve on ($PORT, else 8000; 0 picks a free one)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)

    db_server = os.environ.get("DATABASE_URL") or DEFAULT_SERVER
    try:
        url = prepare(db_server, args.database, reset=args.reset)
    except psycopg.OperationalError as exc:
        print(
            f"demo: cannot connect to {sa.make_url(db_server)!r}: {str(exc).splitlines()[0]}",
            file=sys.stderr,
        )
        print("demo: `make demo` finds or starts PostgreSQL and sets DATABASE_URL", file=sys.stderr)
        return 2
    try:
        # Bound here, not by uvicorn: port 0 gives a free port, and we know which.
        sock = socket.create_server((args.host, args.port), backlog=128)
    except OSError as exc:
        print(f"demo: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        print("demo: pick another port with PORT=8080 make demo (or --port)", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]

    def ready() -> None:
        psql = url.set(drivername="postgresql").render_as_string(hide_password=True)
        print(f"\nThe live demo is at  http://{host}:{port}/  (Ctrl-C stops it)\n")
        print(f"The writer is {'on' if args.writer else 'off'}; the page has a switch.")
        print("Make your own changes from another terminal, e.g.:")
        print(f'  psql "{psql}" \\')
        print('     -c "UPDATE posts SET published = NOT published WHERE id = 2" \\')
        print("     -c \"INSERT INTO posts (title, person_id) VALUES ('Hello from psql', 2)\"\n")

    app = create_app(
        url, writer=args.writer, interval=args.interval, seed=args.seed, on_ready=ready
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(server.serve(sockets=[sock]))
    return 0 if server.started else 1  # not started: the lifespan failed (logged above)


if __name__ == "__main__":
    sys.exit(main())
