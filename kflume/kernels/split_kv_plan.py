"""The host plan of split-KV attention for one shape, and the launches it makes.

Conventions (shapes, NHD pages, natural-log LSE, empty range = (0, -inf)):
docs/conventions.md. CUDA tensors run the Triton kernels (`_split_kv_triton.py`, then
`_merge_triton.py` to reduce the splits); CPU tensors run
`reference.split_kv_attention_ref`, the same function.
"""

from __future__ import annotations

import torch

from . import _validate
from ._launcher import Launch, check_grid
from ._validate import (
    check_split_kv_args,
    on_device,
    positive_or_none,
    split_kv_args_ok,
)
from .reference import split_kv_attention_ref

__all__ = ["SplitKVPlan"]

LOG2E = 1.4426950408889634
MAX_SPLITS_ALLOWED = 1024


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block_n(dtype: torch.dtype, head_dim: int) -> int:
    return 32 if dtype == torch.float32 or head_dim > 128 else 64


def split_kv_grid(batch: int, kv_heads: int, num_splits: int) -> tuple[int, int, int]:
    """Grid of the split-KV kernel: `(B * Hkv, splits, 1)`, checked against CUDA's limits."""
    return check_grid((batch * kv_heads, num_splits), "split_kv_attention")


def merge_grid(rows: int) -> tuple[int, int, int]:
    """Grid of the merge kernels: one program per (request, head) row."""
    return check_grid((rows,), "merge")


