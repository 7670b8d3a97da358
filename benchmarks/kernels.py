"""Split-KV decode attention and merge: kflume against cuDNN, flash SDPA and FlashInfer.

Llama-3.1-8B attention shape (Hq 32, Hkv 8, D 128, bf16), one decode token per request.
For each B x L, in CUDA graphs: kflume on a paged pool (page 16, pages shuffled), with
softcap 50 and on a contiguous NHD cache; cuDNN SDPA and flash SDPA (`enable_gqa=True`,
contiguous [B, H, L, D]); FlashInfer's paged decode (NHD, return_lse, tensor cores on
and off) where flashinfer imports; KV read rate (bytes of K and V over time), its
share of the measured device copy bandwidth and the limit (KV bytes / copy bandwidth).
Then the merge of N=8 partials at B=32.

`--eager` times calls as a user's eager loop makes them instead (back-to-back calls,
device time per call from events around the loop, and host time per call): kflume with
default arguments, with out/lse given and through a SplitKVPlan, against FlashInfer's
eager `run`, each beside its CUDA-graph time and the limit.

    python benchmarks/kernels.py            # the table for docs/benchmarks.md
    python benchmarks/kernels.py --eager    # eager calls at 1x8K and 8x32K
    python benchmarks/kernels.py --tune     # sweep kernel configurations first
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth_tbs, graph_time_us, header, save_json  # noqa: E402
from flashinfer_peer import FlashInferDecode  # noqa: E402
from flashinfer_peer import load as load_flashinfer  # noqa: E402

from kflume.kernels import SplitKVPlan, merge_attention_states, split_kv_attention  # noqa: E402
from kflume.kernels.split_kv import default_num_splits, launch_split_kv  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
SHAPES = {"1x8K": (1, 8192), "1x128K": (1, 131072), "8x32K": (8, 32768),
          "32x32K": (32, 32768), "16x128K": (16, 131072)}
EAGER_SHAPES = ["1x8K", "8x32K"]
SOFTCAP = 50.0  # Gemma2's attention-logit cap
EAGER_GOAL = 1.2  # an eager call with default arguments within 1.2x FlashInfer's


def kv_bytes(b: int, length: int) -> int:
    return b * length * HKV * D * 2 * 2


def copies_for(nbytes: int) -> int:
    """Rotate among enough copies that repeated calls cannot live in L2."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(8, math.ceil(4 * l2 / nbytes)))


def rotating(fn, sets):
    """A step that calls fn on the next input set each time (sets rotate in the graph)."""
    i = [0]

    def step():
        fn(*sets[i[0] % len(sets)])
        i[0] += 1
    return step


