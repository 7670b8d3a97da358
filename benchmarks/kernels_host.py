"""Host time of an eager kernel call, without a GPU: the launches stubbed.

Runs the CUDA code path of `split_kv_attention` (checks, plan lookup, argument
building, the fast Triton launch) on CPU tensors, with the compiled kernel's launcher
replaced by a no-op, and reports microseconds per call and Python function calls per
call (cProfile). What it leaves out: the launcher's own work (Triton's
`CudaLauncher.__call__` and the driver's cuLaunchKernel, a few us per launch), CUDA's
caching allocator (slower than the CPU's) and the stream query. The GPU figure comes
from `benchmarks/kernels.py --eager` on a GPU.

    python benchmarks/kernels_host.py
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header  # noqa: E402

from kflume.kernels import SplitKVPlan, _launcher, _validate, split_kv_attention  # noqa: E402
from kflume.kernels._launcher import Launch  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
SHAPES = {"1x8K": (1, 8192), "8x32K": (8, 32768)}


def _stub_run(*args) -> None:  # stands in for the compiled kernel's launcher
    return None


def stub_launches() -> None:
    """Send CPU tensors down the CUDA path and make every launch a no-op."""
    _validate.uses_triton = lambda t: True
    _launcher._fast_capable = lambda fn, device: True
    Launch.stream_of = staticmethod(lambda index: 0)
    Launch.hooks_active = staticmethod(lambda: False)

    def slow(self, grid, tensors, floats, ints, key):  # the first call of a key: "compile"
        if key is not None:
            self._const_vals = tuple(self.constexprs.values())
            self._entries[key] = (_stub_run, 0, None)
    Launch._slow = slow


def per_call_us(fn, number: int) -> float:
    fn()
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def calls_per_call(fn, number: int = 200) -> float:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(number):
        fn()
    prof.disable()
    return pstats.Stats(prof).total_calls / number


def bench_shape(name: str, b: int, length: int, number: int, profile: bool) -> None:
    pages = b * length // PAGE
    # Never touched: the stubbed launches read nothing, so the pages stay unbacked.
    k = torch.empty(pages, PAGE, HKV, D, dtype=torch.bfloat16)
    v = torch.empty_like(k)
    pt = torch.randperm(pages).int().view(b, -1)
    q = torch.randn(b, HQ, D).bfloat16()
    start = torch.zeros(b, dtype=torch.int32)
    lens = torch.full((b,), length, dtype=torch.int32)
    out, lse = torch.empty_like(q), torch.empty(b, HQ)
    plan = SplitKVPlan(b, HQ, HKV, D, PAGE, pt.shape[1], dtype=q.dtype, device="cpu")
    cases = {
        "split_kv_attention, default arguments":
            lambda: split_kv_attention(q, k, v, pt, start, lens),
        "split_kv_attention, out= lse= given":
            lambda: split_kv_attention(q, k, v, pt, start, lens, out=out, lse=lse),
        "split_kv_attention, check=False, out= lse=":
            lambda: split_kv_attention(q, k, v, pt, start, lens, out=out, lse=lse, check=False),
        "SplitKVPlan.run, out= lse=":
            lambda: plan.run(q, k, v, pt, start, lens, out=out, lse=lse),
        "SplitKVPlan.run(check=False), out= lse=":
            lambda: plan.run(q, k, v, pt, start, lens, out=out, lse=lse, check=False),
        "the argument checks alone":
            lambda: _validate.split_kv_args_ok(q, k, v, pt, start, lens, None, None),
        "the stubbed launcher alone (2 per call with splits)":
            lambda: _stub_run(*range(40)),
    }
    for label, fn in cases.items():
        print(f"| {name} ({plan.num_splits} splits) | {label} | {per_call_us(fn, number):.2f} | "
              f"{calls_per_call(fn):.0f} |")
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(1000):
            split_kv_attention(q, k, v, pt, start, lens)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--number", type=int, default=2000)
    p.add_argument("--profile", action="store_true", help="print the cProfile table")
    args = p.parse_args()
    stub_launches()
    print(header("Host time of an eager split_kv_attention call, launches stubbed (CPU)"))
    print("minimum over 7 repeats; Hq 32, Hkv 8, D 128, bf16, page 16")
    print("| shape | call | us per call | Python calls per call |")
    print("|---|---|---|---|")
    for name, (b, length) in SHAPES.items():
        bench_shape(name, b, length, args.number, args.profile)


if __name__ == "__main__":
    main()
