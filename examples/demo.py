"""rowsync demo: people with their posts and tags, loaded once and kept in sync as rows change.

    make demo                            # runs until Ctrl-C
    DEMO_ARGS="--steps 5" make demo      # five changes, then exit (status 1 on any mismatch)
    DEMO_ARGS="--no-writer" make demo    # only listen: make your own changes with psql

It creates the database ``rowsync_demo`` on the server of ``$DATABASE_URL`` (default: the
local one), its tables and some rows, installs rowsync's triggers, loads the tree with one
query and subscribes to it. A writer thread then changes random rows on its own connection;
each change arrives as messages that ``rs.sync`` applies to the tree in place, and after each
step the tree is compared with a fresh query of the same statement.
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from demo_models import Base, Person, Post, Tag, post_tags
from psycopg import sql
from sqlalchemy.orm import Session, selectinload, sessionmaker

import rowsync
from rowsync import Change, Resync, RowSync, Sync

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"

ASSOCS = [{"posts": ["tags"]}]
WATCHERS = rowsync.watchers(Person, ASSOCS)
QUERY = (
    sa.select(Person)
    .options(selectinload(Person.posts).selectinload(Post.tags))
    .order_by(Person.id)
)

PEOPLE = ["Ada Lovelace", "Grace Hopper", "Edgar Codd", "Barbara Liskov"]
TAGS = ["postgres", "python", "sqlalchemy", "notify", "trees"]
POSTS = [
    (1, "Notes on the analytical engine", ["python", "trees"]),
    (1, "Loops, before there were loops", []),
    (2, "Finding the first bug", ["postgres"]),
    (3, "A relational model of data", ["postgres", "sqlalchemy"]),
    (4, "Substitution, explained", ["python"]),
]
WORDS = (
    ["Thoughts on", "Notes on", "Why I like", "Against", "A guide to", "Debugging"],
    ["triggers", "LISTEN/NOTIFY", "object trees", "caches", "backpressure", "foreign keys", "ORMs"],
)
NICKNAMES = ["the Great", "II", "(on leave)", "PhD", "", "Jr."]


# -- database set-up -------------------------------------------------------------------------


def demo_url(server: str, database: str) -> sa.URL:
    """Create ``database`` on ``server`` if it is missing; return its SQLAlchemy URL."""
    url = sa.make_url(server)
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if not exists:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
                print(f"created database {database}")
            except psycopg.errors.DuplicateDatabase:
                pass  # another demo got there first
    return url.set(drivername="postgresql+psycopg", database=database)


def create_schema(engine: sa.Engine, *, reset: bool) -> None:
    if reset:
        Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        if session.scalar(sa.select(sa.func.count()).select_from(Person)):
            return
        people = [Person(name=name) for name in PEOPLE]
        tags = {name: Tag(name=name) for name in TAGS}
        session.add_all([*people, *tags.values()])
        for author, title, names in POSTS:
            session.add(Post(title=title, author=people[author - 1], tags=[tags[n] for n in names]))
        print(f"loaded {len(PEOPLE)} people, {len(POSTS)} posts and {len(TAGS)} tags")


# -- the writer ---------------------------------------------------------------------------------


class Writer(threading.Thread):
    """Random changes on a connection of its own, one at a time: each waits for ``proceed``."""

    def __init__(self, url: sa.URL, rng: random.Random, interval: float) -> None:
        super().__init__(name="demo-writer", daemon=True)
        self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        self.rng = rng
        self.interval = interval
        self.changes: queue.Queue[str] = queue.Queue()
        self.proceed = threading.Event()
        self.stopping = threading.Event()

    def run(self) -> None:
        with self.engine.connect() as conn:
            while not self.stopping.wait(self.interval):
                self.changes.put(self.step(conn))
                self.proceed.wait()
                self.proceed.clear()

    def step(self, conn: sa.Connection) -> str:
        """Commit one random change; describe it."""
        description = None
        # Some picks change nothing (a tag already there...): pick again.
        for _ in range(10):
            try:
                with conn.begin():
                    description = self.change(conn)
            except sa.exc.DBAPIError as exc:  # e.g. a row deleted from psql meanwhile
                description = f"(change failed: {str(exc.orig).splitlines()[0]})"
            if description is not None:
                break
        return description or "(nothing to change)"

    def stop(self) -> None:
        self.stopping.set()
        self.proceed.set()
        self.join(5)
        self.engine.dispose()

    def spares(self, kind: str, row_id: int) -> bool:
        """Whether to leave this row (``kind``: person, post or tag) alone: none here."""
        return False

    def change(self, conn: sa.Connection) -> str | None:
        """Make one random change; describe it, or return None if the pick changed nothing."""
        rng = self.rng
        people = {
            row.id: row.name
            for row in conn.execute(sa.select(Person.id, Person.name))
            if not self.spares("person", row.id)
        }
        posts = {
            row.id: row
            for row in conn.execute(sa.select(Post.id, Post.title, Post.person_id))
            if not self.spares("post", row.id)
        }
        tags = {
            row.id: row.name
            for row in conn.execute(sa.select(Tag.id, Tag.name))
            if not self.spares("tag", row.id)
        }
        links = {
            (r.post_id, r.tag_id) for r in conn.execute(sa.select(post_tags)) if r.post_id in posts
        }
        if not people:
            return "(no people to change: add some with psql)"
        actions = ["insert post", "rename person", "rename tag"]
        if posts:
            actions += ["retitle post", "move post", "link tag", "unlink tag", "link tag"]
            actions += ["delete post"] * (3 if len(posts) > 12 else 1)
        if len(posts) < 4:
            actions += ["insert post"] * 3
        action = rng.choice(actions)

        def who(person_id: int) -> str:
            return str(people.get(person_id, f"person {person_id}"))

        if action == "insert post":
            author = rng.choice(list(people))
            title = f"{rng.choice(WORDS[0])} {rng.choice(WORDS[1])}"
            post_id = conn.execute(
                sa.insert(Post).values(title=title, person_id=author).returning(Post.id)
            ).scalar_one()
            chosen = rng.sample(sorted(tags), k=min(len(tags), rng.randint(0, 2)))
            if chosen:
                conn.execute(
                    sa.insert(post_tags), [{"post_id": post_id, "tag_id": t} for t in chosen]
                )
            named = ", ".join(tags[t] for t in sorted(chosen))
            return f'{who(author)} writes post #{post_id} "{title}" [{named}]'
        if action == "retitle post":
            post = posts[rng.choice(list(posts))]
            title = f"{rng.choice(WORDS[0])} {rng.choice(WORDS[1])}"
            conn.execute(sa.update(Post).where(Post.id == post.id).values(title=title))
            return f'post #{post.id} retitled "{title}"'
        if action == "move post":
            post = posts[rng.choice(list(posts))]
            others = [p for p in people if p != post.person_id]
            if not others:
                return None
            author = rng.choice(others)
            conn.execute(sa.update(Post).where(Post.id == post.id).values(person_id=author))
            return f"post #{post.id} moves from {who(post.person_id)} to {who(author)}"
        if action == "delete post":
            post = posts[rng.choice(list(posts))]
            conn.execute(sa.delete(Post).where(Post.id == post.id))
            return f'post #{post.id} "{post.title}" deleted (its tag links cascade)'
        if action == "link tag":
            free = [(p, t) for p in posts for t in tags if (p, t) not in links]
            if not free:
                return None
            post_id, tag_id = rng.choice(free)
            conn.execute(sa.insert(post_tags).values(post_id=post_id, tag_id=tag_id))
            return f"post #{post_id} tagged {tags[tag_id]}"
        if action == "unlink tag":
            if not links:
                return None
            post_id, tag_id = rng.choice(sorted(links))
            conn.execute(
                sa.delete(post_tags).where(
                    post_tags.c.post_id == post_id, post_tags.c.tag_id == tag_id
                )
            )
            return f"post #{post_id} untagged {tags.get(tag_id, tag_id)}"
        if action == "rename tag":
            tag_id = rng.choice(list(tags))
            base = tags[tag_id].split("-")[0]
            name = f"{base}-{rng.randint(1, 99)}" if rng.random() < 0.7 else base
            if name in tags.values():
                return None
            conn.execute(sa.update(Tag).where(Tag.id == tag_id).values(name=name))
            return f"tag {tags[tag_id]} renamed {name}"
        person_id = rng.choice(list(people))
        base = (
            PEOPLE[(person_id - 1) % len(PEOPLE)] if person_id <= len(PEOPLE) else people[person_id]
        )
        name = f"{base} {rng.choice(NICKNAMES)}".strip()
        if name == people[person_id]:
            return None
        conn.execute(sa.update(Person).where(Person.id == person_id).values(name=name))
        return f"{who(person_id)} is now called {name}"


# -- showing and checking the tree ------------------------------------------------------------


def plain(people: Sequence[Person]) -> list[tuple[Any, ...]]:
    """What the tree holds, as plain data; people by id, posts and tags in their order_by order.

    A collection that is not loaded becomes a marker (a mismatch), never a lazy load.
    """
    rows = []
    for person in sorted(people, key=lambda p: p.id):
        posts: list[tuple[Any, ...]] = [(0, "<posts not loaded>", ())]
        if _loaded(person, "posts"):
            posts = []
            for post in person.posts:
                tags = (
                    tuple((t.id, t.name) for t in post.tags)
                    if _loaded(post, "tags")
                    else ((0, "<not loaded>"),)
                )
                posts.append((post.id, post.title, tags))
        rows.append((person.id, person.name, tuple(posts)))
    return rows


def _loaded(obj: Any, key: str) -> bool:
    return key not in sa.inspect(obj).unloaded


def render(data: list[tuple[Any, ...]]) -> list[str]:
    return [line for _, line in _lines(data)]


def _lines(data: list[tuple[Any, ...]]) -> list[tuple[Any, str]]:
    """Each line with its person's id, so a post moving between people shows as a change."""
    lines: list[tuple[Any, str]] = []
    for person_id, name, posts in data:
        lines.append((person_id, f"{name} ({person_id})" + ("" if posts else ": no posts")))
        for post_id, title, tags in posts:
            named = ", ".join(tag for _, tag in tags)
            lines.append((person_id, f"    #{post_id} {title}" + (f"  [{named}]" if named else "")))
    return lines


