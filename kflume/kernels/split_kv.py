"""Split-KV decode attention over token ranges of a paged KV pool.

Conventions (shapes, NHD pages, natural-log LSE, empty range = (0, -inf)):
docs/conventions.md. CUDA tensors run the Triton kernel in `_split_kv_triton.py`; CPU
tensors run `reference.split_kv_attention_ref`. `split_kv_attention` keeps one
`SplitKVPlan` per shape and stream (`split_kv_plan.py`), so an eager call costs its
checks and two launches.
"""

from __future__ import annotations

import functools

import torch

from . import _validate
from ._launcher import Launch
from ._validate import (
    capturing,
    check_ranges,
    check_split_kv_args,
    positive_or_none,
    split_kv_args_ok,
)
from .reference import split_kv_attention_ref
from .split_kv_plan import MAX_SPLITS_ALLOWED, SplitKVPlan

__all__ = ["split_kv_attention", "default_num_splits", "SplitKVPlan"]

MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64
MAX_PLANS = 64  # plans kept by split_kv_attention (each holds its split scratch)


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(batch: int, kv_heads: int, max_tokens: int, num_sms: int = 132) -> int:
    """Splits of each range so that `batch * kv_heads * splits` programs fill the GPU.

    Depends on shapes only (`max_tokens` is the page table's capacity, not the actual
    lengths), so the choice needs no host sync and is stable under CUDA graph capture.
    Aims for about two waves of programs, with chunks of at least 256 tokens.
    """
    splits = 1
    while (
        batch * kv_heads * splits < 2 * num_sms
        and max_tokens >= 2 * splits * MIN_TOKENS_PER_SPLIT
        and splits < MAX_SPLITS
    ):
        splits *= 2
    return splits


