"""Helpers for testing code built on kflume: random paged KV, tolerances, error norms.

Inputs are random everywhere (never zeros), pages are handed out in a shuffled order so
that page tables are not the identity, and every pool has spare pages full of noise that
a wrong index would read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PagedKV", "TOLERANCE", "rel_err", "random_paged_kv", "assert_close_rel"]

# ||out - ref|| / ||ref|| bounds per input dtype (float32 accumulation in every case).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere in `out` gives inf."""
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / denom if denom > 0 else num


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "out"):
    err = rel_err(out, ref)
    tol = TOLERANCE[dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} for {dtype}"


@dataclass
class PagedKV:
    """A paged KV pool `[num_pages, page_size, Hkv, D]` with one page list per request."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    page_table: torch.Tensor  # int32 [B, max_pages]


def random_paged_kv(
    batch: int,
    tokens: int,
    kv_heads: int,
    head_dim: int,
    page_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    spare_pages: int = 3,
    generator: torch.Generator | None = None,
) -> PagedKV:
    """Pool and page tables for `batch` requests of up to `tokens` tokens each."""
    pages_per_req = max(1, -(-tokens // page_size))
    num_pages = batch * pages_per_req + spare_pages
    shape = (num_pages, page_size, kv_heads, head_dim)
    k = torch.randn(shape, generator=generator).to(dtype=dtype, device=device)
    v = torch.randn(shape, generator=generator).to(dtype=dtype, device=device)
    perm = torch.randperm(num_pages, generator=generator)[: batch * pages_per_req]
    pt = perm.view(batch, pages_per_req).to(device=device, dtype=torch.int32)
    return PagedKV(k, v, pt)
