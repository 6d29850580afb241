"""The collector settings of long-running processes (streams.memory)."""

from __future__ import annotations

import gc

from goldstream.streams.memory import THRESHOLDS, tune_gc

CPYTHON_DEFAULTS = (700, 10, 10)


def test_tuning_the_collector_freezes_what_exists_and_collects_the_old_generation_rarely() -> None:
    before = gc.get_threshold()
    kept = [[i] for i in range(1000)]  # containers alive at tuning time: moved out of the collector's view
    try:
        gc.unfreeze()
        gc.set_threshold(*CPYTHON_DEFAULTS)  # another test of this process may have tuned it already
        tune_gc()
        assert gc.get_freeze_count() >= len(kept)
        assert gc.get_threshold() == THRESHOLDS
        assert THRESHOLDS[0] > CPYTHON_DEFAULTS[0] and THRESHOLDS[2] > CPYTHON_DEFAULTS[2]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
