"""Where a captured step's time goes, from its traces (benchmarks/e2e.py's report).

Inputs: a `CapturedRemoteAttention`'s `serving.trace` (`LayerTrace` per served point)
and `serving.step_trace` (`StepTrace` per step), and a node's `stats(trace=n)` entries
(`[seq, layer or op, seen, launched, sent]`, time.perf_counter() seconds: one clock for
the processes of a Linux host).
"""

from __future__ import annotations

import bisect
import statistics


def points(trace) -> dict:
    """Medians per served point (a layer of a micro-batch), µs: the host's reaction and
    sends; at the nodes and on the wire; reply handling and release."""
    if not trace:
        return {}
    med = lambda f: round(statistics.median(f(t) for t in trace) * 1e6, 1)  # noqa: E731
    return {"send_us": med(lambda t: t.send_s), "remote_us": med(lambda t: t.remote_s),
            "release_us": med(lambda t: t.release_s), "n": len(trace)}


def per_step(trace) -> dict:
    """Per step (points start again at 0 each step): the median and largest remote time
    of its points (µs), and which point that was."""
    steps: list[list[float]] = []
    for t in trace:
        if t.point == 0 or not steps:
            steps.append([])
        steps[-1].append(t.remote_s * 1e6)
    return {"remote_us_median": [round(statistics.median(s), 1) for s in steps],
            "remote_us_max": [round(max(s), 1) for s in steps],
            "remote_max_point": [max(range(len(s)), key=s.__getitem__) for s in steps]}


def tails(step_trace) -> list[float]:
    """Per step, ms from its last point released to its appends and streams acknowledged."""
    return [round((s.acked - s.last_release) * 1e3, 3) for s in step_trace]


def one_way(trace, node_trace) -> dict:
    """Medians per point served by one node stream, µs, from both sides' clocks: q on the
    way (weight node sent -> node saw it), node launch, launch -> reply sent, reply on the
    way (node sent -> weight node saw it). A mailbox stream's reply is delivered by the
    layer's own graph: there "sent" is the launch, and the reply's way includes the
    node's kernels."""
    at_node = {(e[0], e[1]): e[2:] for e in node_trace}
    rows = []
    for t in trace:
        if len(t.streams) == 1 and (t.streams[0], t.layer) in at_node:
            seen, launched, sent = at_node[t.streams[0], t.layer]
            rows.append((seen - t.sent_at, launched - seen, sent - launched,
                         t.answered_at - sent))
    if not rows:
        return {}
    med = lambda i: round(statistics.median(r[i] for r in rows) * 1e6, 1)  # noqa: E731
    return {"q_us": med(0), "node_launch_us": med(1), "node_reply_us": med(2),
            "reply_us": med(3), "n": len(rows)}


def gc_in_steps(pauses, step_trace) -> list:
    """The collector pauses (began, seconds, generation) that began during a traced step
    (from its serving to the next one's): [step, ms, generation]."""
    if not step_trace:
        return []
    starts, end = [s.began for s in step_trace], step_trace[-1].acked
    out = []
    for began, secs, gen in pauses:
        i = bisect.bisect_right(starts, began) - 1
        if i >= 0 and (i < len(starts) - 1 or began <= end):
            out.append([i, round(secs * 1e3, 3), gen])
    return out


def slow_steps(run: dict, over: float = 1.05, most: int = 6) -> list[str]:
    """A timed run's slowest steps above `over` x its p50 (at most `most`), each with its
    slowest point, its wait for acknowledgements and the collector pauses in it."""
    steps, ps, gcs = run.get("steps_ms", []), run.get("per_step", {}), run.get("gc", {})
    slow = sorted((i for i, t in enumerate(steps) if t > over * run["p50_ms"]),
                  key=lambda i: -steps[i])[:most]

    def at(name, i):
        v = ps.get(name, [])
        return v[i] if i < len(v) else "?"

    def paused(side, i):
        return [ms for step, ms, _ in gcs.get(side, []) if step == i] or "-"

    return [f"step {i}: {steps[i]:.2f} (point {at('remote_max_point', i)}: "
            f"{at('remote_us_max', i)} us; tail {at('tail_ms', i)} ms; gc "
            f"{paused('weight', i)} / {paused('node', i)})" for i in sorted(slow)]
