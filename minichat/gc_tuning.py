"""The cyclic garbage collector, tuned for processes that allocate per record and keep little.

With CPython's default thresholds (700, 10, 10) the collector took about 12 % of a rebuild's CPU
(docs/performance.md, Session 6): a young collection every 700 net allocations, and full ones that
walk every long-lived object — the imported modules, pydantic's validators, the id caches. Nearly
everything a batch allocates is freed by reference counting, so collections rarely find anything.
`tune_gc` moves what exists at start out of the collector's sight (`gc.freeze`) and collects far
less often; cyclic garbage is still collected, 50,000 net allocations at the latest."""

from __future__ import annotations

import gc

GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Call once the process has started (its modules, settings and policy loaded)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
