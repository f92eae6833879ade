"""The invariant behind sync's cost: the index a sync keeps current describes the tree exactly
as a fresh walk of it does. Checked after every sync of the suite (``conftest.py``), so every
test - the generated mappings and workloads included - also tests the index upkeep."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rowsync import tree
from rowsync.sync import Syncer


def described(index: tree.Index) -> dict[str, Any]:
    """What an index says of its tree, by object identity."""
    return {
        "objects": {k: sorted(map(id, v)) for k, v in index.objects.items() if v},
        "loaded": {k: set(v) for k, v in index.loaded.items() if v},
        "holders": {
            k: Counter((id(p), key) for p, key in v) for k, v in index.holders.items() if v
        },
        "roots": set(index.roots),
        "by_local": {
            k: {values: sorted(map(id, parents)) for values, parents in found.items() if parents}
            for k, (_, found) in index._by_local.items()
        },
    }


def check_after_sync(syncer: Syncer, value: Any) -> None:
    """The index cached for ``value`` (if any) equals a fresh walk of it."""
    cached = syncer._indexes.get(id(value))
    if cached is None or cached.value is not value:
        return
    roots = value if isinstance(value, list) else [value]
    if cached.index.generation != tree.Generation.outside or not cached.holds(roots):
        return  # stale: the next sync walks the tree again
    fresh = tree.Index.of(roots)
    for key, (columns, _) in cached.index._by_local.items():
        fresh.by_local(*key, columns)
    kept, walked = described(cached.index), described(fresh)
    assert kept == walked, {k: (kept[k], walked[k]) for k in kept if kept[k] != walked[k]}
