"""Appending new tokens' K and V to a paged KV pool (docs/conventions.md).

CUDA tensors run the Triton kernel in `_append_triton.py` (one program per new token,
any number of tokens); CPU tensors run `reference.append_kv_ref`.
"""

from __future__ import annotations

import torch

from . import _validate
from ._launcher import cached_launch, check_grid
from ._validate import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_inner_contiguous,
    check_ranges,
    check_tensor,
    on_device,
)
from .reference import append_kv_ref

__all__ = ["append_kv"]


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    offsets: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    check: bool = True,
    debug_checks: bool | None = None,
) -> None:
    """Write new tokens' keys and values into the pool, in place.

    Args:
        k_cache, v_cache: `[num_pages, page_size, Hkv, D]` pools.
        page_table: int32 `[B, max_pages]`, each request's pages in order.
        offsets: int32 `[B]`, token offset in request b's page list of its first new token.
        k, v: `[B, Hkv, D]` (one token per request) or `[B, T, Hkv, D]` (T tokens written
            at `offsets[b] .. offsets[b] + T - 1`); any float dtype, cast to the pool's.
        check: shape, dtype, device and layout checks (host metadata only, no sync).
        debug_checks: also check the offsets against the page table and the page ids
            against the pool (a host sync and a scan of the page table on CUDA; skipped
            while a CUDA graph is being captured). None: the `KFLUME_DEBUG_CHECKS`
            environment variable at import (off unless set to 1).
    """
    if check:
        _check_append_args(k_cache, v_cache, page_table, offsets, k, v)
    if k.dim() == 3:
        k, v = k.unsqueeze(1), v.unsqueeze(1)
    if debug_checks or (debug_checks is None and _validate.DEBUG_CHECKS):
        length = torch.full_like(offsets, k.shape[1])
        check_ranges(page_table, offsets, length, k_cache.shape[1], k_cache.shape[0], "offsets",
                     "k.shape[1]")
    if torch.compiler.is_compiling():
        torch.ops.kflume.append_kv_(k_cache, v_cache, page_table, offsets, k, v)
    else:
        _append_impl(k_cache, v_cache, page_table, offsets, k, v)


def _check_append_args(k_cache, v_cache, page_table, offsets, k, v) -> None:
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES)
    dev = k_cache.device
    hkv, d = k_cache.shape[2:]
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=dev,
                 shape=k_cache.shape)
    check_tensor("k", k, dtypes=FLOAT_DTYPES, device=dev)
    if k.dim() not in (3, 4):
        raise ValueError(f"k must be [B, Hkv, D] or [B, T, Hkv, D]; got shape {tuple(k.shape)}")
    check_tensor("k", k, shape=(None,) * (k.dim() - 2) + (hkv, d))
    check_tensor("v", v, ndim=k.dim(), dtypes=FLOAT_DTYPES, device=dev, shape=tuple(k.shape))
    bsz = k.shape[0]
    check_tensor("page_table", page_table, ndim=2, dtypes=INDEX_DTYPES, device=dev, shape=(bsz,))
    check_tensor("offsets", offsets, ndim=1, dtypes=INDEX_DTYPES, device=dev, shape=(bsz,))
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v),
                    ("page_table", page_table), ("offsets", offsets)):
        check_inner_contiguous(name, x)


def _append_impl(k_cache, v_cache, page_table, offsets, k, v) -> None:
    if k_cache.is_cuda:
        launch_append(k_cache, v_cache, page_table, offsets, k, v)
    else:
        append_kv_ref(k_cache, v_cache, page_table, offsets, k, v)


def append_grid(batch: int, tokens: int) -> tuple[int, int, int]:
    """Grid of the append kernel: one program per new token along x (`B * T` of them;
    CUDA allows 2^31 - 1 there, 65,535 along y and z)."""
    return check_grid((batch * tokens,), "append_kv")


def launch_append(k_cache, v_cache, page_table, offsets, k, v) -> None:
    """Launch the Triton append kernel (CUDA, or CPU under TRITON_INTERPRET=1). No checks.

    `k, v`: `[B, T, Hkv, D]`."""
    from ._append_triton import append_kv_kernel

    bsz, t, hkv, d = k.shape
    if bsz * t == 0:
        return
    launch = cached_launch(append_kv_kernel, k_cache.device, (k_cache.dtype, k.dtype, v.dtype),
                           num_warps=4, NUM_HEADS=hkv, HEAD_DIM=d,
                           BLOCK_H=1 << max(0, (hkv - 1).bit_length()),
                           BLOCK_D=max(16, 1 << max(0, (d - 1).bit_length())))
    with on_device(k_cache):
        launch(append_grid(bsz, t), (k_cache, v_cache, page_table, offsets, k, v), (),
               (k_cache.shape[1], t,
                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                page_table.stride(0),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2)))


@torch.library.custom_op("kflume::append_kv_", mutates_args=("k_cache", "v_cache"))
def _append_op(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    offsets: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    _append_impl(k_cache, v_cache, page_table, offsets, k, v)


@_append_op.register_fake
def _(k_cache, v_cache, page_table, offsets, k, v) -> None:
    return None