def split_kv_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor | None,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    check: bool = True,
    softcap: float | None = None,
    debug_checks: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query token per request over a token range of its KV.

    Args:
        q: `[B, Hq, D]`, bf16/fp16/fp32, RoPE already applied.
        k_cache, v_cache: paged pool `[num_pages, page_size, Hkv, D]` (NHD), q's dtype;
            or a contiguous cache `[B, L, Hkv, D]` with `page_table=None`.
        page_table: int32 `[B, max_pages]`, each request's pages in order; or None.
        kv_start, kv_len: int32 `[B]`; request b attends to tokens
            `[kv_start[b], kv_start[b] + kv_len[b])` of its page list.
        scale: score scale, default `D ** -0.5`.
        num_splits: programs per (request, KV head) on CUDA; default from
            `default_num_splits` (shapes only, so capturable).
        out, lse: optional preallocated outputs (`[B, Hq, D]` q's dtype, `[B, Hq]` fp32;
            strided views are fine when their last dimension is contiguous).
        check: shape, dtype, device and layout checks (host metadata only, no sync).
        softcap: Gemma2 attention-logit softcapping: scores become
            `softcap * tanh(scale * q.k / softcap)`; the LSE is over the capped scores, so
            merges of partials stay exact. None (default): no capping.
        debug_checks: also check range values against the page table and page ids
            against the pool (a host sync and a scan of the page table on CUDA; skipped
            while a CUDA graph is being captured). None: the `KFLUME_DEBUG_CHECKS`
            environment variable at import (off unless set to 1).

    Returns:
        `(out, lse)`: out `[B, Hq, D]` in q's dtype, lse `[B, Hq]` float32 natural-log
        log-sum-exp of the (capped) scaled scores; an empty range gives `(0, -inf)`.

    CUDA calls keep one `SplitKVPlan` per shape, scale, softcap, splits and stream
    (its split scratch included); build a `SplitKVPlan` yourself to hold it.
    """
    if check:
        if not split_kv_args_ok(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse):
            check_split_kv_args(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse)
        if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS_ALLOWED:
            raise ValueError(f"num_splits must be in [1, {MAX_SPLITS_ALLOWED}]; got {num_splits}")
    bsz, hq, d = q.shape
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty(bsz, hq, device=q.device, dtype=torch.float32)
    if debug_checks or (debug_checks is None and _validate.DEBUG_CHECKS):
        table = page_table
        if table is None:
            table = torch.arange(bsz, device=q.device, dtype=torch.int32).view(bsz, 1)
        check_ranges(table, kv_start, kv_len, k_cache.shape[1], k_cache.shape[0],
                     "kv_start", "kv_len")
    if not _validate.uses_triton(q) or torch.compiler.is_compiling():
        scale = float(d**-0.5 if scale is None else scale)
        softcap = positive_or_none("softcap", softcap)
        if page_table is None:
            page_table = torch.arange(bsz, device=q.device, dtype=torch.int32).view(bsz, 1)
        if num_splits is None:
            sms = sm_count(q.device.index) if q.is_cuda else 132
            num_splits = default_num_splits(bsz, k_cache.shape[2],
                                            page_table.shape[1] * k_cache.shape[1], sms)
        args = (q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse, scale,
                int(num_splits), softcap)
        if torch.compiler.is_compiling():
            torch.ops.kflume.split_kv_attention_(*args)
        else:
            _split_kv_impl(*args)
        return out, lse
    _launch_cached(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse, scale,
                   num_splits, softcap)
    return out, lse


_PLANS: dict[tuple, SplitKVPlan] = {}


def plan_for(q, k_cache, page_table, scale, softcap, num_splits) -> SplitKVPlan:
    """The cached plan of a CUDA call (one per shape, scale, softcap, splits and stream)."""
    dev = q.device
    width = 1 if page_table is None else page_table.shape[1]
    key = (q.shape, k_cache.shape[1], k_cache.shape[2], width, q.dtype, dev, scale, softcap,
           num_splits, Launch.stream_of(dev.index))
    plan = _PLANS.get(key)
    if plan is None:
        bsz, hq, d = q.shape
        plan = SplitKVPlan(bsz, hq, k_cache.shape[2], d, k_cache.shape[1], width,
                           dtype=q.dtype, device=dev, scale=scale, softcap=softcap,
                           num_splits=num_splits)
        if not capturing(q):  # a plan is cached only outside capture (see SplitKVPlan)
            if len(_PLANS) >= MAX_PLANS:  # the oldest goes; its scratch is stream-ordered
                del _PLANS[next(iter(_PLANS))]
            _PLANS[key] = plan
    return plan


def _launch_cached(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse, scale, splits,
                   softcap) -> None:
    """Launch through the cached plan. Under capture the split partials come from the
    graph's pool, not the plan's scratch, which eager calls on other streams may share."""
    plan = plan_for(q, k_cache, page_table, scale, softcap, splits)
    partials = plan.new_partials() if plan.num_splits > 1 and capturing(q) else None
    plan.launch(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse, partials)


def _split_kv_impl(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse, scale, splits,
                   softcap) -> None:
    if q.is_cuda:
        _launch_cached(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse, scale,
                       splits, softcap)
    else:
        o, s = split_kv_attention_ref(q, k_cache, v_cache, page_table, kv_start, kv_len, scale,
                                      softcap=softcap)
        out.copy_(o)
        lse.copy_(s)


def launch_split_kv(
    q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse, scale, num_splits,
    *, block_n: int | None = None, num_warps: int = 4, num_stages: int = 3,
    softcap: float | None = None,
) -> None:
    """Launch the Triton kernels (split, then merge of splits) on checked arguments.

    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1. Builds a throwaway
    plan and allocates the split partials when num_splits > 1 (from the caching
    allocator: capturable); `SplitKVPlan` is the way to launch repeatedly.
    """
    bsz, hq, d = q.shape
    plan = SplitKVPlan(bsz, hq, k_cache.shape[2], d, k_cache.shape[1], page_table.shape[1],
                       dtype=q.dtype, device=q.device, scale=scale, softcap=softcap,
                       num_splits=num_splits, block_n=block_n, num_warps=num_warps,
                       num_stages=num_stages)
    partials = plan.new_partials() if plan.num_splits > 1 else None
    plan.launch_triton(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse, partials)


@torch.library.custom_op("kflume::split_kv_attention_", mutates_args=("out", "lse"))
def _split_kv_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    num_splits: int,
    softcap: float | None = None,
) -> None:
    _split_kv_impl(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse, scale, num_splits,
                   softcap)


@_split_kv_op.register_fake
def _(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse, scale, num_splits,
      softcap=None) -> None:
    return None
