"""Draw bench/results.json as PNG charts: one per benchmark, each figure next to its baseline.

    .venv/bin/python bench/charts.py                       # bench/results.json -> docs/charts/
    .venv/bin/python bench/charts.py other.json --out DIR

``make bench`` runs it after ``run.py``. It reads the JSON only (nothing is measured again), so
a past run can be drawn again. Each chart holds a benchmark's rows, one panel per unit, a bar
for the figure and, below it, a grey bar for the baseline taken in the same run. A figure's
bar is green when it meets its goal, red when it misses it, blue when it has none. A panel
whose figures span more than two orders of magnitude is drawn on a log scale (a ratio is then
the gap between the bars' ends, not their lengths).

matplotlib comes with the ``bench`` extra (``pip install -e '.[bench]'``), not with rowsync
nor with the development set: only whoever draws the charts needs it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
COLOURS = {True: "#2e7d32", False: "#c62828", None: "#1565c0"}
BASELINE = "#9e9e9e"
SECONDS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns"))


def group(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Results by benchmark: the first word of their name ("fanout redis, 4 nodes" is one of
    the ``fanout`` benchmark's configurations), in the order they were run."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        groups[result["name"].split()[0].rstrip(",")].append(result)
    return groups


def label(result: dict[str, Any], benchmark: str) -> str:
    """The bar's label: the metric, after what the name adds to the benchmark's (its
    configuration), if anything."""
    configuration = result["name"].removeprefix(benchmark).strip(" ,")
    return f"{configuration}: {result['metric']}" if configuration else result["metric"]


def scale(unit: str, values: list[float]) -> tuple[float, str]:
    """A divisor and a unit that keep times readable (ms, µs); other units as they are."""
    if unit != "s":
        return 1.0, unit
    largest = max((abs(v) for v in values), default=0.0)
    for factor, name in SECONDS:
        if largest >= factor:
            return factor, name
    return SECONDS[-1]


def panel(ax: Any, rows: list[dict[str, Any]], benchmark: str, unit: str) -> None:
    values = [r["value"] for r in rows] + [r["baseline"] for r in rows if r["baseline"]]
    factor, shown = scale(unit, values)
    height = 0.4
    ticks, names = [], []
    for i, r in enumerate(reversed(rows)):  # first row on top
        goal = r.get("goal")
        met = None if goal is None else bool(goal["met"])
        y = i * 1.0
        ax.barh(y + height / 2, r["value"] / factor, height, color=COLOURS[met])
        if r["baseline"] is not None:
            ax.barh(y - height / 2, r["baseline"] / factor, height, color=BASELINE)
        ticks.append(y)
        names.append(label(r, benchmark))
    ax.set_yticks(ticks, names, fontsize=8)
    ax.set_xlabel(shown)
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_xscale("log")
    ax.grid(axis="x", alpha=0.3)


def chart(benchmark: str, rows: list[dict[str, Any]], report: dict[str, Any], out: Path) -> Path:
    by_unit: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_unit[r["unit"]].append(r)
    sizes = [len(panel_rows) for panel_rows in by_unit.values()]
    fig, axes = plt.subplots(
        len(by_unit),
        1,
        figsize=(10, 1.2 + 0.5 * sum(sizes) + 0.6 * len(sizes)),
        gridspec_kw={"height_ratios": sizes},
        squeeze=False,
    )
    for ax, (unit, panel_rows) in zip(axes[:, 0], by_unit.items(), strict=True):
        panel(ax, panel_rows, benchmark, unit)
    machine = report.get("machine", {})
    where = machine.get("host") or machine.get("platform", "?")
    fig.suptitle(
        f"{benchmark}: {report.get('when', '?')}{' (quick)' if report.get('quick') else ''}\n"
        f"{where}, {machine.get('cpu', 'cpu ?')}, {machine.get('cpus', '?')} cpus,"
        f" Python {machine.get('python', '?')}; grey: the same run's baseline",
        fontsize=9,
    )
    fig.tight_layout()
    path = out / f"{re.sub(r'[^a-z0-9]+', '-', benchmark.lower()).strip('-')}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="?", type=Path, default=HERE / "results.json")
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE.parent / "docs" / "charts",
        help="where to write them (the docs show them)",
    )
    args = parser.parse_args(argv)
    report = json.loads(args.results.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    for benchmark, rows in group(report["results"]).items():
        print(f"wrote {chart(benchmark, rows, report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
