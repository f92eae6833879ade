"""Build the sdist and the wheel, install the wheel as a user would, and run the README's example.

    make package-check        # what CI runs; needs $ROWSYNC_TEST_DSN (make finds the server)

What a checkout hides, a fresh virtualenv shows: a file left out of the wheel (the SQL
migrations, py.typed), a dependency the code imports but the metadata does not declare, or
one declared for everybody that only an extra needs. So the wheel goes into a new virtualenv,
from a directory outside the checkout (nothing is imported from the source tree), and:

- it brings the core dependencies only (an allow-list of distributions);
- the ``rowsync`` command starts;
- the README's first ``python`` block runs twice against a fresh database (the second run
  proves it can be run again), and prints what its last line says it prints;
- each extra installs what its modules import (``[web]``: the demo's, examples/web).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import NoReturn

import psycopg
import sqlalchemy as sa
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"

CORE = {
    "rowsync",
    # psycopg[binary] and what it needs
    "psycopg",
    "psycopg-binary",
    "typing-extensions",
    # SQLAlchemy and what it needs
    "sqlalchemy",
    "greenlet",
    "networkx",
    "cachetools",
    # the virtualenv's own
    "pip",
    "setuptools",
}
"""Every distribution a plain ``pip install rowsync`` may bring (names normalized)."""

EXTRAS = {
    # the demo (examples/web: Starlette, uvicorn) and the FastAPI example on an AsyncEngine
    "web": "import websockets, web.__main__, fastapi_app",
    "redis": "import rowsync.fanout.redis",
    "nats": "import rowsync.fanout.nats",
    "cli": "import tqdm",
}
"""What each extra is for, as the statement that must run once it is installed. They are
installed one after the other in one virtualenv, so only the first is checked alone: ``web``,
all that the demo and the tutorial install."""

SDIST = {
    "rowsync",
    "migrations",
    "README.md",
    "LICENSE",
    "pyproject.toml",
    "PKG-INFO",
    ".gitignore",
}
"""What the sdist may hold at its top (pyproject.toml says why not tests/ or bench/); the build
backend adds LICENSE, which both archives must carry (MIT asks for the notice in copies)."""


def main() -> int:
    server = os.environ.get("ROWSYNC_TEST_DSN")
    if not server:
        print(
            "package-check: ROWSYNC_TEST_DSN is not set (run `make package-check`)", file=sys.stderr
        )
        return 2
    sdist, wheel = build()
    check_sdist_contents(sdist)
    check_wheel_contents(wheel)
    with tempfile.TemporaryDirectory(prefix="rowsync-package-") as tmp:
        venv = Path(tmp) / "venv"
        run(sys.executable, "-m", "venv", venv)
        python = venv / "bin" / "python"
        pip_install(python, str(wheel))
        check_core_only(python)
        run(venv / "bin" / "rowsync", "--help", cwd=tmp, quiet=True)
        with fresh_database(server) as url:
            example = readme_example()
            expected = example_output(example)
            for attempt in ("first", "second"):
                out = run(python, "-c", example, cwd=tmp, env={"DATABASE_URL": url})
                if expected is not None and out.strip() != expected:
                    fail(f"the README example's {attempt} run printed {out!r}, not {expected!r}")
        examples = {"PYTHONPATH": str(ROOT / "examples")}
        for extra, statement in EXTRAS.items():
            pip_install(python, f"{wheel}[{extra}]")
            run(python, "-c", statement, cwd=tmp, env=examples)
    extras = ", ".join(f"[{e}]" for e in EXTRAS)
    print(f"package-check: ok: {wheel.name} brings the core only, runs the README example")
    print(f"package-check: ok: {extras} each install what they are for")
    return 0


def build() -> tuple[Path, Path]:
    """``python -m build``: the sdist, then the wheel built from it (so the sdist is complete)."""
    for old in DIST.glob("rowsync-*"):
        old.unlink()
    run(sys.executable, "-m", "build", "--outdir", DIST, ROOT, quiet=True)
    wheels = list(DIST.glob("rowsync-*.whl"))
    sdists = list(DIST.glob("rowsync-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        fail(f"expected one wheel and one sdist in {DIST}, found {wheels + sdists}")
    return sdists[0], wheels[0]


def check_sdist_contents(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        tops = {name.split("/")[1] for name in tar.getnames() if name.count("/") >= 1}
    if strays := sorted(tops - SDIST):
        fail(f"{sdist.name} ships files that are not the package's: {', '.join(strays)}")
    if "LICENSE" not in tops:
        fail(f"{sdist.name} has no LICENSE")


def check_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {"rowsync/py.typed"} | {
        f"rowsync/migrations/{f.name}" for f in (ROOT / "migrations").glob("*.sql")
    }
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        wanted.add("rowsync-*.dist-info/licenses/LICENSE")
    if missing := sorted(wanted - names):
        fail(f"{wheel.name} lacks {', '.join(missing)}")
    if strays := sorted(n for n in names if n.startswith(("tests/", "examples/", "bench/"))):
        fail(f"{wheel.name} ships files that are not the package: {', '.join(strays[:5])}")


def check_core_only(python: Path) -> None:
    listed = run(python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check")
    installed = {normalize(line.split("==")[0]) for line in listed.splitlines() if "==" in line}
    if extra := sorted(installed - CORE):
        fail(f"`pip install rowsync` brought more than the core dependencies: {', '.join(extra)}")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def readme_example() -> str:
    """The first ``python`` block of README.md: the example a reader tries first."""
    found = re.search(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    if not found:
        fail("README.md has no ```python block")
    return found.group(1)


def example_output(example: str) -> str | None:
    """What the example says it prints, when its last line is ``print(...)  # output``."""
    last = example.strip().splitlines()[-1]
    said = re.fullmatch(r"\s*print\(.*\)\s*#\s*(.+)", last)
    return said.group(1).strip() if said else None


class fresh_database:
    """A database of its own on the test server, dropped afterwards; yields its SQLAlchemy
    URL (psycopg 3 driver), as the example reads it from ``DATABASE_URL``."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.name = f"rowsync_package_check_{os.getpid()}"

    def __enter__(self) -> str:
        self._execute("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        self._execute("CREATE DATABASE {}")
        params = conninfo_to_dict(self.server)
        port = params.get("port")
        return sa.URL.create(
            "postgresql+psycopg",
            username=str(params["user"]) if params.get("user") else None,
            password=str(params["password"]) if params.get("password") else None,
            host=str(params["host"]) if params.get("host") else None,
            port=int(port) if port else None,
            database=self.name,
        ).render_as_string(hide_password=False)

    def __exit__(self, *exc: object) -> None:
        self._execute("DROP DATABASE IF EXISTS {} WITH (FORCE)")

    def _execute(self, statement: str) -> None:
        with psycopg.connect(self.server, autocommit=True) as conn:
            conn.execute(sql.SQL(statement).format(sql.Identifier(self.name)))


def pip_install(python: Path, requirement: str) -> None:
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", requirement)


def run(
    *argv: object,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    quiet: bool = False,
) -> str:
    """Run a command; its output is returned, and shown with the command if it fails."""
    command = [str(a) for a in argv]
    done = subprocess.run(
        command,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        fail(f"`{' '.join(command)}` exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return "" if quiet else done.stdout


def fail(message: str) -> NoReturn:
    print(f"package-check: {message}", file=sys.stderr)
    raise SystemExit(1)


if __name__ == "__main__":
    raise SystemExit(main())