def make_paged(b: int, length: int, copies: int, gen: torch.Generator):
    pages = b * length // PAGE
    sets = []
    for _ in range(copies):
        k = torch.randn(pages, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn_like(k)
        pt = torch.randperm(pages, device="cuda", generator=gen).int().view(b, -1)
        sets.append((k, v, pt))
    return sets


def eager_time_us(step, *, calls: int = 200, repeats: int = 7) -> tuple[float, float]:
    """Per call, back to back as an eager loop makes them: (device us from events
    around the loop, host us spent issuing); medians over repeats, after a warm-up."""
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    dev_us, host_us = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        host_us.append((time.perf_counter() - t0) * 1e6 / calls)
        end.record()
        end.synchronize()
        dev_us.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(dev_us), statistics.median(host_us)


def flashinfer_sets(fi, paged, tensor_cores: bool, graph: bool):
    """(k, v, wrapper) per copy: each wrapper planned for its copy's page lists."""
    return [(k, v, FlashInferDecode(fi, pt, HQ, HKV, D, PAGE, torch.bfloat16,
                                    tensor_cores=tensor_cores, graph=graph))
            for k, v, pt in paged]


def bench_flashinfer(res, fi, q, paged, out, lse, graph: bool, prefix: str = "fi") -> None:
    """FlashInfer with tensor cores on (tc) and off (cc) into res[f"{prefix}_{tc|cc}_us"]
    (graph) or res[f"{prefix}_{tc|cc}_eager"] ((device us, host us)); n/a if it fails."""
    for label, tc in (("tc", True), ("cc", False)):
        try:
            if isinstance(fi, str):
                raise RuntimeError(fi)
            sets = flashinfer_sets(fi, paged, tc, graph)
            k0, v0, w0 = sets[0]
            res[f"{prefix}_{label}_check"] = w0.check_against(q, k0, v0, out, lse)
            step = rotating(lambda k, v, w: w.run(q, k, v), sets)
            if graph:
                res[f"{prefix}_{label}_us"] = graph_time_us(step)
            else:
                res[f"{prefix}_{label}_eager"] = eager_time_us(step)
        except Exception as e:  # an absent or failing peer is reported, not hidden
            res[f"{prefix}_{label}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        sets = None
        torch.cuda.empty_cache()


def bench_shape(name: str, b: int, length: int, copy_tbs: float, gen, tune: bool, fi) -> dict:
    nbytes = kv_bytes(b, length)
    n = copies_for(nbytes)
    q = torch.randn(b, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    start = torch.zeros(b, device="cuda", dtype=torch.int32)
    lens = torch.full((b,), length, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    lse = torch.empty(b, HQ, device="cuda", dtype=torch.float32)
    paged = make_paged(b, length, n, gen)

    # Correctness at this size against SDPA in fp32 math on the first copy.
    k0, v0, pt0 = paged[0]
    split_kv_attention(q, k0, v0, pt0, start, lens, out=out, lse=lse)
    c = min(b, 2)  # requests checked (an fp32 copy of all KV would not fit at 16x128K)
    kc = k0[pt0[:c].long()].reshape(c, length, HKV, D).transpose(1, 2)
    vc = v0[pt0[:c].long()].reshape(c, length, HKV, D).transpose(1, 2)
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q[:c].float().unsqueeze(2), kc.float(), vc.float(),
                                             enable_gqa=True).squeeze(2)
    err = ((out[:c].float() - ref).norm() / ref.norm()).item()
    del kc, vc, ref

    res = {"shape": name, "B": b, "L": length, "kv_bytes": nbytes, "copies": n, "rel_err": err,
           "splits": default_num_splits(b, HKV, length, torch.cuda.get_device_properties(0)
                                        .multi_processor_count)}
    if tune:
        res["tune"] = tune_shape(q, paged, start, lens, out, lse, res["splits"])

    us = graph_time_us(rotating(lambda k, v, pt: split_kv_attention(
        q, k, v, pt, start, lens, out=out, lse=lse, check=False), paged))
    res["kflume_us"] = us
    res["kflume_softcap_us"] = graph_time_us(rotating(lambda k, v, pt: split_kv_attention(
        q, k, v, pt, start, lens, out=out, lse=lse, check=False, softcap=SOFTCAP), paged))
    split_kv_attention(q, k0, v0, pt0, start, lens, out=out, lse=lse)  # the answer to match
    bench_flashinfer(res, fi, q, paged, out, lse, graph=True)
    # The same pool viewed as a contiguous cache [B, L, Hkv, D] (pages in identity order).
    contig = [(k.view(b, length, HKV, D), v.view(b, length, HKV, D), None) for k, v, _ in paged]
    res["kflume_contig_us"] = graph_time_us(rotating(lambda k, v, _: split_kv_attention(
        q, k, v, None, start, lens, out=out, lse=lse, check=False), contig))
    del paged, contig
    torch.cuda.empty_cache()

    # SDPA peers on contiguous HND caches.
    sdpa_sets = [(torch.randn(b, HKV, length, D, device="cuda", dtype=torch.bfloat16,
                              generator=gen),
                  torch.randn(b, HKV, length, D, device="cuda", dtype=torch.bfloat16,
                              generator=gen)) for _ in range(n)]
    q4 = q.unsqueeze(2)
    for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                           ("flash", SDPBackend.FLASH_ATTENTION)):
        def sdpa(k, v, backend=backend):
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
        try:
            res[f"{label}_us"] = graph_time_us(rotating(sdpa, sdpa_sets))
        except Exception as e:  # a backend that refuses this shape is reported, not hidden
            res[f"{label}_us"] = None
            res[f"{label}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    del sdpa_sets
    torch.cuda.empty_cache()
    for key in ("kflume", "kflume_contig", "cudnn", "flash", "fi_tc", "fi_cc"):
        us = res.get(f"{key}_us")
        res[f"{key}_tbs"] = nbytes / (us * 1e-6) / 1e12 if us else None
    res["pct_copy_bw"] = 100 * res["kflume_tbs"] / copy_tbs
    res["limit_us"] = nbytes / (copy_tbs * 1e12) * 1e6
    return res


def bench_eager(name: str, b: int, length: int, copy_tbs: float, gen, fi) -> dict:
    """Eager calls (default arguments, out/lse given, a SplitKVPlan) against FlashInfer's
    eager run; each beside its CUDA-graph time."""
    nbytes = kv_bytes(b, length)
    q = torch.randn(b, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    start = torch.zeros(b, device="cuda", dtype=torch.int32)
    lens = torch.full((b,), length, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    lse = torch.empty(b, HQ, device="cuda", dtype=torch.float32)
    paged = make_paged(b, length, copies_for(nbytes), gen)
    plan = SplitKVPlan(b, HQ, HKV, D, PAGE, paged[0][2].shape[1], dtype=q.dtype, device="cuda")
    kflume = {
        "kflume, default arguments": lambda k, v, pt: split_kv_attention(q, k, v, pt, start, lens),
        "kflume, out= lse= given": lambda k, v, pt: split_kv_attention(
            q, k, v, pt, start, lens, out=out, lse=lse),
        "kflume, SplitKVPlan.run": lambda k, v, pt: plan.run(q, k, v, pt, start, lens, out=out,
                                                             lse=lse),
    }
    res = {"shape": name, "B": b, "L": length, "kv_bytes": nbytes, "splits": plan.num_splits,
           "limit_us": nbytes / (copy_tbs * 1e12) * 1e6, "rows": {}}
    for label, fn in kflume.items():
        step = rotating(fn, paged)
        res["rows"][label] = (*eager_time_us(step), graph_time_us(step))
    k0, v0, pt0 = paged[0]
    split_kv_attention(q, k0, v0, pt0, start, lens, out=out, lse=lse)
    bench_flashinfer(res, fi, q, paged, out, lse, graph=False)
    bench_flashinfer(res, fi, q, paged, out, lse, graph=True)
    for label in ("tc", "cc"):
        if f"fi_{label}_eager" in res:
            res["rows"][f"FlashInfer, tensor cores {'on' if label == 'tc' else 'off'}"] = (
                *res[f"fi_{label}_eager"], res.get(f"fi_{label}_us"))
    del paged
    torch.cuda.empty_cache()
    return res


def print_eager(results: list[dict], copy_tbs: float) -> None:
    print(header("Eager calls: kflume split_kv_attention vs FlashInfer decode "
                 "(Hq 32, Hkv 8, D 128, bf16, page 16)"))
    print(f"device copy bandwidth (read + write): {copy_tbs:.2f} TB/s; limit = KV bytes / "
          "copy bandwidth\n")
    print("| shape | call | eager us/call | host us/call | graph us | limit us |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for label, (dev_us, host_us, graph_us) in r["rows"].items():
            print(f"| {r['shape']} ({r['splits']} splits) | {label} | {dev_us:.1f} | "
                  f"{host_us:.1f} | {fmt(graph_us)} | {r['limit_us']:.1f} |")
    for r in results:
        for key in ("fi_tc_check", "fi_cc_check", "fi_tc_error", "fi_cc_error"):
            if key in r:
                print(f"{r['shape']}: {key}: {r[key]}")
        ours = r["rows"]["kflume, default arguments"][0]
        peers = [v[0] for k, v in r["rows"].items() if k.startswith("FlashInfer")]
        if peers:
            best = min(peers)
            verdict = "met" if ours <= EAGER_GOAL * best else "not met"
            print(f"{r['shape']}: goal eager default <= {EAGER_GOAL} x FlashInfer's best eager "
                  f"({best:.1f} us): {ours:.1f} us = {ours / best:.2f}x, {verdict}")
        else:
            print(f"{r['shape']}: goal not checked: no FlashInfer figure")


def tune_shape(q, paged, start, lens, out, lse, splits0) -> list[dict]:
    """Time kernel configurations on this shape; returns them fastest first."""
    n = len(paged)
    scale = q.shape[-1] ** -0.5
    rows = []

    def time_cfg(block_n, warps, stages, splits):
        i = [0]

        def step():
            k, v, pt = paged[i[0] % n]
            launch_split_kv(q, k, v, pt, start, lens, out, lse, scale, splits,
                            block_n=block_n, num_warps=warps, num_stages=stages)
            i[0] += 1
        try:
            us = graph_time_us(step, calls=5, repeats=10)
        except Exception as e:
            us = float("inf")
            print(f"  config {block_n}/{warps}/{stages}/{splits} failed: {e}", file=sys.stderr)
        rows.append(dict(block_n=block_n, warps=warps, stages=stages, splits=splits, us=us))
        return us

    for block_n in (64, 128):
        for warps in (4, 8):
            for stages in (3, 4):
                time_cfg(block_n, warps, stages, splits0)
    best = min(rows, key=lambda r: r["us"])
    for mult in (0.25, 0.5, 2, 4):
        s = max(1, int(splits0 * mult))
        if s != splits0:
            time_cfg(best["block_n"], best["warps"], best["stages"], s)
    rows.sort(key=lambda r: r["us"])
    return rows


def bench_merge(split_us_32x32k: float | None, gen) -> dict:
    b, n = 32, 8
    outs = torch.randn(n, b, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    lses = torch.randn(n, b, HQ, device="cuda", generator=gen)
    out = torch.empty(b, HQ, D, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(b, HQ, device="cuda")
    us = graph_time_us(lambda: merge_attention_states(outs, lses, out=out, lse=lse))
    res = {"merge_us": us, "N": n, "B": b}
    if split_us_32x32k:
        res["pct_of_split_32x32K"] = 100 * us / split_us_32x32k
    return res


def fmt(x, spec=".1f"):
    return "n/a" if x is None else format(x, spec)


def print_graph_table(results: list[dict], merge: dict, copy_tbs: float, tune: bool) -> None:
    print(header("kflume split-KV decode attention vs SDPA and FlashInfer (Hq 32, Hkv 8, "
                 "D 128, bf16)"))
    print(f"device copy bandwidth (read + write): {copy_tbs:.2f} TB/s")
    if tune:
        for r in results:
            print(f"\ntuning {r['shape']} (fastest 5 of {len(r['tune'])}):")
            for row in r["tune"][:5]:
                print(f"  block_n {row['block_n']:3d} warps {row['warps']} stages "
                      f"{row['stages']} splits {row['splits']:2d}: {row['us']:8.1f} us")
    print()
    cols = ("shape", "splits", "kflume us", "TB/s", "% copy", "limit us", "softcap us",
            "contig us", "cuDNN us", "flash us", "FI tc us", "FI cc us", "time / cuDNN",
            "rel err")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        ratio = r["kflume_us"] / r["cudnn_us"] if r.get("cudnn_us") else None
        print("| " + " | ".join([
            r["shape"], str(r["splits"]), fmt(r["kflume_us"]), fmt(r["kflume_tbs"], ".2f"),
            fmt(r["pct_copy_bw"], ".0f"), fmt(r["limit_us"]), fmt(r["kflume_softcap_us"]),
            fmt(r["kflume_contig_us"]), fmt(r.get("cudnn_us")), fmt(r.get("flash_us")),
            fmt(r.get("fi_tc_us")), fmt(r.get("fi_cc_us")), fmt(ratio, ".2f"),
            f"{r['rel_err']:.1e}"]) + " |")
    for r in results:
        for key in ("cudnn_error", "flash_error", "fi_tc_error", "fi_cc_error", "fi_tc_check",
                    "fi_cc_check"):
            if key in r:
                print(f"{r['shape']}: {key}: {r[key]}")
    print(f"\nmerge N={merge['N']} partials, B={merge['B']}: {merge['merge_us']:.1f} us"
          + (f" = {merge['pct_of_split_32x32K']:.2f}% of split-KV at 32x32K"
             if "pct_of_split_32x32K" in merge else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", default=None, choices=list(SHAPES),
                   help=f"default: all ({', '.join(EAGER_SHAPES)} with --eager)")
    p.add_argument("--eager", action="store_true",
                   help="time eager calls (kflume default arguments, plan/run) vs FlashInfer")
    p.add_argument("--tune", action="store_true", help="sweep kernel configurations per shape")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (python -m kflume.kernels.check runs "
                 "anywhere; benchmarks/kernels_host.py times the host side on a CPU)")
    shapes = args.shapes or (EAGER_SHAPES if args.eager else list(SHAPES))
    gen = torch.Generator(device="cuda").manual_seed(0)
    fi = load_flashinfer()
    if isinstance(fi, str):
        print(f"peer: {fi}; FlashInfer columns print n/a")
    copy_tbs = copy_bandwidth_tbs()
    if args.eager:
        results = [bench_eager(name, *SHAPES[name], copy_tbs, gen, fi) for name in shapes]
        print_eager(results, copy_tbs)
        save_json("kernels_eager.json", {"copy_tbs": copy_tbs, "results": results})
        return
    results = [bench_shape(name, *SHAPES[name], copy_tbs, gen, args.tune, fi)
               for name in shapes]
    by_name = {r["shape"]: r for r in results}
    merge = bench_merge(by_name.get("32x32K", {}).get("kflume_us"), gen)
    print_graph_table(results, merge, copy_tbs, args.tune)
    save_json("kernels.json", {"copy_tbs": copy_tbs, "results": results, "merge": merge})


if __name__ == "__main__":
    main()
