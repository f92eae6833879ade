"""The live web demo (examples/web) in a real browser: headless Debian Chromium, driven by
Playwright's Python package (no browser download). The demo runs as `make demo` runs it, in
a process of its own, against this test's database; rows change from another connection, as
from psql, or from another tab's edits, and each change must show on the page within
``BOUND_MS``.

Chromium is a hard requirement: when /usr/bin/chromium is missing these tests fail (they do
not skip). `make test` installs it first with scripts/ensure-chromium.sh.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BOUND_MS = 10_000  # how long a committed change may take to show on the page
SCREENSHOT = ROOT / "docs" / "screenshot.png"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the browser test needs Debian's chromium package "
            "(`make test` installs it with scripts/ensure-chromium.sh; as root: "
            "apt-get install chromium)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


class Demo:
    """The demo's process (``python -m web``, as `make demo` starts it) and its address."""

    def __init__(self, dsn: str, *args: str) -> None:
        database = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        env = {**os.environ, "DATABASE_URL": dsn, "PYTHONPATH": str(ROOT / "examples")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "web", "--database", str(database), "--port", "0", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._address()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _address(self) -> str:
        """The address the demo prints once it serves (its listener started)."""
        while True:
            try:
                line = self.lines.get(timeout=60)
            except queue.Empty:
                pytest.fail(f"the demo did not start within 60 s:\n{''.join(self.output)}")
            if line is None:
                pytest.fail(f"the demo exited:\n{''.join(self.output)}")
            if found := re.search(r"http://127\.0\.0\.1:\d+/", line):
                return found.group()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def demo(dsn: str) -> Iterator[Demo]:
    """The demo serving this test's database (seeded with its rows), its writer off."""
    running = Demo(dsn, "--no-writer", "--interval", "0.2")
    try:
        yield running
    finally:
        running.stop()


def open_page(browser: Browser, demo: Demo) -> Page:
    """A tab of its own (a context of its own: nothing shared but the server)."""
    opened = browser.new_context(viewport={"width": 1280, "height": 560}).new_page()
    opened.set_default_timeout(BOUND_MS)
    expect.set_options(timeout=BOUND_MS)
    opened.goto(demo.url)
    expect(opened.locator("#status")).to_have_attribute("data-status", "connected")
    return opened


@pytest.fixture
def page(browser: Browser, demo: Demo) -> Iterator[Page]:
    opened = open_page(browser, demo)
    yield opened
    opened.context.close()


@pytest.fixture
def other_page(browser: Browser, demo: Demo) -> Iterator[Page]:
    opened = open_page(browser, demo)
    yield opened
    opened.context.close()


@pytest.fixture
def sql(dsn: str) -> Iterator[Callable[..., Any]]:
    """Run one statement on a connection of the test's own (as psql would); its first row."""
    with psycopg.connect(dsn, autocommit=True) as conn:

        def run(statement: str, *params: Any) -> Any:
            cursor = conn.execute(statement, params)
            return cursor.fetchone() if cursor.description else None

        yield run


def key(page: Page, path: str) -> Locator:
    return page.locator(f'[data-key="{path}"]')


def test_page_shows_every_change_made_from_another_connection(
    page: Page, sql: Callable[..., Any]
) -> None:
    (ada,) = sql("SELECT id FROM people WHERE name = 'Ada Lovelace'")
    (grace,) = sql("SELECT id FROM people WHERE name = 'Grace Hopper'")
    (python,) = sql("SELECT id FROM tags WHERE name = 'python'")
    (notes,) = sql("SELECT id FROM posts WHERE title = 'Notes on the analytical engine'")
    expect(key(page, f"person-{ada}")).to_contain_text("Ada Lovelace")
    expect(key(page, f"person-{ada}/posts/post-{notes}/tags/tag-{python}")).to_have_text("python")
    expect(key(page, f"published/post-{notes}/author/person-{ada}")).to_have_text("Ada Lovelace")
    published_titles = page.locator('#published > li > [data-field="title"]')
    expect(published_titles).to_have_text(titles(sql))

    # insert: a post, and a person (who joins the list and is kept current from then on)
    (hello,) = sql(
        "INSERT INTO posts (title, person_id) VALUES ('Hello from psql', %s) RETURNING id", grace
    )
    expect(key(page, f"person-{grace}/posts/post-{hello}")).to_contain_text("Hello from psql")
    expect(key(page, f"person-{grace}/posts/post-{hello}")).to_have_attribute(
        "data-published", "false"
    )
    (edsger,) = sql("INSERT INTO people (name) VALUES ('Edsger Dijkstra') RETURNING id")
    expect(key(page, f"person-{edsger}")).to_contain_text("Edsger Dijkstra")
    (goto,) = sql(
        "INSERT INTO posts (title, person_id) VALUES ('Go To considered harmful', %s) RETURNING id",
        edsger,
    )
    expect(key(page, f"person-{edsger}/posts/post-{goto}")).to_contain_text("Go To")

    # update a value: everywhere the row is shown
    sql("UPDATE people SET name = 'Ada, Countess of Lovelace' WHERE id = %s", ada)
    expect(key(page, f"person-{ada}").locator("h2")).to_contain_text("Countess of Lovelace")
    expect(key(page, f"published/post-{notes}/author/person-{ada}")).to_contain_text("Countess")

    # move a post to another person: it leaves one, joins the other with its tags
    sql("UPDATE posts SET person_id = %s WHERE id = %s", grace, notes)
    expect(key(page, f"person-{grace}/posts/post-{notes}/tags/tag-{python}")).to_be_visible()
    expect(key(page, f"person-{ada}/posts/post-{notes}")).to_have_count(0)
    expect(key(page, f"published/post-{notes}/author/person-{grace}")).to_have_text("Grace Hopper")

    # update into the filtered list (WHERE published ORDER BY title), in its place; out of it
    sql("UPDATE posts SET published = true WHERE id = %s", hello)
    expect(key(page, f"published/post-{hello}")).to_contain_text("Hello from psql")
    expect(published_titles).to_have_text(titles(sql))
    expect(key(page, f"person-{grace}/posts/post-{hello}")).to_have_attribute(
        "data-published", "true"
    )
    sql("UPDATE posts SET published = false WHERE id = %s", notes)
    expect(key(page, f"published/post-{notes}")).to_have_count(0)
    expect(key(page, f"person-{grace}/posts/post-{notes}")).to_have_attribute(
        "data-published", "false"
    )

    # delete a tag: its links cascade, and it leaves every post that carried it
    tagged = page.locator(f'[data-key$="/tags/tag-{python}"]')
    expect(tagged).not_to_have_count(0)
    sql("DELETE FROM tags WHERE id = %s", python)
    expect(tagged).to_have_count(0)

    # delete a person: their posts go with them (ON DELETE CASCADE)
    sql("DELETE FROM people WHERE id = %s", edsger)
    expect(key(page, f"person-{edsger}")).to_have_count(0)

    expect(page.locator("#status")).to_have_attribute("data-status", "connected")
    expect(published_titles).to_have_text(titles(sql))


def titles(sql: Callable[..., Any]) -> list[str]:
    """The published list as a fresh query returns it."""
    (found,) = sql(
        "SELECT coalesce(array_agg(title ORDER BY title, id), '{}') FROM posts WHERE published"
    )
    return list(found)


def test_page_is_current_after_the_listener_reconnects(page: Page, sql: Callable[..., Any]) -> None:
    """Changes committed while rowsync's listener is away still reach the page."""
    (grace,) = sql("SELECT id FROM people WHERE name = 'Grace Hopper'")
    sql(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'rowsync-listener'"
    )
    sql("UPDATE people SET name = 'Rear Admiral Hopper' WHERE id = %s", grace)
    expect(key(page, f"person-{grace}").locator("h2")).to_contain_text("Rear Admiral Hopper")
    expect(page.locator("#status")).to_have_attribute("data-status", "connected")


def test_page_equals_a_fresh_query_after_the_writers_random_changes(
    page: Page, sql: Callable[..., Any]
) -> None:
    switch = page.locator("#writer")
    expect(switch).to_have_attribute("aria-pressed", "false")
    expect(page.locator("#log li")).to_have_count(2)  # each live query's tree, once
    expect(page.locator("#log li").first).to_contain_text("⟳")

    switch.click()
    expect(switch).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#last-change")).to_contain_text("✎")
    expect(page.locator("#log .latency").first).to_contain_text("writer's commit → sent")
    page.wait_for_function("document.querySelectorAll('#log li').length >= 22")  # diff batches
    switch.click()
    # Off is announced once the writer's last change is committed: the rows stand still.
    expect(switch).to_have_attribute("aria-pressed", "false")

    expected = fresh(sql)
    page.wait_for_function(f"expected => JSON.stringify({SHOWN}) === expected", arg=expected)


# Every element of a row on the page, in document order: its key and its name or title.
SHOWN = """[...document.querySelectorAll("[data-key]")].map(
    (e) => [e.dataset.key, e.dataset.name ?? e.dataset.title])"""


def fresh(sql: Callable[..., Any]) -> str:
    """What the page must show, from a fresh query of every table (as JSON, like ``SHOWN``)."""
    (data,) = sql(
        "SELECT json_build_object("
        " 'people', (SELECT json_agg(json_build_array(id, name) ORDER BY id) FROM people),"
        " 'posts', (SELECT json_agg(json_build_array(id, title, person_id, published)"
        "   ORDER BY id) FROM posts),"
        " 'tags', (SELECT json_agg(json_build_array(p.post_id, t.id, t.name) ORDER BY t.id)"
        "   FROM post_tags p JOIN tags t ON t.id = p.tag_id))"
    )
    names = {person: name for person, name in data["people"] or []}
    posts = data["posts"] or []
    tags = data["tags"] or []
    shown: list[list[Any]] = []

    def post_tags(post: int, prefix: str) -> None:
        shown.extend([f"{prefix}/tags/tag-{t}", name] for p, t, name in tags if p == post)

    for person, name in names.items():
        shown.append([f"person-{person}", name])
        for post, title, author, _ in posts:
            if author == person:
                shown.append([f"person-{person}/posts/post-{post}", title])
                post_tags(post, f"person-{person}/posts/post-{post}")
    for post, title, author, _ in sorted((p for p in posts if p[3]), key=lambda p: (p[1], p[0])):
        shown.append([f"published/post-{post}", title])
        shown.append([f"published/post-{post}/author/person-{author}", names[author]])
        post_tags(post, f"published/post-{post}")
    return json.dumps(shown, separators=(",", ":"), ensure_ascii=False)


def click(page: Page, row: Locator, action: str, answer: str | None = None) -> None:
    """Click a row's edit button; ``answer`` the question it asks, if it asks one."""
    if answer is not None:
        page.once("dialog", lambda dialog: dialog.accept(answer))
    row.locator(f'[data-action="{action}"]').first.click()


def test_an_edit_in_one_tab_shows_in_the_other(
    page: Page, other_page: Page, sql: Callable[..., Any]
) -> None:
    one, two = page, other_page
    (grace,) = sql("SELECT id FROM people WHERE name = 'Grace Hopper'")
    initial = fresh(sql)

    click(one, key(one, f"person-{grace}"), "rename", "Amazing Grace")
    expect(key(two, f"person-{grace}").locator("h2")).to_contain_text("Amazing Grace")
    expect(key(one, f"person-{grace}").locator("h2")).to_contain_text("Amazing Grace")
    expect(one.locator("#log .latency").first).to_contain_text("click → page")

    click(two, key(two, f"person-{grace}"), "add-post", "Written in tab two")
    added = one.locator(f'[data-key^="person-{grace}/posts/"]', has_text="Written in tab two")
    expect(added).to_have_count(1)
    post = added.get_attribute("data-key")
    assert post is not None
    expect(two.locator("#log .latency").first).to_contain_text("click → page")

    click(one, key(one, post), "tag", "tabs")
    tag = two.locator(f'[data-key^="{post}/tags/"]')
    expect(tag).to_have_text("tabs")
    click(two, tag, "untag")
    expect(one.locator(f'[data-key^="{post}/tags/"]')).to_have_count(0)

    click(one, key(one, post), "retitle", "Retitled in tab one")
    expect(key(two, post)).to_contain_text("Retitled in tab one")
    one.screenshot(path=str(SCREENSHOT), full_page=True, animations="disabled")

    click(two, key(two, post), "delete")
    expect(key(one, post)).to_have_count(0)
    for tab in (one, two):
        tab.wait_for_function(f"expected => JSON.stringify({SHOWN}) === expected", arg=fresh(sql))

    one.locator("#reset").click()
    for tab in (one, two):
        expect(key(tab, f"person-{grace}").locator("h2")).to_contain_text("Grace Hopper")
        tab.wait_for_function(f"expected => JSON.stringify({SHOWN}) === expected", arg=initial)
