"""Where a request's global positions sit among a node's local positions.

A node keeps a request's tokens in its first `n` local positions, in arrival order
(attention does not depend on order), and records the global positions as segments
`[global_start, global_end, local_start]`, so that a global range can be exported
for migration.
"""

from __future__ import annotations

__all__ = ["add_segment", "locate"]


def add_segment(segments: list[list[int]], start: int, end: int, local: int) -> None:
    """Record that global [start, end) sits at local positions [local, local + end - start)."""
    if segments:
        last = segments[-1]
        if last[1] == start and last[2] + (last[1] - last[0]) == local:
            last[1] = max(last[1], end)
            return
        if last[2] <= local < last[2] + (last[1] - last[0]):  # rewrite of the last tokens
            return
    segments.append([start, end, local])


def locate(segments: list[list[int]], start: int, end: int, rid) -> list[int]:
    """Local positions of global positions [start, end); all must be held."""
    out: list[int] = []
    pos = start
    for g0, g1, local in sorted(segments):
        if g1 <= pos or g0 >= end:
            continue
        if g0 > pos:
            break
        stop = min(g1, end)
        out.extend(range(local + pos - g0, local + stop - g0))
        pos = stop
        if pos >= end:
            break
    if pos < end:
        raise ValueError(f"request {rid!r}: this node does not hold positions [{pos}, {end})")
    return out
