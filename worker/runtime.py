"""Process-wide tuning the transports apply once start-up is done.

A fit allocates thousands of short-lived containers (parsed turns, dicts, result models)
and almost no reference cycles, while start-up leaves a large heap that never dies:
modules, pydantic schemas, the catalog, the vocabulary's rank tables. With CPython's
default thresholds the collector runs a young-generation pass every 700 allocations and
keeps re-walking that start-up heap in its older passes: about a tenth of a plain
request's CPU (`python -m benchmarks.engine_bench`). Freezing what start-up built moves
it out of the collector's sight (the CPython docs recommend it before forking, too: the
children then do not copy pages only to update collector bookkeeping), and a larger young
generation makes passes rarer. Cycles are still collected.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000
"""Allocations between young-generation passes (CPython's default: 700)."""


def settle_heap() -> None:
    """Freeze everything allocated so far and make young-generation passes rarer.

    Idempotent; call after start-up (and before forking), not per request.

    Only the young generations are collected first. A full collection here walks the whole
    start-up heap and finds next to nothing to free: measured, 19 ms and no object in
    `fit` (~6% of its start-up), 150 ms and 20 objects in the worker. Freezing keeps those
    few start-up cycles alive for good, a one-off cost bounded by start-up itself; cycles
    made later are collected as ever.
    """
    gc.collect(1)
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
