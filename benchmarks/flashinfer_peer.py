"""FlashInfer's paged decode as a peer of kflume's split-KV attention (benchmarks only).

`BatchDecodeWithPagedKVCacheWrapper` on the same NHD pool and page lists as kflume,
with `return_lse=True` (its LSE is base 2: multiplied by ln 2 here to compare). One
wrapper per (tensor cores on/off, CUDA graph or eager); each is planned once for its
page lists, as FlashInfer's API intends. When flashinfer cannot be imported (or its JIT
build fails), `load()` says why and the benchmark prints n/a.
"""

from __future__ import annotations

import math

import torch

WORKSPACE_BYTES = 256 << 20


def load():
    """The flashinfer module, or a one-line reason why not."""
    try:
        import flashinfer
    except Exception as e:  # ImportError, or a broken install that fails at import
        return f"flashinfer not importable ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
    return flashinfer


class FlashInferDecode:
    """Decode attention of `q [B, Hq, D]` over whole page lists `page_table [B, P]` of an
    NHD pool, every page full (`P * page_size` tokens per request)."""

    def __init__(self, flashinfer, page_table: torch.Tensor, q_heads: int, kv_heads: int,
                 head_dim: int, page_size: int, dtype: torch.dtype, *, tensor_cores: bool,
                 graph: bool):
        b, pages = page_table.shape
        dev = page_table.device
        indptr = torch.arange(0, b + 1, device=dev, dtype=torch.int32) * pages
        indices = page_table.flatten().to(torch.int32).contiguous()
        last = torch.full((b,), page_size, device=dev, dtype=torch.int32)
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        kwargs = {}
        if graph:  # fixed buffers, so that a captured run reads them in place
            kwargs = dict(use_cuda_graph=True, paged_kv_indptr_buffer=indptr,
                          paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_tensor_cores=tensor_cores, **kwargs)
        self.wrapper.plan(indptr, indices, last, q_heads, kv_heads, head_dim, page_size,
                          q_data_type=dtype, kv_data_type=dtype)

    def run(self, q, k_cache, v_cache):
        """FlashInfer's eager call: `(out, lse base 2)`, both allocated by FlashInfer."""
        return self.wrapper.run(q, (k_cache, v_cache), return_lse=True)

    def check_against(self, q, k_cache, v_cache, out_ref, lse_ref) -> str:
        """Relative error of out and max |lse - ref| (natural log) against kflume's."""
        out, lse2 = self.run(q, k_cache, v_cache)
        err = ((out.float() - out_ref.float()).norm() / out_ref.float().norm()).item()
        lse_err = (lse2.float() * math.log(2) - lse_ref).abs().max().item()
        return f"rel err {err:.1e}, lse err {lse_err:.1e}"