def show(data: list[tuple[Any, ...]], previous: list[tuple[Any, str]]) -> list[tuple[Any, str]]:
    """Print the tree; lines that changed since last time are marked with ›."""
    lines = _lines(data)
    seen = set(previous)
    for line in lines:
        print(f"  {'›' if previous and line not in seen else ' '} {line[1]}")
    return lines


def describe(message: Any) -> str:
    marker, body = message
    if marker is Sync and isinstance(body, Change):
        name = getattr(body.model, "__name__", None) or body.model.name
        ids = " ".join(f"{k}={v}" for k, v in body.ids.items())
        return f"← {name} {body.event} {ids} (ref {body.ref})"
    return f"← {marker!r} {body}"


class Demo:
    def __init__(self, rs: RowSync, sessions: sessionmaker[Session]) -> None:
        self.rs = rs
        self.sessions = sessions
        self.people: list[Person] = []
        self.sub: rowsync.Subscription | None = None
        self.lines: list[tuple[Any, str]] = []
        self.mismatches = 0
        self.queries = 0  # rowsync's row queries counted so far

    def load(self) -> None:
        """One query for the whole tree, then one subscription for everything in it."""
        if self.sub is not None:
            self.sub.close()
        self.people = self.fresh()
        self.sub = self.rs.subscribe(self.people, assocs=ASSOCS)
        # New people join the root list, and are followed like the others from then on.
        self.sub.add(Person, "inserted", assocs=ASSOCS, follow=True)
        self.lines = show(plain(self.people), [])

    def fresh(self) -> list[Person]:
        with self.sessions() as session:
            return list(session.scalars(QUERY).unique())

    def wait_for_message(self, stop: threading.Event) -> Any:
        assert self.sub is not None
        while not stop.is_set():
            try:
                return self.sub.get(timeout=0.5)
            except TimeoutError:
                continue
        return None

    def catch_up(self, first: Any = None) -> None:
        """Flush the listener, apply every queued message, show the tree and check it."""
        assert self.sub is not None
        self.rs.flush()
        messages = ([first] if first is not None else []) + self.sub.drain()
        started = time.perf_counter()
        if not self.apply(messages):
            return
        applied = (time.perf_counter() - started) * 1000
        queries = sum(self.rs.rows.queries.values()) - self.queries
        self.queries += queries
        synced, expected = plain(self.people), plain(self.fresh())
        if synced != expected:  # a change from psql may have landed in between: settle once more
            self.rs.flush()
            if not self.apply(self.sub.drain()):
                return
            synced, expected = plain(self.people), plain(self.fresh())
        self.lines = show(synced, self.lines)
        if synced == expected:
            print(
                f"  in sync ✓  ({_n(len(messages), 'message')} applied in {applied:.1f} ms; "
                f"{_n(queries, 'row query', 'row queries')} by rowsync, no re-query of the tree)"
            )
            return
        self.mismatches += 1
        print("  !!!!!!!! MISMATCH: the synced tree differs from a fresh query !!!!!!!!")
        for line in render(expected):
            print(f"  expected  {line}")

    def apply(self, messages: list[Any]) -> bool:
        """``rs.sync`` each message into the tree; on a Resync, reload it instead (False)."""
        for message in messages:
            print(f"    {describe(message)}")
            if message[0] is Resync:
                print("    ⟳ changes may have been missed: reloading the tree")
                self.load()
                return False
            self.people = self.rs.sync(self.people, message)
        return True


