"""Python's garbage-collector pauses in this process, for finding slow decode steps.

A collection stops every Python thread of the process: on an attention node's serving
loop or a weight node's transport thread, a pause of a millisecond is a slot answered a
millisecond late. `gc_pauses()` returns the process's watcher (installed on first use,
through `gc.callbacks`); it keeps the last pauses with when they began
(`time.perf_counter()` seconds, one clock for the processes of a Linux host) and how long
they took. A node reports them in `stats(trace=n)` (kflume/node/server.py); benchmarks/e2e.py
compares them with its slow steps.
"""

from __future__ import annotations

import gc
import time
from collections import deque


class GcPauses:
    """Collections since install: `count`, and the last `keep` as (began, seconds,
    generation) in `recent`."""

    def __init__(self, keep: int = 512) -> None:
        self.count = 0
        self.recent: deque[tuple[float, float, int]] = deque(maxlen=keep)
        self._began = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.count += 1
            self.recent.append((self._began, time.perf_counter() - self._began,
                                info.get("generation", -1)))

    def since(self, t: float) -> list[tuple[float, float, int]]:
        """The kept pauses that began at or after `t`."""
        return [p for p in self.recent if p[0] >= t]


_WATCHER: GcPauses | None = None


def gc_pauses() -> GcPauses:
    """This process's watcher, installed on the first call."""
    global _WATCHER
    if _WATCHER is None:
        _WATCHER = GcPauses()
        gc.callbacks.append(_WATCHER)
    return _WATCHER
