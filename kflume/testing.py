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


class ReferenceKV:
    """Every request's full KV per layer, kept locally, and attention over it in float64.

    The yardstick for disaggregated attention: whatever the routing, RemoteAttention's
    output must equal attention of q over all of a request's tokens.
    """

    def __init__(self, layers: int):
        self.k: list[dict] = [{} for _ in range(layers)]
        self.v: list[dict] = [{} for _ in range(layers)]

    def extend(self, layer: int, request, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add tokens `k, v [T, Hkv, D]` to the request's history in `layer`."""
        ks, vs = self.k[layer], self.v[layer]
        k, v = k.detach().double().cpu(), v.detach().double().cpu()
        ks[request] = torch.cat([ks[request], k]) if request in ks else k
        vs[request] = torch.cat([vs[request], v]) if request in vs else v

    def attend(self, layer: int, requests, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of `q [B, Hq, D]` over each request's history, float64 `[B, Hq, D]`."""
        outs = []
        for i, rid in enumerate(requests):
            k, v = self.k[layer][rid], self.v[layer][rid]  # [T, Hkv, D]
            hq, hkv = q.shape[1], k.shape[1]
            qi = q[i].double().cpu().view(hkv, hq // hkv, -1)
            s = torch.einsum("hgd,thd->hgt", qi, k) * scale
            outs.append(torch.einsum("hgt,thd->hgd", s.softmax(-1), v).reshape(hq, -1))
        return torch.stack(outs)

    def forget(self, request) -> None:
        for layer in range(len(self.k)):
            self.k[layer].pop(request, None)
            self.v[layer].pop(request, None)
