"""`kflume sim`: replay a trace through the simulated systems; print, write JSON, plot.

    kflume sim                                   # the bundled agentic sample
    kflume sim --trace ../shared/traces/kv_cache_tester_requests.csv --json out.json --plot plots/
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .config import SimConfig
from .hardware import GPU_NAMES
from .loaders import FORMATS, load_trace
from .models import MODELS
from .runner import SimRun
from .workload import build_workload

__all__ = ["DEFAULT_TRACE", "main"]

DEFAULT_TRACE = Path(__file__).resolve().parent.parent / "data" / "traces" / \
    "kv_cache_tester_sample.csv"
_D = SimConfig()


def _price(text: str) -> tuple[str, float]:
    gpu, _, usd = text.partition("=")
    try:
        return gpu.strip().lower(), float(usd)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--price wants GPU=USD_PER_HOUR, got {text!r}") from None


def _until(text: str) -> float | str:
    if text == "last-start":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--until-s wants seconds or 'last-start', got {text!r}") \
            from None


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already says what the default is."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kflume sim", formatter_class=_Defaults,
        description="Replay an LLM trace through colocated replicas, instance-level "
                    "autoscaling and kflume's elastic attention nodes; report $/Mtok, TPOT, "
                    "TTFT and SLO attainment per system (docs/simulation.md).")
    a = p.add_argument
    a("--trace", type=Path, default=DEFAULT_TRACE,
      help="trace file (or a directory of kv-cache-tester JSON sessions); format detected")
    a("--format", choices=FORMATS, default=None,
      help="trace format, instead of detecting it (default: detected)")
    a("--json", type=Path, default=None,
      help="write the results, keyed by system, to this file (default: none)")
    a("--plot", type=Path, default=None,
      help="write PNG plots to this directory (default: none)")
    a("--systems", default=",".join(_D.systems),
      help="comma-separated: colocated, instance, kflume, kflume-<gpu>")
    a("--model", choices=sorted(MODELS), default=_D.model, help="model preset")
    a("--gpu", choices=GPU_NAMES, default=_D.gpu, help="GPU of replicas and weight nodes")
    a("--attention-gpu", choices=GPU_NAMES, default=_D.attention_gpu,
      help="GPU of the 'kflume' system's attention nodes")
    a("--tp", type=int, default=None, help="GPUs per replica / weight node (default: the "
      "fewest whose memory the weights fill to at most 60 %%)")
    a("--session-rate", type=float, default=0.05,
      help="sessions started per second (session traces)")
    a("--request-rate", type=float, default=None,
      help="rescale a request-level trace to this mean rate, requests/s (default: its own)")
    a("--max-sessions", type=int, default=None,
      help="replay only the first N sessions (default: all)")
    a("--until-s", type=_until, default=None,
      help="drop calls arriving after this many seconds, or 'last-start' (once every "
           "session has started) (default: replay all)")
    a("--seed", type=int, default=0, help="seed of the synthetic session arrivals")
    a("--slo-tpot-ms", type=float, default=_D.slo_tpot_ms, help="TPOT target, ms")
    a("--price-tier", choices=("community", "secure"), default=_D.price_tier,
      help="price column of kflume/sim/hardware.json")
    a("--price", type=_price, action="append", default=[], metavar="GPU=USD",
      help="override a GPU's price per hour, repeatable (default: kflume/sim/hardware.json)")
    a("--chunk-tokens", type=int, default=_D.chunk_tokens,
      help="prefill tokens a step carries at most (fewer to keep a step under the TPOT target)")
    a("--max-batch", type=int, default=_D.max_batch, help="requests per replica / weight node")
    a("--replicas", type=int, default=None,
      help="colocated replica count (default: the instance system's peak)")
    a("--warm-start-s", type=float, default=_D.warm_start_s, help="warm instance start, s")
    a("--cold-start-s", type=float, default=_D.cold_start_s, help="cold instance start, s")
    a("--keep-warm-s", type=float, default=_D.keep_warm_s,
      help="a released host starts the next instance warm for this long, s")
    a("--attention-start-s", type=float, default=_D.attention_start_s,
      help="a new attention node's time to serve, s")
    a("--reserve-idle", action="store_true",
      help="size kflume's attention nodes for idle sessions' KV too, not only live KV")
    a("--session-ttl-s", type=float, default=None,
      help="kflume keeps an idle session's KV this long, s (default: until holding it would "
           "cost more than recomputing it)")
    a("--policy-interval-s", type=float, default=_D.policy_interval_s,
      help="how often the autoscaler decides, s")
    a("--min-nodes", type=int, default=_D.min_nodes, help="autoscaling floor")
    a("--max-nodes", type=int, default=_D.max_nodes, help="autoscaling ceiling")
    a("--quiet", action="store_true", help="no progress bar, no table (default: both)")
    return p


def _progress(enabled: bool):
    if not enabled:
        return None, []
    try:
        from tqdm import tqdm
    except ImportError:
        return None, []
    bars = []

    def factory(name: str, total: int):
        for old in bars:
            old.close()
        bar = tqdm(total=total, desc=f"{name:>12}", unit="call", leave=True, file=sys.stderr)
        bars.append(bar)

        def update(done: int):
            bar.update(done - bar.n)
        return update
    return factory, bars


def _finite(x):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _table(results) -> str:
    rows = [("system", "$/Mtok", "GPU-h", "TPOT p50/p99 ms", "TTFT p50/p99 s", "SLO", "preempt",
             "queue s", "rejected")]
    for name, r in results.items():
        rows.append((name, f"{r.dollars_per_mtok:.2f}", f"{sum(r.gpu_hours.values()):.1f}",
                     f"{r.tpot_p50_ms:.1f} / {r.tpot_p99_ms:.1f}",
                     f"{r.ttft_p50_s:.2f} / {r.ttft_p99_s:.1f}", f"{r.slo_attainment:.1%}",
                     str(r.preemptions), f"{r.queue_delay_mean_s:.2f}", str(r.rejected_calls)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = SimConfig(
            systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()),
            model=args.model, gpu=args.gpu, attention_gpu=args.attention_gpu, tp=args.tp,
            price_tier=args.price_tier, prices=dict(args.price), slo_tpot_ms=args.slo_tpot_ms,
            chunk_tokens=args.chunk_tokens, max_batch=args.max_batch, replicas=args.replicas,
            warm_start_s=args.warm_start_s, cold_start_s=args.cold_start_s,
            keep_warm_s=args.keep_warm_s, attention_start_s=args.attention_start_s,
            reserve_idle=args.reserve_idle, session_ttl_s=args.session_ttl_s,
            policy_interval_s=args.policy_interval_s,
            min_nodes=args.min_nodes, max_nodes=args.max_nodes)
        t0 = time.perf_counter()
        trace = load_trace(args.trace, args.format)
        work = build_workload(trace, session_rate=args.session_rate,
                              request_rate=args.request_rate, max_groups=args.max_sessions,
                              until_s=args.until_s, seed=args.seed)
        run = SimRun(work, cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"kflume sim: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"{trace.name}: {trace.format}, {len(work)} calls, {len(work.session_names)} "
              f"sessions, {work.output_tokens:,} output tokens; {cfg.model} on {cfg.gpu} "
              f"(tp {run.tp})", file=sys.stderr)
    factory, bars = _progress(not args.quiet)
    results = run.run(factory)
    for bar in bars:
        bar.close()
    elapsed = time.perf_counter() - t0
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(_finite({k: r.to_dict() for k, r in results.items()}), f, indent=1)
    if args.plot is not None:
        from .plots import write_plots

        try:
            write_plots(args.plot, results, run.recorders, cfg.slo_tpot_ms)
        except ImportError as e:
            print(f"kflume sim: {e}", file=sys.stderr)
            return 2
    if not args.quiet:
        print(_table(results))
        print(f"simulated in {elapsed:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
