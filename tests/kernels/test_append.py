"""append_kv against the reference: new tokens land at their page and slot, nothing else moves."""

from __future__ import annotations

import pytest
import torch

from kflume.kernels import append_kv, split_kv_attention
from kflume.kernels.append import launch_append
from kflume.kernels.reference import append_kv_ref
from kflume.testing import random_paged_kv

from .helpers import BACKENDS, INTERPRET, device_of


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_append_matches_reference(backend, tokens, page_size, dtype):
    gen = torch.Generator().manual_seed(page_size * 10 + tokens)
    dev = device_of(backend)
    pool = random_paged_kv(4, 140, 3, 64, page_size, dtype=dtype, device=dev, generator=gen)
    offsets = torch.tensor([0, 17, 63, 130], dtype=torch.int32, device=dev)
    shape = (4, tokens, 3, 64) if tokens > 1 else (4, 3, 64)
    # fp32 in, cast to the pool's dtype by the kernel; the interpreter rounds fp32 -> bf16
    # by truncation (the GPU and torch round to nearest), so it gets the pool's dtype.
    in_dtype = dtype if backend == "interpret" else torch.float32
    k = torch.randn(shape, generator=gen).to(dev, in_dtype)
    v = torch.randn(shape, generator=gen).to(dev, in_dtype)
    ref_k, ref_v = pool.k_cache.clone(), pool.v_cache.clone()
    k4, v4 = (k, v) if tokens > 1 else (k.unsqueeze(1), v.unsqueeze(1))
    append_kv_ref(ref_k, ref_v, pool.page_table, offsets, k4, v4)
    if backend == "interpret":
        launch_append(pool.k_cache, pool.v_cache, pool.page_table, offsets, k4, v4)
    else:
        append_kv(pool.k_cache, pool.v_cache, pool.page_table, offsets, k, v)
    assert torch.equal(pool.k_cache, ref_k)
    assert torch.equal(pool.v_cache, ref_v)
    assert not torch.equal(ref_k, random_paged_kv(4, 140, 3, 64, page_size, dtype=dtype,
                                                  device=dev).k_cache)


def test_appended_tokens_are_attended():
    """Append then attend equals attending over a cache that held the tokens already."""
    gen = torch.Generator().manual_seed(1)
    pool = random_paged_kv(2, 40, 2, 64, 16, generator=gen)
    q = torch.randn(2, 4, 64, generator=gen)
    start = torch.tensor([3, 0], dtype=torch.int32)
    length = torch.tensor([20, 33], dtype=torch.int32)
    k_new = torch.randn(2, 2, 64, generator=gen)
    v_new = torch.randn(2, 2, 64, generator=gen)
    append_kv(pool.k_cache, pool.v_cache, pool.page_table, start + length, k_new, v_new)
    out, _ = split_kv_attention(q, pool.k_cache, pool.v_cache, pool.page_table, start, length + 1)
    # The same attention written out by hand for request 1 (start 0, 34 tokens).
    ps = 16
    toks = torch.arange(34)
    pages = pool.page_table[1].long()[toks // ps]
    k1 = pool.k_cache[pages, toks % ps]  # [34, 2, 64]
    v1 = pool.v_cache[pages, toks % ps]
    assert torch.equal(k1[-1], k_new[1])
    s = torch.einsum("hgd,lhd->hgl", q[1].view(2, 2, 64), k1) * 64**-0.5
    ref = torch.einsum("hgl,lhd->hgd", s.softmax(-1), v1).reshape(4, 64)
    torch.testing.assert_close(out[1], ref, rtol=1e-5, atol=1e-5)


def test_append_rejects_bad_input():
    pool = random_paged_kv(2, 32, 2, 64, 16)
    k = torch.randn(2, 2, 64)
    ok = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="beyond"):  # value checks: the debug switch
        append_kv(pool.k_cache, pool.v_cache, pool.page_table, torch.tensor([0, 32],
                  dtype=torch.int32), k, k, debug_checks=True)
    with pytest.raises(ValueError, match="offsets must be >= 0"):
        append_kv(pool.k_cache, pool.v_cache, pool.page_table, torch.tensor([0, -1],
                  dtype=torch.int32), k, k, debug_checks=True)
    with pytest.raises(ValueError, match="offsets must be contiguous"):
        append_kv(pool.k_cache, pool.v_cache, pool.page_table,
                  torch.tensor([[0, 9], [5, 9]], dtype=torch.int32)[:, 0], k, k)
    with pytest.raises(TypeError, match="offsets must have dtype int32"):
        append_kv(pool.k_cache, pool.v_cache, pool.page_table, ok.long(), k, k)
    with pytest.raises(ValueError, match="k has shape"):
        append_kv(pool.k_cache, pool.v_cache, pool.page_table, ok, torch.randn(2, 3, 64), k)
    with pytest.raises(ValueError, match="v has shape"):
        append_kv(pool.k_cache, pool.v_cache, pool.page_table, ok, k, torch.randn(2, 2, 32))


