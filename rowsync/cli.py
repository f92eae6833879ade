"""The ``rowsync`` command: print, install, check and remove the triggers; watch events live.

    rowsync --app myapp.live:watchers sql        # the install DDL (--alembic: a revision body)
    rowsync --app myapp.live:watchers install    # create or upgrade (--prune: drop orphans)
    rowsync --app myapp.live:watchers status     # exit 1 when the database has drifted
    rowsync --app myapp.live:watchers listen     # print each event as it arrives
    rowsync --app myapp.live:watchers resync     # announce every row as updated (after a
                                                 # restore or a load the triggers missed)
    rowsync uninstall                            # drop every trigger of the channel

``--app module:attribute`` names a :class:`~rowsync.RowSync`, a list of watchers, or a
function returning either. The CLI configures logging (``-v``, ``-vv``); the library only logs.
An expected error is one line on stderr (``-v`` adds its traceback), with the exit status below;
a closed stdout (``rowsync sql | head``) ends the command quietly, with status 0.
Long operations (``install``, ``resync``) draw progress bars on a terminal (``--progress``
forces them, ``--no-progress`` hides them) when tqdm is installed (``rowsync[cli]``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any, TextIO

import psycopg
import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict

from rowsync import slots, triggers, wal
from rowsync.alembic import install_text, revision_body
from rowsync.announce import BATCH
from rowsync.app import CAPTURES, RowSync
from rowsync.connect import connector, engine_for
from rowsync.errors import ConfigurationError, RowsyncError
from rowsync.messages import Change, Message, ResyncInfo
from rowsync.triggers import Progress, Status
from rowsync.watchers import Watcher

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_DRIFT = 1
"""``status`` found triggers missing, outdated or orphaned (or rowsync's schema missing)."""
EXIT_USAGE = 2
"""A bad command line, ``--app``, DSN or watcher configuration."""
EXIT_FAILED = 3
"""The database refused: unreachable, permission denied, an SQL error."""


App = RowSync | list[Watcher]
OnListening = Callable[[RowSync], None]


class UsageError(Exception):
    """A problem with what the command was given; reported on one line, exit status 2."""


def main(argv: Sequence[str] | None = None, *, on_listening: OnListening | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status.

    ``on_listening`` is called by ``listen`` once it is listening and subscribed, so a
    caller (a test) can make changes knowing none will be missed.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a bad option (argparse printed why)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.verbose)
    try:
        command: Callable[[argparse.Namespace, OnListening | None], int] = args.command
        code = command(args, on_listening)
        sys.stdout.flush()  # here, so a closed pipe is met below and not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`| head`): what it wanted was written. Later writes (the
        # interpreter's last flush) go nowhere instead of raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except ConfigurationError as exc:
        return _fail(f"configuration: {exc}", EXIT_USAGE)
    except RowsyncError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except (psycopg.Error, sa.exc.DBAPIError) as exc:
        return _fail(_database_message(exc), EXIT_FAILED)


def _fail(message: str, code: int) -> int:
    print(f"rowsync: error: {message}", file=sys.stderr)
    logger.info("the traceback of that error:", exc_info=True)
    return code


# -- the command line ------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rowsync",
        description="Install, check and remove rowsync's triggers; print row events live.",
        epilog="exit status: 0 ok, 1 drift (status), 2 usage/configuration error, 3 database error",
        parents=[_common(top=True)],
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    common = [_common(top=False)]

    sql = commands.add_parser(
        "sql", parents=common, help="print the install DDL (no database needed)"
    )
    sql.add_argument(
        "--alembic",
        action="store_true",
        help="print an Alembic revision body with the SQL frozen in it",
    )
    _listener_roles(sql, "grant it what a listener needs in the script")
    sql.set_defaults(command=_sql)

    install = commands.add_parser(
        "install", parents=common, help="create or upgrade rowsync's schema and triggers"
    )
    install.add_argument(
        "--prune", action="store_true", help="also drop orphaned rowsync triggers of this channel"
    )
    _listener_roles(install, "grant it what a listener needs of rowsync's (writers need nothing)")
    install.set_defaults(command=_install)

    uninstall = commands.add_parser(
        "uninstall",
        parents=common,
        help="drop every rowsync trigger of the channel (--app not needed); with --capture "
        "wal, its publication and replication slots",
    )
    uninstall.add_argument(
        "--drop-schema", action="store_true", help="also drop rowsync's own schema"
    )
    uninstall.set_defaults(command=_uninstall)

    status = commands.add_parser(
        "status", parents=common, help="compare the database with the watchers"
    )
    _listener_roles(status, "check it has what a listener needs (default: the connecting role)")
    status.add_argument(
        "--max-retained",
        type=_size,
        default=_size("1GB"),
        metavar="SIZE",
        help="capture wal: warn when a replication slot keeps more WAL than this, like 500MB "
        "(default: 1GB)",
    )
    status.set_defaults(command=_status)

    listen = commands.add_parser(
        "listen", parents=common, help="print each event as it arrives, until Ctrl-C"
    )
    listen.add_argument("--count", type=_positive, metavar="N", help="exit after N messages")
    listen.add_argument("--json", action="store_true", help="one JSON object per line")
    listen.set_defaults(command=_listen)

    resync = commands.add_parser(
        "resync",
        parents=common,
        help="announce every row of the watched tables as updated, so every listener refreshes",
        description="For writes no trigger saw (pg_restore, COPY with triggers disabled, "
        "session_replication_role = replica): every row of the tables is announced as "
        "updated, a batch per transaction, through the channel or change log the triggers "
        "use. Rows deleted meanwhile cannot be announced.",
    )
    resync.add_argument(
        "tables", nargs="*", metavar="TABLE", help="schema.table or table (default: all watched)"
    )
    resync.add_argument(
        "--batch", type=_positive, default=BATCH, metavar="N", help="rows per transaction"
    )
    resync.set_defaults(command=_resync)
    return parser


def _common(*, top: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the command (after it, they win)."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("common options")

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        default=default(os.environ.get("ROWSYNC_APP") or None),
        help="a RowSync, a list of watchers, or a function returning one (default: $ROWSYNC_APP)",
    )
    group.add_argument(
        "--dsn",
        metavar="URL",
        default=default(None),
        help="database URL or libpq conninfo (default: $DATABASE_URL)",
    )
    group.add_argument(
        "--channel",
        default=default(None),
        help=f"NOTIFY channel (default: the app's, or {triggers.DEFAULT_CHANNEL})",
    )
    group.add_argument(
        "--schema",
        default=default(None),
        help=f"rowsync's schema (default: the app's, or {triggers.DEFAULT_SCHEMA})",
    )
    group.add_argument(
        "--capture",
        choices=CAPTURES,
        default=default(None),
        help="capture mode, when --app names watchers (default: the app's, or notify)",
    )
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=default(None),
        help="progress bars for install and resync (default: when stderr is a terminal)",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="log more (-v info, -vv debug) to stderr",
    )
    return parser


