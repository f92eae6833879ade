"""Run every benchmark in bench/ (``bench_*.py``, each with ``run(ctx) -> list[Result]``),
print one table of figures against their same-run baselines, and write bench/results.json.

    make bench                                   # everything, then the charts (~14 min)
    .venv/bin/python bench/run.py --quick        # fewer rounds, smaller loads (~30 s)
    .venv/bin/python bench/run.py --only sync    # one benchmark (bench_sync.py)
    .venv/bin/python bench/run.py --profile      # also write cProfile hot spots to bench/profiles/

The server comes from DATABASE_URL (a libpq URL of its ``postgres`` database); benchmarks
that need a database create their own throwaway one on it and drop it at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

from harness import DEFAULT_DSN, HERE, Context, Result, fmt

# The rowsync of this checkout, not whichever one the environment installed (a worktree shares
# the venv of the checkout that installed it in editable mode).
sys.path.insert(1, str(HERE.parent))

logger = logging.getLogger("bench")

COLUMNS = ("#", "name", "metric", "value", "baseline", "ratio", "goal", "verdict")


def discover(only: list[str] | None) -> list[tuple[str, Path]]:
    found = sorted((p.stem.removeprefix("bench_"), p) for p in HERE.glob("bench_*.py"))
    if only:
        unknown = set(only) - {name for name, _ in found}
        if unknown:
            raise SystemExit(f"no benchmark named {sorted(unknown)}; have {[n for n, _ in found]}")
        found = [(n, p) for n, p in found if n in only]
    return found


def load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickle look modules up by name
    spec.loader.exec_module(module)
    if not callable(getattr(module, "run", None)):
        raise TypeError(f"{path.name} has no run(ctx)")
    return module


def row(r: Result, rows: dict[str, int]) -> tuple[str, ...]:
    ratio = "-" if r.ratio is None else f"{r.ratio:,.2f}{r.ratio_label}"
    met = "-" if r.goal is None else r.goal.verdict()
    return (
        str(rows.get(r.name, "")),
        r.name,
        r.metric,
        fmt(r.value, r.unit),
        fmt(r.baseline, r.unit),
        ratio,
        "-" if r.goal is None else r.goal.text,
        met,
    )


def table(results: list[Result], numbers: dict[str, int]) -> str:
    """The results as a table; ``numbers``: each benchmark's row in issue 6's table."""
    rows = [COLUMNS, *(row(r, numbers) for r in results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    right = {0, 3, 4, 5}
    lines = []
    for n, cells in enumerate(rows):
        lines.append(
            "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=False))
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"  {r.name} / {r.metric}: {r.notes}" for r in results if r.notes]
    baselines = [
        f"  {r.name} / {r.metric}: baseline = {r.baseline_label}"
        for r in results
        if r.baseline_label
    ]
    return "\n".join([*lines, "", "baselines:", *baselines, "", "notes:", *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="run only bench_NAME.py (repeatable)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and smaller loads")
    parser.add_argument(
        "--profile", action="store_true", help="write cProfile reports to bench/profiles/"
    )
    parser.add_argument(
        "--json", type=Path, default=HERE / "results.json", help="where to write the results"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )

    import rowsync

    logger.info("rowsync %s from %s", rowsync.__version__, Path(rowsync.__file__).parent)
    ctx = Context(
        dsn=os.environ.get("DATABASE_URL") or DEFAULT_DSN, quick=args.quick, profile=args.profile
    )
    results: list[Result] = []
    failed: list[str] = []
    durations: dict[str, float] = {}
    started = time.perf_counter()
    modules: list[tuple[str, ModuleType]] = []
    for name, path in discover(args.only):
        try:
            modules.append((name, load(name, path)))
        except Exception:
            failed.append(name)
            logger.error("benchmark %s cannot be loaded:\n%s", name, traceback.format_exc())
    modules.sort(key=lambda found: (getattr(found[1], "ROW", 99), found[0]))
    numbers = {name: module.ROW for name, module in modules if hasattr(module, "ROW")}
    for name, module in modules:
        logger.info("running %s%s", name, " (quick)" if ctx.quick else "")
        t0 = time.perf_counter()
        try:
            results.extend(module.run(ctx))
        except Exception:
            failed.append(name)
            logger.error("benchmark %s failed:\n%s", name, traceback.format_exc())
        durations[name] = time.perf_counter() - t0
        logger.info("%s done in %.1f s", name, durations[name])
    total = time.perf_counter() - started

    print()
    print(table(results, numbers))
    print(f"\ntotal {total:.1f} s ({', '.join(f'{n} {d:.1f} s' for n, d in durations.items())})")
    if failed:
        print(f"FAILED: {', '.join(failed)}")

    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": ctx.quick,
        "machine": {
            "host": platform.node(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "durations_s": durations,
        "failed": failed,
        "results": [asdict(r) for r in results],
    }
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")
    return 1 if failed else 0


def _cpu_model() -> str:
    """The processor's name (Linux), for the charts' labels."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


if __name__ == "__main__":
    sys.exit(main())