def test_grids_stay_within_cuda_limits():
    """The interpreter does not enforce CUDA's grid limits (x 2^31 - 1, y and z 65,535):
    the grids are computed by functions, checked here at sizes that broke them."""
    from kflume.kernels._launcher import MAX_GRID, check_grid
    from kflume.kernels.append import append_grid
    from kflume.kernels.split_kv_plan import merge_grid, split_kv_grid

    def within(grid):
        return len(grid) == 3 and all(1 <= n <= lim for n, lim in zip(grid, MAX_GRID))

    for b, t in ((1, 65_536), (1, 1 << 20), (3, 200_000), (100_000, 1), (80 * 1024, 4)):
        assert within(append_grid(b, t)), (b, t)  # was (B, T): T > 65,535 failed on CUDA
    for b, hkv, splits in ((70_000, 8, 64), (1, 1, 1024), (65_536, 1, 2)):
        assert within(split_kv_grid(b, hkv, splits))  # was (Hkv, B, splits)
    assert within(merge_grid(100_000 * 64))
    with pytest.raises(ValueError, match="append_kv: grid .* along x"):
        append_grid(1 << 16, 1 << 16)
    with pytest.raises(ValueError, match="along y"):
        check_grid((1, 65_536), "test")


@pytest.mark.interpret
@pytest.mark.skipif(not INTERPRET, reason="Triton interpreter runs only with TRITON_INTERPRET=1")
def test_append_many_tokens_one_grid_axis():
    """B * T programs along one axis: every (request, token) lands once (interpreter)."""
    gen = torch.Generator().manual_seed(12)
    pool = random_paged_kv(3, 140, 1, 16, 16, generator=gen)
    offsets = torch.tensor([5, 0, 31], dtype=torch.int32)
    k = torch.randn(3, 100, 1, 16, generator=gen)
    v = torch.randn(3, 100, 1, 16, generator=gen)
    ref_k, ref_v = pool.k_cache.clone(), pool.v_cache.clone()
    append_kv_ref(ref_k, ref_v, pool.page_table, offsets, k, v)
    launch_append(pool.k_cache, pool.v_cache, pool.page_table, offsets, k, v)
    assert torch.equal(pool.k_cache, ref_k) and torch.equal(pool.v_cache, ref_v)


@pytest.mark.cuda
@pytest.mark.parametrize("b,t", [(1, 70_000), (70_000, 1)])
def test_long_append_on_gpu(b, t):
    """One range of more than 65,535 tokens (a long prefill), and more than 65,535
    requests: both failed with 'Triton Error [CUDA]: invalid argument' before."""
    gen = torch.Generator().manual_seed(b)
    hkv, d = (8, 128) if b == 1 else (1, 16)
    pool = random_paged_kv(b, t + 20, hkv, d, 16, dtype=torch.bfloat16, device="cuda",
                           generator=gen)
    offsets = torch.randint(0, 20, (b,), generator=gen).int().cuda()
    k = torch.randn(b, t, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    v = torch.randn(b, t, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    ref_k, ref_v = pool.k_cache.clone(), pool.v_cache.clone()
    append_kv_ref(ref_k, ref_v, pool.page_table, offsets, k, v)
    append_kv(pool.k_cache, pool.v_cache, pool.page_table, offsets, k, v)
    assert torch.equal(pool.k_cache, ref_k) and torch.equal(pool.v_cache, ref_v)