def _listener_roles(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument(
        "--listener-role",
        action="append",
        default=[],
        metavar="ROLE",
        dest="listener_roles",
        help=f"a database role the listener runs as: {what} (repeatable)",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}


def _size(text: str) -> int:
    """Bytes from ``500MB``, ``1 GB``, ``4096`` (units of 1024, as Postgres counts them)."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if match is None or match[2].lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 500MB or 1GB, got {text!r}")
    return int(match[1]) * _UNITS[match[2].lower()]


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("kB", "MB", "GB", "TB"):
        size /= 1024
        if size < 1024 or unit == "TB":
            break
    return f"{size:.1f} {unit}"


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("rowsync").setLevel(level)


# -- finding the app, the database, the RowSync ------------------------------------------


def load_app(spec: str) -> App:
    """Import ``module:attribute``: a RowSync, watchers, or a no-argument callable returning one."""
    module_name, sep, attribute = spec.partition(":")
    if not (sep and module_name and attribute):
        raise UsageError(f"--app {spec!r}: expected module:attribute, e.g. myapp.live:watchers")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the app is usually next to the caller
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--app {spec!r}: cannot import {module_name!r} ({exc})") from exc
    except Exception as exc:  # the app's own code failed, whatever it raised
        raise _app_failed(spec, f"importing {module_name!r}", exc) from exc
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(
                f"--app {spec!r}: {module_name!r} has no attribute {attribute!r}"
            ) from None
    if callable(obj) and not isinstance(obj, RowSync):
        try:
            obj = obj()
        except Exception as exc:
            raise _app_failed(spec, f"calling {attribute!r}", exc) from exc
    if isinstance(obj, RowSync):
        return obj
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(w, Watcher) for w in obj):
        return list(obj)
    raise UsageError(
        f"--app {spec!r}: expected a RowSync, a non-empty list of rowsync.Watcher, or a function "
        f"returning one; got {type(obj).__name__}"
    )


def _app_failed(spec: str, doing: str, exc: Exception) -> UsageError:
    """The app's own code raised: say so, with the exception's last line (the line a
    traceback ends with), and not as an error of the command."""
    lines = str(exc).strip().splitlines()
    last = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return UsageError(f"--app {spec!r}: {doing} failed: {last} (-v shows the traceback)")


def _app(args: argparse.Namespace) -> App:
    if not args.app:
        raise UsageError(
            "--app MODULE:ATTR is needed (or $ROWSYNC_APP): it names your RowSync or watchers"
        )
    return load_app(args.app)


def _database(args: argparse.Namespace, app: App | None) -> str | sa.Engine:
    if args.dsn:
        return str(args.dsn)
    if isinstance(app, RowSync):
        return app.engine
    if url := os.environ.get("DATABASE_URL"):
        return url
    raise UsageError("no database given: pass --dsn URL or set DATABASE_URL")


def _channel_schema(args: argparse.Namespace, app: App | None) -> tuple[str, str]:
    if isinstance(app, RowSync):
        return args.channel or app.channel, args.schema or app.schema
    return args.channel or triggers.DEFAULT_CHANNEL, args.schema or triggers.DEFAULT_SCHEMA


@contextmanager
def _engine(database: str | sa.Engine) -> Iterator[sa.Engine]:
    """The engine for ``database``; one made here from a conninfo is disposed of after."""
    if isinstance(database, sa.Engine):
        yield engine_for(database)
        return
    _check_conninfo(database)
    engine = engine_for(database)
    try:
        yield engine
    finally:
        engine.dispose()


def _check_conninfo(text: str) -> None:
    """A clear error for a malformed conninfo, or one naming another database system."""
    try:
        url = sa.make_url(text)
    except (sa.exc.ArgumentError, ValueError):
        try:
            conninfo_to_dict(text)
        except psycopg.ProgrammingError:
            raise UsageError(
                "the database URL (--dsn or DATABASE_URL) is not a URL like "
                "postgresql://user@host/db nor a libpq conninfo like 'host=... dbname=...'"
            ) from None
        return
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise UsageError(
            f"the database URL (--dsn or DATABASE_URL) is a {url.get_backend_name()} URL: "
            "rowsync needs PostgreSQL (postgresql://user@host/db)"
        )


@contextmanager
def _rowsync(args: argparse.Namespace) -> Iterator[RowSync]:
    """The app's RowSync, or one built from its watchers and the options; ours are cleaned up."""
    app = _app(args)
    if isinstance(app, RowSync) and not (args.dsn or args.channel or args.schema or args.capture):
        yield app
        return
    database = _database(args, app)
    channel, schema = _channel_schema(args, app)
    watchers = app.watchers if isinstance(app, RowSync) else app
    capture = args.capture or (app.capture if isinstance(app, RowSync) else "notify")
    if isinstance(database, str):
        _check_conninfo(database)
    rs = RowSync(database, watchers, channel=channel, schema=schema, capture=capture)
    try:
        yield rs
    finally:
        rs.stop()
        rs.listener.close()
        if not isinstance(database, sa.Engine):
            rs.engine.dispose()


def _where(rs: RowSync) -> str:
    return f'schema "{rs.schema}", channel "{rs.channel}"'


def _database_message(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    text = lines[0] if lines else type(orig).__name__
    if isinstance(orig, psycopg.OperationalError) and "connection" in text:
        return f"cannot connect to the database: {text.removeprefix('connection failed: ')}"
    return f"database error: {text}"


# -- the commands ---------------------------------------------------------------------------


def _sql(args: argparse.Namespace, on_listening: OnListening | None) -> int:
    app = _app(args)
    if args.alembic:
        print(
            revision_body(app, channel=args.channel, schema=args.schema, capture=args.capture),
            end="",
        )
    else:
        script = install_text(
            app,
            channel=args.channel,
            schema=args.schema,
            capture=args.capture,
            listener_roles=args.listener_roles,
        )
        print(script, end="")
    return EXIT_OK


def _install(args: argparse.Namespace, on_listening: OnListening | None) -> int:
    with _rowsync(args) as rs, _bars(args, "created") as progress:
        before = rs.install(prune=args.prune, progress=progress, listener_roles=args.listener_roles)
    summary = (
        f"rowsync install: {len(before.missing)} created, {len(before.outdated)} upgraded, "
        f"{len(before.installed)} unchanged"
    )
    if before.orphaned:
        if args.prune:
            summary += f", {len(before.orphaned)} orphaned dropped"
        else:
            summary += f"; {len(before.orphaned)} orphaned left in place (--prune drops them)"
    print(f"{summary} ({_where(rs)})")
    return EXIT_OK


def _uninstall(args: argparse.Namespace, on_listening: OnListening | None) -> int:
    app = load_app(args.app) if args.app else None
    channel, schema = _channel_schema(args, app)
    capture = args.capture or (app.capture if isinstance(app, RowSync) else None)
    with _engine(_database(args, app)) as engine, connector(engine)() as conn:
        if capture == "wal":
            gone = slots.drop(conn, channel)  # refused while a listener streams from one
            wal.uninstall(conn, channel)
            print(
                f'rowsync uninstall: publication "{channel}" and '
                f"{_count(len(gone), 'replication slot')} dropped"
            )
        dropped = triggers.uninstall(
            conn, schema=schema, channel=channel, drop_schema=args.drop_schema
        )
    also = f' and schema "{schema}"' if args.drop_schema else ""
    print(f'rowsync uninstall: {_count(dropped, "trigger")} of channel "{channel}" dropped{also}')
    return EXIT_OK


def _status(args: argparse.Namespace, on_listening: OnListening | None) -> int:
    with _rowsync(args) as rs:
        status = rs.status(listener_roles=args.listener_roles or None)
    print(f"rowsync status ({_where(rs)})")
    print(f"  schema     {'ready' if status.schema_ready else 'missing or not up to date'}")
    absent = status.missing_tables
    print(f"  tables     {f'{len(absent)} missing' if absent else 'ready'}")
    for schema, table in absent:
        print(f"    {schema}.{table}")
    for state in ("installed", "outdated", "missing", "orphaned"):
        names: list[tuple[str, str, str]] = getattr(status, state)
        print(f"  {state:<10} {len(names)}")
        for schema, table, name in names:
            print(f"    {schema}.{table}  {name}")
    print(f"  privileges {'ok' if not status.privileges else len(status.privileges)}")
    for problem in status.privileges:
        print(f"    {problem}")
    warnings = _wal(status, args.max_retained) if rs.capture == "wal" else []
    if status.ok and not warnings:
        print("ok: the database matches the watchers")
        return EXIT_OK
    for warning in warnings:
        print(f"warning: {warning}")
    if status.ok:
        return EXIT_DRIFT
    hint = "run `rowsync install`" + (" --prune" if status.orphaned else "")
    if absent:  # no trigger can be created before its table
        hint = f"create the missing tables (your migrations), then {hint}"
    if status.privileges:
        hint += " --listener-role ROLE, and revoke what PUBLIC holds"
    if status.wal_level not in (None, "logical"):
        hint = "ALTER SYSTEM SET wal_level = logical; restart PostgreSQL; then " + hint
    print(f"drift: {hint}")
    return EXIT_DRIFT


def _wal(status: Status, max_retained: int) -> list[str]:
    """Print the server's ``wal_level`` and the channel's replication slots; return what
    needs an operator: a slot that keeps too much WAL (whose consumer no longer runs?),
    one the server invalidated."""
    print(f"  wal_level  {status.wal_level}")
    print(f"  slots      {len(status.slots)}")
    warnings = []
    for slot in status.slots:
        kind = "temporary" if slot.temporary else "kept"
        use = f"streaming (backend {slot.active_pid})" if slot.active_pid else "idle"
        retained, lag = slot.retained or 0, slot.lag or 0
        print(f"    {slot.name}  {kind}, {use}, retains {_bytes(retained)}, lag {_bytes(lag)}")
        if slot.wal_status == "lost":
            warnings.append(
                f"slot {slot.name} was invalidated (max_slot_wal_keep_size): its listener "
                "creates a new one and announces a resync"
            )
        elif retained > max_retained:
            warnings.append(
                f"slot {slot.name} keeps {_bytes(retained)} of WAL (over --max-retained "
                f"{_bytes(max_retained)}): if its consumer no longer runs, `rowsync uninstall "
                f"--capture wal` or SELECT pg_drop_replication_slot('{slot.name}')"
            )
    return warnings


def _resync(args: argparse.Namespace, on_listening: OnListening | None) -> int:
    with _rowsync(args) as rs, _bars(args, "rows") as progress:
        try:
            counts = rs.announce(args.tables or None, batch=args.batch, progress=progress)
        except ConfigurationError as exc:
            raise UsageError(str(exc)) from None
    for name, count in counts.items():
        print(f"rowsync resync: {name}: {_count(count, 'row')} announced")
    total = _count(sum(counts.values()), "row")
    print(f"rowsync resync: {total} of {_count(len(counts), 'table')} ({_where(rs)})")
    return EXIT_OK


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"


@contextmanager
def _bars(args: argparse.Namespace, unit: str) -> Iterator[Progress | None]:
    """A progress callback drawing one bar per thing done (``triggers``, each table) on
    stderr, or None when progress is not wanted. The bars are tqdm's, an optional dependency
    (``rowsync[cli]``): without it there are none, and asking for them is an error."""
    shown = sys.stderr.isatty() if args.progress is None else args.progress
    if not shown:
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        if args.progress:
            raise UsageError("--progress needs tqdm: pip install 'rowsync[cli]'") from None
        yield None
        return
    bars: dict[str, tqdm[Any]] = {}

    def progress(what: str, done: int, total: int) -> None:
        bar = bars.get(what)
        if bar is None:
            bar = bars[what] = tqdm(desc=what, unit=f" {unit}", file=sys.stderr, leave=True)
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        for bar in bars.values():
            bar.close()


def _listen(args: argparse.Namespace, on_listening: OnListening | None) -> int:
    with _rowsync(args) as rs, _sigterm_interrupts():
        # Fails fast (and clearly) when the database is unreachable; starting the RowSync
        # below warns when the triggers are not up to date.
        rs.status()
        models = list(dict.fromkeys(w.model for w in rs.watchers))
        seen = 0
        try:
            with rs, rs.subscribe(models[0]) as sub:
                for model in models[1:]:
                    sub.add(model)
                names = ", ".join(_model_name(m) for m in models)
                print(
                    f"rowsync: listening on {_where(rs)} for {names}; Ctrl-C to stop",
                    file=sys.stderr,
                    flush=True,
                )
                if on_listening is not None:
                    on_listening(rs)
                while args.count is None or seen < args.count:
                    try:
                        message = sub.get(
                            timeout=1.0
                        )  # wakes up now and then, so signals get handled
                    except TimeoutError:
                        if sub.closed:
                            break
                        continue
                    seen += 1  # before printing: a SIGTERM once it is out counts it
                    _print_message(message, sys.stdout, as_json=args.json)
        except KeyboardInterrupt:
            print(f"rowsync: stopped after {_count(seen, 'message')}", file=sys.stderr)
    return EXIT_OK


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops ``listen`` like Ctrl-C does (only the main thread can set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _model_name(model: Any) -> str:
    return str(getattr(model, "__name__", None) or getattr(model, "name", model))


def _print_message(message: Message, out: TextIO, *, as_json: bool) -> None:
    marker, body = message
    if isinstance(body, Change):
        if as_json:
            data = {
                "model": _model_name(body.model),
                "event": body.event,
                "ids": body.ids,
                "ref": body.ref,
            }
            line = json.dumps(data, default=str)
        else:
            ids = " ".join(
                f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in body.ids.items()
            )
            line = f"{_model_name(body.model)} {body.event} {ids} ref={body.ref}"
    elif isinstance(body, ResyncInfo):
        line = (
            json.dumps({"resync": body.reason})
            if as_json
            else f"{marker!r} {body.reason}: changes may have been missed"
        )
    else:
        line = repr(message)
    print(line, file=out, flush=True)