class SplitKVPlan:
    """Split-KV attention for one shape: planned once on the host, then `run` launches.

    As FlashInfer's `plan()` / `run()`: building the plan is host work (it fixes the
    launch: splits, grids, kernel constants; and allocates the float32 scratch of the
    split partials): build it outside CUDA graph capture. `run` only launches the split
    kernel and, with more than one split, the merge of the splits: no host sync, no
    allocation when `out` and `lse` are given, capturable (the graph then uses the
    plan's scratch). The scratch serves one stream at a time: give each stream (and each
    graph replayed concurrently with other work) its own plan, and keep the plan alive
    as long as a graph that captured its `run`.

    Args:
        batch, q_heads, kv_heads, head_dim: B, Hq, Hkv (Hq % Hkv == 0) and D.
        page_size: tokens per page (a contiguous cache `[B, L, Hkv, D]`: L).
        max_pages: the page table's width (a contiguous cache: 1). With `num_splits`
            None it sets the split count (`default_num_splits` over its capacity).
        dtype: q's and the pool's dtype (bf16, fp16 or fp32). device: where it runs.
        scale: score scale, default `D ** -0.5`.
        softcap: Gemma2 logit softcapping, scores `softcap * tanh(scale * q.k / softcap)`
            (LSE of the capped scores, so merges stay exact); None: no capping.
        num_splits: programs per (request, KV head); default `default_num_splits`.
        block_n, num_warps, num_stages: Triton configuration (tuning only).
    """

    def __init__(self, batch: int, q_heads: int, kv_heads: int, head_dim: int, page_size: int,
                 max_pages: int, *, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cuda", scale: float | None = None,
                 softcap: float | None = None, num_splits: int | None = None,
                 block_n: int | None = None, num_warps: int = 4, num_stages: int = 3):
        from .split_kv import default_num_splits, sm_count

        if min(batch, q_heads, kv_heads, head_dim, page_size, max_pages) < 0 or kv_heads == 0 \
                or q_heads % kv_heads:
            raise ValueError(f"bad shape: B {batch}, Hq {q_heads}, Hkv {kv_heads}, D {head_dim}, "
                             f"page {page_size}, pages {max_pages} (Hq must be a multiple of Hkv)")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.shape = (batch, q_heads, kv_heads, head_dim, page_size, max_pages)
        self.dtype = dtype
        self.scale = float(head_dim**-0.5 if scale is None else scale)
        self.softcap = positive_or_none("softcap", softcap)
        if num_splits is None:
            sms = sm_count(self.device.index) if self.device.type == "cuda" else 132
            num_splits = default_num_splits(batch, kv_heads, max_pages * page_size, sms)
        if not 1 <= num_splits <= MAX_SPLITS_ALLOWED:
            raise ValueError(f"num_splits must be in [1, {MAX_SPLITS_ALLOWED}]; got {num_splits}")
        self.num_splits = int(num_splits)
        # The kernel's (scale_log2, softcap_log2): see _split_kv_triton.py.
        self._floats = ((self.scale * LOG2E, 1.0) if self.softcap is None
                        else (self.scale / self.softcap, self.softcap * LOG2E))
        self._config = (block_n or _block_n(dtype, head_dim), num_warps, num_stages)
        rows = batch * q_heads
        self._split_grid = split_kv_grid(batch, kv_heads, self.num_splits) if rows else None
        self._merge_grid = merge_grid(rows) if rows else None
        # Strides of the contiguous partials [S, B, Hq, D] and [S, B, Hq].
        self._partial_strides = (rows * head_dim, q_heads * head_dim, head_dim, rows, q_heads)
        self._launches: tuple[Launch, Launch] | None = None  # built on first Triton run
        self._identity: torch.Tensor | None = None
        self._partials: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            if self.num_splits > 1:
                self._partials = self.new_partials()
            if max_pages == 1:  # perhaps a contiguous cache
                self.identity_table()

    def new_partials(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh float32 scratch for the split partials: `[S, B, Hq, D]` and `[S, B, Hq]`."""
        b, hq, _, d = self.shape[:4]
        s = self.num_splits
        return (torch.empty(s, b, hq, d, device=self.device, dtype=torch.float32),
                torch.empty(s, b, hq, device=self.device, dtype=torch.float32))

    def identity_table(self) -> torch.Tensor:
        """The page table of a contiguous cache: request b's one page is page b."""
        if self._identity is None:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # filled only when the graph replays: not one to keep
                return torch.arange(self.shape[0], device=self.device,
                                    dtype=torch.int32).view(-1, 1)
            # built on the host and copied synchronously: ready for any stream
            self._identity = torch.arange(self.shape[0], dtype=torch.int32).view(-1, 1).to(
                self.device)
        return self._identity

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            page_table: torch.Tensor | None, kv_start: torch.Tensor, kv_len: torch.Tensor, *,
            out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
            check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of `q [B, Hq, D]` over `[kv_start, kv_start + kv_len)` of each page
        list, as `split_kv_attention` with this plan's scale, softcap and splits.

        `check`: shape, dtype, device and layout checks against the plan (host metadata
        only). Range values are not checked (`split_kv_attention(debug_checks=True)`).
        Returns `(out [B, Hq, D] q's dtype, lse [B, Hq] float32)`.
        """
        if check:
            self.check(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse)
        if out is None:
            out = torch.empty_like(q)
        if lse is None:
            lse = torch.empty(q.shape[:2], device=q.device, dtype=torch.float32)
        self.launch(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse)
        return out, lse

    def check(self, q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse) -> None:
        """Raise if the arguments do not fit the conventions and this plan's shape."""
        if not split_kv_args_ok(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse):
            check_split_kv_args(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse)
        b, hq, hkv, d, page_size, max_pages = self.shape
        ks = k_cache.shape
        width = 1 if page_table is None else page_table.shape[1]
        if (q.shape != (b, hq, d) or ks[1] != page_size or ks[2] != hkv or width != max_pages
                or q.dtype != self.dtype or q.device != self.device):
            got = (*q.shape[:2], ks[2], q.shape[2], ks[1], width)
            raise ValueError(f"this plan is for (B, Hq, Hkv, D, page_size, max_pages) = "
                             f"{self.shape}, {self.dtype} on {self.device}; got {got}, "
                             f"{q.dtype} on {q.device}: build a plan for this shape")

    def launch(self, q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse,
               partials: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Launch on checked arguments (the CPU runs the torch reference instead), with
        this plan's split scratch or the `partials` given (`new_partials()`)."""
        if page_table is None:
            page_table = self.identity_table()
        if not _validate.uses_triton(q):
            o, s = split_kv_attention_ref(q, k_cache, v_cache, page_table, kv_start, kv_len,
                                          self.scale, softcap=self.softcap)
            out.copy_(o)
            lse.copy_(s)
            return
        if partials is None and self.num_splits > 1:
            if self._partials is None:  # a plan built while capturing allocates here
                self._partials = self.new_partials()
            partials = self._partials
        with on_device(q):
            self.launch_triton(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse,
                               partials)

    def launch_triton(self, q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse,
                      partials) -> None:
        """The Triton launches (CUDA, or CPU tensors under TRITON_INTERPRET=1), on checked
        arguments and a page table; `partials` from `new_partials` when splits > 1."""
        if self._split_grid is None:  # no rows
            return
        split, merge = self._launches or self._make_launches()
        qs, ks, vs = q.stride(), k_cache.stride(), v_cache.stride()
        if self.num_splits == 1:  # the kernel writes the final state; split strides unused
            os, ls = out.stride(), lse.stride()
            split(self._split_grid, (q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse),
                  self._floats,
                  (self.shape[4], 1, qs[0], qs[1], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
                   page_table.stride(0), 0, os[0], os[1], 0, ls[0]))
            return
        o, s = partials
        split(self._split_grid, (q, k_cache, v_cache, page_table, kv_start, kv_len, o, s),
              self._floats,
              (self.shape[4], self.num_splits, qs[0], qs[1], ks[0], ks[1], ks[2],
               vs[0], vs[1], vs[2], page_table.stride(0), *self._partial_strides))
        os = out.stride()
        # merge_kernel(OUTS, LSES, O, LSE, SINKS (not read), ...)
        merge(self._merge_grid, (o, s, out, lse, lse), (),
              (self.num_splits, self.shape[1], *self._partial_strides, os[0], os[1],
               lse.stride(0)))

    def _make_launches(self) -> tuple[Launch, Launch]:
        from . import _merge_triton as mt
        from . import _split_kv_triton as kt

        b, hq, hkv, d, page_size, _ = self.shape
        group = hq // hkv
        block_n, warps, stages = self._config
        dev = self.device
        split = Launch(
            kt.split_kv_kernel, dev, num_warps=warps, num_stages=stages,
            KV_HEADS=hkv, GROUP=group, HEAD_DIM=d,
            BLOCK_H=max(16, _next_pow2(group)), BLOCK_D=max(16, _next_pow2(d)), BLOCK_N=block_n,
            IEEE=self.dtype == torch.float32,
            # the interpreter's bf16 tl.dot is wrong on CPU (see _split_kv_triton.py)
            UPCAST_DOT=dev.type != "cuda" and self.dtype == torch.bfloat16,
            PAGE_SHIFT=page_size.bit_length() - 1 if page_size & (page_size - 1) == 0 else -1,
            SOFTCAP=self.softcap is not None,
        )
        merge = Launch(mt.merge_kernel, dev, num_warps=1, HEAD_DIM=d,
                       BLOCK_D=max(16, _next_pow2(d)), HAS_SINKS=False)
        self._launches = (split, merge)
        return self._launches
