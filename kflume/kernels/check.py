"""Check the kflume kernels on this machine and time them: `python -m kflume.kernels.check`.

Every case draws fresh random inputs, runs the kernel on the chosen device (CUDA: the
Triton kernels; CPU: the torch references) and compares it with a float64 reference.
Then it times split-KV attention at a decode shape. Exit status 1 if any check fails.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from kflume.kernels import append_kv, merge_attention_states, split_kv_attention
from kflume.kernels.reference import (
    append_kv_ref,
    merge_attention_states_ref,
    split_kv_attention_ref,
)
from kflume.testing import TOLERANCE, random_paged_kv, rel_err

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_split_kv(dev, dtype, group, head_dim, page_size, gen, softcap=None) -> float:
    lengths = [0, 1, 37, 513, 2000, 129]
    bsz = len(lengths)
    starts = torch.randint(0, 2 * page_size + 1, (bsz,), generator=gen)
    length = torch.tensor(lengths)
    pool = random_paged_kv(bsz, int((starts + length).max()), 2, head_dim, page_size,
                           dtype=dtype, device=dev, generator=gen)
    q = torch.randn(bsz, 2 * group, head_dim, generator=gen).to(dev, dtype)
    start, length = starts.to(dev, torch.int32), length.to(dev, torch.int32)
    out, lse = split_kv_attention(q, pool.k_cache, pool.v_cache, pool.page_table, start, length,
                                  softcap=softcap)
    ref, ref_lse = split_kv_attention_ref(q.double(), pool.k_cache.double(),
                                          pool.v_cache.double(), pool.page_table, start,
                                          length, head_dim**-0.5, softcap=softcap)
    if not torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse)):
        return float("inf")
    finite = torch.isfinite(ref_lse)
    if (lse[finite].double() - ref_lse[finite]).abs().max().item() > 1e-3:
        return float("inf")
    return rel_err(out, ref)


def check_merge(dev, dtype, gen, with_sinks=False) -> float:
    outs = torch.randn(8, 5, 6, 128, generator=gen).to(dev, dtype)
    lses = (torch.randn(8, 5, 6, generator=gen) * 3).to(dev)
    lses[:, 0] = float("-inf")
    sinks = torch.randn(6, generator=gen).to(dev, dtype) if with_sinks else None
    out, lse = merge_attention_states(outs, lses, sinks=sinks)
    ref, ref_lse = merge_attention_states_ref(outs.double(), lses.double(),
                                              sinks=None if sinks is None else sinks.double())
    empty_ok = torch.allclose(lse[0].double(), ref_lse[0], atol=1e-5) if with_sinks else bool(
        torch.isneginf(lse[0]).all())
    return rel_err(out, ref) if empty_ok else float("inf")


def check_append(dev, dtype, gen) -> float:
    pool = random_paged_kv(3, 100, 2, 128, 16, dtype=dtype, device=dev, generator=gen)
    offsets = torch.tensor([0, 15, 99], dtype=torch.int32, device=dev)
    k = torch.randn(3, 2, 128, generator=gen).to(dev, dtype)
    v = torch.randn(3, 2, 128, generator=gen).to(dev, dtype)
    ref_k, ref_v = pool.k_cache.clone(), pool.v_cache.clone()
    append_kv_ref(ref_k, ref_v, pool.page_table, offsets, k.unsqueeze(1), v.unsqueeze(1))
    append_kv(pool.k_cache, pool.v_cache, pool.page_table, offsets, k, v)
    same = torch.equal(pool.k_cache, ref_k) and torch.equal(pool.v_cache, ref_v)
    return 0.0 if same else float("inf")


def time_us(fn, dev, repeats=20) -> float:
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main(argv=None) -> int:
    from ..cli import parser

    p = parser("kflume check", "Check the kflume kernels against float64 "
                                "references and time them on this machine.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run the kernels")
    p.add_argument("--seed", type=int, default=None, help="default: fresh random inputs")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    gen = torch.Generator()
    gen.manual_seed(args.seed if args.seed is not None else int(time.time_ns() % 2**31))
    backend = "Triton" if dev.type == "cuda" else "torch reference (CPU path)"
    print(f"kflume kernel check on {dev} ({backend}), seed {gen.initial_seed()}")
    print(f"{'kernel':<12} {'dtype':<5} {'G':>2} {'D':>4} {'page':>4} {'rel err':>9} "
          f"{'tol':>7}  ok")
    failures = 0

    def row(kernel, dname, g, d, ps, err):
        nonlocal failures
        tol = TOLERANCE[DTYPES[dname]]
        ok = err <= tol
        failures += not ok
        print(f"{kernel:<12} {dname:<5} {g:>2} {d:>4} {ps:>4} {err:>9.2e} {tol:>7.0e}  "
              f"{'yes' if ok else 'NO'}")

    for dname, dtype in DTYPES.items():
        for g, d, ps in ((1, 64, 1), (4, 128, 16), (8, 128, 64), (8, 64, 16)):
            row("split_kv", dname, g, d, ps, check_split_kv(dev, dtype, g, d, ps, gen))
        row("softcap 5", dname, 4, 128, 16, check_split_kv(dev, dtype, 4, 128, 16, gen, 5.0))
        row("merge", dname, "-", 128, "-", check_merge(dev, dtype, gen))
        row("merge+sinks", dname, "-", 128, "-", check_merge(dev, dtype, gen, with_sinks=True))
        row("append_kv", dname, "-", 128, 16, check_append(dev, dtype, gen))

    bsz, length, hq, hkv, d = (8, 32768, 32, 8, 128) if dev.type == "cuda" else (4, 4096, 32,
                                                                                   8, 128)
    pool = random_paged_kv(bsz, length, hkv, d, 16, dtype=torch.bfloat16, device=dev,
                           generator=gen)
    q = torch.randn(bsz, hq, d, generator=gen).to(dev, torch.bfloat16)
    start = torch.zeros(bsz, dtype=torch.int32, device=dev)
    lens = torch.full((bsz,), length, dtype=torch.int32, device=dev)
    us = time_us(lambda: split_kv_attention(q, pool.k_cache, pool.v_cache, pool.page_table,
                                            start, lens, check=False), dev)
    nbytes = bsz * length * hkv * d * 2 * 2
    print(f"\ntiming: split_kv B={bsz} L={length} Hq={hq} Hkv={hkv} D={d} bf16 page 16: "
          f"{us:.1f} us per call (host clock, eager), KV read {nbytes / us / 1e3:.1f} GB/s")
    print("benchmarks/kernels.py times the kernels against cuDNN, flash SDPA and FlashInfer on a "
          "GPU (--eager: eager calls).")
    print("all checks passed" if not failures else f"{failures} check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
