"""Garbage-collector settings for the long-running, allocation-heavy goldstream processes.

A worker and a replay allocate many short-lived objects per record (validated messages, match
rows, Redis replies) while they hold many long-lived ones (item states they may need again, the
modules they imported). CPython's default thresholds then run a full collection every few
thousand records, each one walking every long-lived object: measured on the stream benchmark's
worker, 19 full collections took 4.9 s of 11.9 s of CPU (41 %). Nothing goldstream keeps relies
on the cycle collector to be freed promptly (its state is acyclic; cycles come from exceptions
and asyncio internals), so collecting the young generation less often and the old one rarely
costs memory bounded by the thresholds, not a leak.
"""

from __future__ import annotations

import gc

# Young collections every 10,000 net container allocations instead of 700. The middle generation
# after every second young one instead of every tenth: its collections walk what survived the
# young ones (parsed item states the worker keeps), so ten young generations' survivors made one
# 30 ms pause every few seconds, in the middle of a batch: the stream benchmark's p99 at half load
# went from 52 to 37 ms with them split into small pauses, for the same total work. A full
# collection after 1,000 middle ones (CPython also waits until a quarter of the old objects are
# new): full collections come no more often than with (10,000, 10, 100).
THRESHOLDS = (10_000, 1, 1_000)

# Item states a replay keeps parsed (`streams.replay.KeptItems`); the others as their JSON, about a
# tenth of the memory: a replay holds every item within retention.
PARSED_ITEMS = 20_000


def tune_gc(thresholds: tuple[int, int, int] = THRESHOLDS) -> None:
    """Move what exists now (imports, settings) out of the collector's view and set the
    thresholds: call once a process has loaded its code, before its hot loop."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)


__all__ = ["PARSED_ITEMS", "THRESHOLDS", "tune_gc"]
