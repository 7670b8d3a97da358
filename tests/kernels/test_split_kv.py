"""split_kv_attention against the float64 reference, on every back end."""

from __future__ import annotations

import pytest
import torch

from kflume.kernels import split_kv_attention
from kflume.kernels.reference import split_kv_attention_ref
from kflume.kernels.split_kv import default_num_splits, launch_split_kv
from kflume.testing import TOLERANCE, assert_close_rel, random_paged_kv

from .helpers import BACKENDS, device_of

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def run(backend, q, kc, vc, pt, start, length, *, scale=None, num_splits=None):
    """Run one back end with NaN-poisoned outputs, so unwritten elements show."""
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=q.device)
    if backend == "interpret":
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        launch_split_kv(q, kc, vc, pt, start, length, out, lse, scale, num_splits or 2)
    else:
        split_kv_attention(
            q, kc, vc, pt, start, length, scale=scale, num_splits=num_splits, out=out, lse=lse
        )
    return out, lse


def ragged_ranges(lengths, page_size, gen, device):
    """Starts that fall mid-page, with the lengths given."""
    starts = [int(torch.randint(0, 2 * page_size + 1, (1,), generator=gen)) for _ in lengths]
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return as_t(starts), as_t(lengths), max(s + n for s, n in zip(starts, lengths))


def check_against_ref(out, lse, q, kc, vc, pt, start, length, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ref_o, ref_lse = split_kv_attention_ref(
        q.double(), kc.double(), vc.double(), pt, start, length, scale
    )
    assert_close_rel(out, ref_o, q.dtype)
    empty = (length == 0).cpu()
    lse, ref_lse = lse.cpu(), ref_lse.cpu()
    assert torch.isneginf(lse[empty]).all(), "empty range must give lse = -inf"
    assert (out.cpu()[empty] == 0).all(), "empty range must give out = 0"
    assert torch.allclose(lse[~empty].double(), ref_lse[~empty], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, dtype, group, head_dim, page_size):
    gen = torch.Generator().manual_seed(hash((group, head_dim, page_size)) % 2**31)
    dev = device_of(backend)
    hkv = 2
    lengths = [0, 1, 37, 130, 67] if backend == "interpret" else [0, 1, 37, 301, 1000, 67, 2]
    start, length, tokens = ragged_ranges(lengths, page_size, gen, dev)
    pool = random_paged_kv(len(lengths), tokens, hkv, head_dim, page_size, dtype=dtype,
                           device=dev, generator=gen)
    q = torch.randn(len(lengths), hkv * group, head_dim, generator=gen).to(dev, dtype)
    out, lse = run(backend, q, pool.k_cache, pool.v_cache, pool.page_table, start, length)
    check_against_ref(out, lse, q, pool.k_cache, pool.v_cache, pool.page_table, start, length)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_splits_and_scale(backend, num_splits):
    """Any split count gives the same function, with a custom scale and odd sizes."""
    gen = torch.Generator().manual_seed(num_splits)
    dev = device_of(backend)
    start, length, tokens = ragged_ranges([97, 0, 54, 1, 17], 16, gen, dev)
    pool = random_paged_kv(5, tokens, 3, 64, 16, device=dev, generator=gen)
    q = torch.randn(5, 12, 64, generator=gen).to(dev)
    out, lse = run(backend, q, pool.k_cache, pool.v_cache, pool.page_table, start, length,
                   scale=0.3, num_splits=num_splits)
    check_against_ref(out, lse, q, pool.k_cache, pool.v_cache, pool.page_table, start, length,
                      scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_not_power_of_two(backend):
    gen = torch.Generator().manual_seed(7)
    dev = device_of(backend)
    start, length, tokens = ragged_ranges([33, 80], 16, gen, dev)
    pool = random_paged_kv(2, tokens, 2, 96, 16, device=dev, generator=gen)
    q = torch.randn(2, 8, 96, generator=gen).to(dev)
    out, lse = run(backend, q, pool.k_cache, pool.v_cache, pool.page_table, start, length)
    check_against_ref(out, lse, q, pool.k_cache, pool.v_cache, pool.page_table, start, length)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_contiguous_cache(backend):
    """A contiguous [B, L, Hkv, D] cache with page_table=None is one page per request."""
    gen = torch.Generator().manual_seed(3)
    dev = device_of(backend)
    k = torch.randn(3, 50, 2, 64, generator=gen).to(dev)
    v = torch.randn(3, 50, 2, 64, generator=gen).to(dev)
    q = torch.randn(3, 8, 64, generator=gen).to(dev)
    start = torch.tensor([0, 10, 49], dtype=torch.int32, device=dev)
    length = torch.tensor([50, 13, 1], dtype=torch.int32, device=dev)
    out, lse = split_kv_attention(q, k, v, None, start, length)
    pt = torch.arange(3, dtype=torch.int32, device=dev).view(3, 1)
    check_against_ref(out, lse, q, k, v, pt, start, length)


def test_all_requests_empty():
    q = torch.randn(2, 4, 64)
    pool = random_paged_kv(2, 16, 1, 64, 16)
    zero = torch.zeros(2, dtype=torch.int32)
    out, lse = split_kv_attention(q, pool.k_cache, pool.v_cache, pool.page_table, zero, zero)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_default_num_splits_fills_the_gpu():
    assert default_num_splits(1, 8, 8192, 132) == 32  # 8 programs -> 256 with 256-token chunks
    assert default_num_splits(32, 8, 32768, 132) == 2  # 256 -> 512 programs
    assert default_num_splits(16, 8, 131072, 132) == 4
    assert default_num_splits(1, 8, 300, 132) == 1  # too short to split
    assert 1 <= default_num_splits(1, 1, 10**9, 132) <= 64


def test_checker_catches_a_wrong_answer():
    """The tolerance check fails an answer that is slightly wrong (scale off by 1%)."""
    gen = torch.Generator().manual_seed(11)
    start, length, tokens = ragged_ranges([64, 100], 16, gen, "cpu")
    pool = random_paged_kv(2, tokens, 2, 64, 16, dtype=torch.bfloat16, generator=gen)
    q = torch.randn(2, 8, 64, generator=gen).to(torch.bfloat16)
    out, lse = split_kv_attention(
        q, pool.k_cache, pool.v_cache, pool.page_table, start, length, scale=64**-0.5 * 1.3
    )
    with pytest.raises(AssertionError, match="relative error"):
        check_against_ref(out, lse, q, pool.k_cache, pool.v_cache, pool.page_table, start, length)
    assert TOLERANCE[torch.bfloat16] < 0.05
