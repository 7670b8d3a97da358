"""Split-KV decode attention over token ranges of a paged KV pool.

Conventions (shapes, NHD pages, natural-log LSE, empty range = (0, -inf)):
docs/conventions.md. CUDA tensors run the Triton kernel in `_split_kv_triton.py`; CPU
tensors run `reference.split_kv_attention_ref`.
"""

from __future__ import annotations

import functools

import torch

from ._validate import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_inner_contiguous,
    check_ranges,
    check_tensor,
    on_device,
)
from .reference import split_kv_attention_ref

__all__ = ["split_kv_attention", "default_num_splits"]

MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _sm_count(device_index: int) -> int:
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
        out, lse: optional preallocated outputs (`[B, Hq, D]` q's dtype, `[B, Hq]` fp32).
        check: check range values against the page table (one host sync on CUDA;
            skipped automatically while a CUDA graph is being captured).

    Returns:
        `(out, lse)`: out `[B, Hq, D]` in q's dtype, lse `[B, Hq]` float32 natural-log
        log-sum-exp of the scaled scores; an empty range gives `(0, -inf)`.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    bsz, hq, d = q.shape
    dev = q.device
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=dev)
    num_pages, page_size, hkv, _ = k_cache.shape
    check_tensor("k_cache", k_cache, shape=(None, None, None, d))
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), device=dev, shape=k_cache.shape)
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"q has {hq} heads, which is not a multiple of the {hkv} KV heads of k_cache (GQA "
            "needs Hq % Hkv == 0)"
        )
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_inner_contiguous(name, t)
    if page_table is None:
        if num_pages != bsz:
            raise ValueError(
                f"with page_table=None, k_cache is a contiguous cache [B, L, Hkv, D] and its "
                f"first dimension must be the batch size {bsz}; got {num_pages}"
            )
        page_table = torch.arange(bsz, device=dev, dtype=torch.int32).view(bsz, 1)
    check_tensor("page_table", page_table, ndim=2, dtypes=INDEX_DTYPES, device=dev, shape=(bsz,))
    check_tensor("kv_start", kv_start, ndim=1, dtypes=INDEX_DTYPES, device=dev, shape=(bsz,))
    check_tensor("kv_len", kv_len, ndim=1, dtypes=INDEX_DTYPES, device=dev, shape=(bsz,))
    if out is None:
        out = torch.empty_like(q)
    check_tensor("out", out, dtypes=(q.dtype,), device=dev, shape=tuple(q.shape))
    check_inner_contiguous("out", out)
    if lse is None:
        lse = torch.empty(bsz, hq, device=dev, dtype=torch.float32)
    check_tensor("lse", lse, ndim=2, dtypes=(torch.float32,), device=dev, shape=(bsz, hq))
    if check:
        check_ranges(page_table, kv_start, kv_len, page_size, num_pages, "kv_start", "kv_len")
    scale = float(d**-0.5 if scale is None else scale)
    if num_splits is None:
        sms = _sm_count(dev.index or 0) if q.is_cuda else 132
        num_splits = default_num_splits(bsz, hkv, page_table.shape[1] * page_size, sms)
    elif not 1 <= num_splits <= 1024:
        raise ValueError(f"num_splits must be in [1, 1024]; got {num_splits}")

    args = (q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse, scale, int(num_splits))
    if torch.compiler.is_compiling():
        torch.ops.kflume.split_kv_attention_(*args)
    else:
        _split_kv_impl(*args)
    return out, lse


def _split_kv_impl(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse, scale, splits):
    if q.is_cuda:
        launch_split_kv(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse, scale, splits)
    else:
        o, s = split_kv_attention_ref(q, k_cache, v_cache, page_table, kv_start, kv_len, scale)
        out.copy_(o)
        lse.copy_(s)


def _block_n(dtype: torch.dtype, head_dim: int) -> int:
    return 32 if dtype == torch.float32 or head_dim > 128 else 64


def launch_split_kv(
    q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse, scale, num_splits,
    *, block_n: int | None = None, num_warps: int = 4, num_stages: int = 3,
) -> None:
    """Launch the Triton kernel (and the merge of splits). No checks: callers check.

    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1. Allocates the
    split partials when num_splits > 1 (from the caching allocator: capturable).
    """
    from . import _split_kv_triton as kt
    from .merge import launch_merge

    bsz, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    if num_splits == 1:
        o, s = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        o = torch.empty(num_splits, bsz, hq, d, device=q.device, dtype=torch.float32)
        s = torch.empty(num_splits, bsz, hq, device=q.device, dtype=torch.float32)
    block_n = block_n or _block_n(q.dtype, d)
    page_size = k_cache.shape[1]
    with on_device(q):
        kt.split_kv_kernel[(hkv, bsz, num_splits)](
            q, k_cache, v_cache, page_table, kv_start, kv_len, o, s,
            scale * 1.4426950408889634,  # log2(e): the kernel works in base 2
            page_size,
            num_splits,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            page_table.stride(0),
            o.stride(0), o.stride(1), o.stride(2),
            s.stride(0), s.stride(1),
            GROUP=group,
            HEAD_DIM=d,
            BLOCK_H=max(16, _next_pow2(group)),
            BLOCK_D=max(16, _next_pow2(d)),
            BLOCK_N=block_n,
            IEEE=q.dtype == torch.float32,
            UPCAST_DOT=not q.is_cuda and q.dtype == torch.bfloat16,
            PAGE_SHIFT=page_size.bit_length() - 1 if page_size & (page_size - 1) == 0 else -1,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    if num_splits > 1:
        launch_merge(o, s, out, lse)


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
) -> None:
    _split_kv_impl(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse, scale, num_splits)


@_split_kv_op.register_fake
def _(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse, scale, num_splits) -> None:
    return None