# -- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=0, help="stop after N changes (default: run until Ctrl-C)"
    )
    parser.add_argument(
        "--no-writer", action="store_true", help="only listen: make changes with psql yourself"
    )
    parser.add_argument(
        "--interval", type=float, default=0.5, help="seconds between the writer's changes"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed of the writer")
    parser.add_argument(
        "--database", default="rowsync_demo", help="database to create and use (rowsync_demo)"
    )
    parser.add_argument(
        "--reset", action="store_true", help="drop and recreate the demo's tables first"
    )
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace", line_buffering=True)

    server = os.environ.get("DATABASE_URL") or DEFAULT_SERVER
    try:
        url = demo_url(server, args.database)
    except psycopg.OperationalError as exc:
        print(
            f"demo: cannot connect to {sa.make_url(server)!r}: {str(exc).splitlines()[0]}",
            file=sys.stderr,
        )
        print("demo: `make demo` finds or starts PostgreSQL and sets DATABASE_URL", file=sys.stderr)
        return 2
    engine = sa.create_engine(url)
    create_schema(engine, reset=args.reset)

    rs = RowSync(engine, WATCHERS)
    before = rs.install()
    created = len(before.missing) + len(before.outdated)
    print(
        f"rowsync install: {created} triggers created or upgraded, {len(before.installed)} current"
    )
    print("\nMake your own changes from another terminal, e.g.:")
    print(f'  psql "{url.set(drivername="postgresql").render_as_string(hide_password=True)}" \\')
    print("     -c \"UPDATE people SET name = 'Ada L.' WHERE id = 1\" \\")
    print("     -c \"INSERT INTO posts (title, person_id) VALUES ('Hello from psql', 2)\"\n")

    demo = Demo(rs, sessionmaker(engine, expire_on_commit=False))
    stop = threading.Event()
    writer = None if args.no_writer else Writer(url, random.Random(args.seed), args.interval)
    step = 0
    try:
        with rs:
            print("The tree, loaded with one query and subscribed:")
            demo.load()
            if writer is None:
                print("\nListening (no writer); Ctrl-C to stop.")
            else:
                print(f"\nA writer changes a random row every {args.interval} s; Ctrl-C to stop.")
                writer.start()
            while not args.steps or step < args.steps:
                step += 1
                if writer is not None:
                    description = _next_change(writer)
                    print(f"\n[{step}] ✎ {description}")
                    demo.catch_up()
                    writer.proceed.set()
                else:
                    first = demo.wait_for_message(stop)
                    print(f"\n[{step}] a change arrived")
                    demo.catch_up(first)
    except KeyboardInterrupt:
        print()
    finally:
        stop.set()
        if writer is not None:
            writer.stop()
        engine.dispose()
    verdict = "every step in sync ✓" if not demo.mismatches else f"{demo.mismatches} MISMATCHES"
    events, queries = rs.stats["dispatched"], sum(rs.rows.queries.values())
    print(f"\n{_n(step, 'step')}, {verdict} ({_n(events, 'event')}, {queries} row queries)")
    return 1 if demo.mismatches else 0


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def _next_change(writer: Writer) -> str:
    while True:
        try:
            return writer.changes.get(timeout=0.5)
        except queue.Empty:
            if not writer.is_alive():
                raise RuntimeError("the writer thread died") from None


if __name__ == "__main__":
    sys.exit(main())
