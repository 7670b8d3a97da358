"""The simulator's runtime on every shared trace, and the headline tables of
docs/simulation.md.

    python benchmarks/sim.py                 # time `kflume sim` on each trace in ../shared/traces
    python benchmarks/sim.py --headline      # the cost / TPOT tables of docs/simulation.md

Runtime: each trace through the default systems with JSON and plots, as a user runs it
(`python -m kflume sim --trace T --json ... --plot ...`), wall time of the whole command
(Python start, imports, loading, four systems, plots) against the 30 s limit for the
49K-call agentic trace.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "traces"
LIMIT_S = 30.0  # the 49K-call agentic trace, on a 2-core machine

HEADLINE = [
    # (label, trace, extra CLI arguments)
    ("agentic, Llama-3.1-8B", "kv_cache_tester_requests.csv", ["--until-s", "last-start"]),
    ("agentic, Llama-3.1-70B", "kv_cache_tester_requests.csv",
     ["--until-s", "last-start", "--model", "llama-3.1-70b"]),
    ("agentic, Llama-3.1-8B, TPOT target 25 ms", "kv_cache_tester_requests.csv",
     ["--until-s", "last-start", "--slo-tpot-ms", "25"]),
    ("agentic, Llama-3.1-8B, whole trace", "kv_cache_tester_requests.csv", []),
    ("Mooncake conversation, Llama-3.1-8B", "conversation_trace.jsonl", []),
    ("Mooncake conversation, Llama-3.1-70B", "conversation_trace.jsonl",
     ["--model", "llama-3.1-70b"]),
]
SYSTEMS = "colocated,instance,kflume,kflume-l40s,kflume-a6000"


def kflume_sim(args: list[str], out: Path) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "kflume", "sim", *args, "--json", str(out / "r.json"),
           "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    return wall, json.loads((out / "r.json").read_text())


def runtimes() -> int:
    if not SHARED.is_dir():
        print(f"{SHARED} not found: the full traces live in ../shared/traces")
        return 1
    print("| trace | calls | wall s (kflume sim, 4 systems, JSON + plots) | limit |")
    print("|---|---|---|---|")
    worst = 0.0
    for path in sorted(p for p in SHARED.iterdir() if p.suffix in (".csv", ".jsonl", ".json")):
        with tempfile.TemporaryDirectory() as tmp:
            wall, res = kflume_sim(["--trace", str(path), "--plot", str(Path(tmp) / "p")],
                                   Path(tmp))
        calls = next(iter(res.values()))["calls"]
        limit = f"{LIMIT_S:.0f} s" if calls > 40_000 else "-"
        if calls > 40_000:
            worst = max(worst, wall)
        print(f"| {path.name} | {calls:,} | {wall:.1f} | {limit} |")
    print(f"\nagentic trace: {worst:.1f} s against the {LIMIT_S:.0f} s limit: "
          f"{'met' if worst < LIMIT_S else 'NOT met'}")
    return 0 if worst < LIMIT_S else 1


def headline() -> int:
    for label, trace, extra in HEADLINE:
        with tempfile.TemporaryDirectory() as tmp:
            _, res = kflume_sim(["--trace", str(SHARED / trace), "--systems", SYSTEMS, *extra],
                                Path(tmp))
        base = res["instance"]["dollars_per_mtok"]
        print(f"\n{label} (`kflume sim --trace {trace} --systems {SYSTEMS} {' '.join(extra)}`)\n")
        print("| system | $/Mtok | saving vs instance | GPU-h | TPOT p50 / p99 ms | "
              "TTFT p50 / p99 s | SLO met | recomputed Mtok |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in res.items():
            saving = 1 - r["dollars_per_mtok"] / base
            print(f"| {name} | {r['dollars_per_mtok']:.2f} | {saving:+.0%} | "
                  f"{sum(r['gpu_hours'].values()):.0f} | {r['tpot_p50_ms']:.1f} / "
                  f"{r['tpot_p99_ms']:.1f} | {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.1f} | "
                  f"{r['slo_attainment']:.1%} | {r['recomputed_tokens'] / 1e6:.0f} |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--headline", action="store_true", help="print the headline tables instead")
    args = p.parse_args()
    return headline() if args.headline else runtimes()


if __name__ == "__main__":
    raise SystemExit(main())
