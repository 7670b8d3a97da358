"""Softcapping (Gemma2): scores `softcap * tanh(scale * q.k / softcap)`, LSE over the
capped scores, on every back end, against float64 yardsticks built in the test."""

from __future__ import annotations

import types

import pytest
import torch

from kflume.kernels import merge_attention_states, merge_new_token, split_kv_attention
from kflume.kernels.merge import launch_merge_new_token
from kflume.kernels.split_kv import launch_split_kv
from kflume.testing import assert_close_rel, random_paged_kv

from .helpers import BACKENDS, device_of

CAP = 4.0  # small against the scores below (|s| up to ~15), so capping matters


def dense_softcap_attention(q, k_cache, v_cache, page_table, start, length, scale, softcap):
    """float64, one request at a time, tokens gathered by hand: Gemma2's eager order
    (scale, then cap), then softmax. Returns out [B, Hq, D] and lse [B, Hq]."""
    bsz, hq, d = q.shape
    hkv, ps = k_cache.shape[2], k_cache.shape[1]
    outs, lses = torch.zeros(bsz, hq, d, dtype=torch.float64), torch.full((bsz, hq), -torch.inf,
                                                                          dtype=torch.float64)
    for b in range(bsz):
        toks = torch.arange(int(start[b]), int(start[b] + length[b]))
        if len(toks) == 0:
            continue
        pages = page_table[b].cpu().long()[toks // ps]
        k = k_cache.cpu().double()[pages, toks % ps].repeat_interleave(hq // hkv, 1)  # [L,Hq,D]
        v = v_cache.cpu().double()[pages, toks % ps].repeat_interleave(hq // hkv, 1)
        s = torch.einsum("hd,lhd->hl", q[b].cpu().double(), k) * scale
        s = torch.tanh(s / softcap) * softcap
        outs[b] = torch.einsum("hl,lhd->hd", s.softmax(-1), v)
        lses[b] = s.logsumexp(-1)
    return outs, lses


def attend(backend, q, pool, start, length, scale, softcap, num_splits=None):
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=q.device)
    if backend == "interpret":
        launch_split_kv(q, pool.k_cache, pool.v_cache, pool.page_table, start, length, out, lse,
                        scale, num_splits or 3, softcap=softcap)
    else:
        split_kv_attention(q, pool.k_cache, pool.v_cache, pool.page_table, start, length,
                           scale=scale, softcap=softcap, num_splits=num_splits, out=out, lse=lse)
    return out, lse


def check(out, lse, ref_o, ref_l, length, dtype):
    assert_close_rel(out, ref_o, dtype)
    empty = (length == 0).cpu()
    assert torch.isneginf(lse.cpu()[empty]).all() and (out.cpu()[empty] == 0).all()
    assert torch.allclose(lse.cpu()[~empty].double(), ref_l[~empty], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group,page_size,dtype", [(1, 16, torch.float32),
                                                   (4, 1, torch.bfloat16),
                                                   (8, 16, torch.float16)], ids=str)
def test_softcap_matches_float64(backend, group, page_size, dtype):
    gen = torch.Generator().manual_seed(group * 100 + page_size)
    dev = device_of(backend)
    lengths = [37, 0, 130, 1, 67]
    starts = torch.randint(0, 2 * page_size + 1, (len(lengths),), generator=gen)
    length = torch.tensor(lengths)
    pool = random_paged_kv(len(lengths), int((starts + length).max()), 2, 64, page_size,
                           dtype=dtype, device=dev, generator=gen)
    q = (torch.randn(len(lengths), 2 * group, 64, generator=gen) * 2).to(dev, dtype)
    start, length = starts.to(dev, torch.int32), length.to(dev, torch.int32)
    scale = 64**-0.5
    out, lse = attend(backend, q, pool, start, length, scale, CAP)
    ref_o, ref_l = dense_softcap_attention(q, pool.k_cache, pool.v_cache, pool.page_table,
                                           start, length, scale, CAP)
    check(out, lse, ref_o, ref_l, length, dtype)
    # The cap matters at these sizes: the uncapped answer is far from the capped one.
    plain_o, _ = dense_softcap_attention(q, pool.k_cache, pool.v_cache, pool.page_table, start,
                                         length, scale, 1e9)
    assert (plain_o - ref_o).norm() > 10 * (out.cpu().double() - ref_o).norm()


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_pieces_merge_to_the_whole(backend):
    """Cutting a range, attending each piece with the cap and merging equals the whole:
    the LSE is over the capped scores."""
    gen = torch.Generator().manual_seed(5)
    dev = device_of(backend)
    pool = random_paged_kv(3, 150, 2, 64, 16, device=dev, generator=gen)
    q = (torch.randn(3, 8, 64, generator=gen) * 2).to(dev)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=dev)  # noqa: E731
    cuts = [[3, 40, 41, 140], [0, 0, 77, 100], [9, 9, 9, 9]]  # pieces [c0,c1) [c1,c2) [c2,c3)
    whole = attend(backend, q, pool, i32([c[0] for c in cuts]),
                   i32([c[-1] - c[0] for c in cuts]), 0.2, CAP, num_splits=1)
    pieces = [attend(backend, q, pool, i32([c[p] for c in cuts]),
                     i32([c[p + 1] - c[p] for c in cuts]), 0.2, CAP, num_splits=2)
              for p in range(3)]
    out, lse = merge_attention_states(torch.stack([o for o, _ in pieces]),
                                      torch.stack([s for _, s in pieces]))
    assert_close_rel(out, whole[0], torch.float32)
    finite = torch.isfinite(whole[1])
    assert torch.equal(finite, torch.isfinite(lse)) and not finite[2].any()
    assert torch.allclose(lse[finite], whole[1][finite], atol=1e-4, rtol=1e-5)


def test_softcap_matches_transformers_gemma2():
    """The CPU path against transformers' own Gemma2 eager attention (scale, then cap)."""
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    gen = torch.Generator().manual_seed(2)
    b, hq, hkv, d, length = 2, 8, 2, 32, 45
    k = torch.randn(b, length, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, length, hkv, d, generator=gen, dtype=torch.float64)
    q = torch.randn(b, hq, d, generator=gen, dtype=torch.float64) * 3
    module = types.SimpleNamespace(num_key_value_groups=hq // hkv, training=False)
    ref, _ = gemma2.eager_attention_forward(module, q[:, :, None], k.transpose(1, 2),
                                            v.transpose(1, 2), None, scaling=d**-0.5,
                                            softcap=CAP)
    zero = torch.zeros(b, dtype=torch.int32)
    out, _ = split_kv_attention(q.float(), k.float(), v.float(), None, zero,
                                torch.full((b,), length, dtype=torch.int32), softcap=CAP)
    assert_close_rel(out, ref[:, 0], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_new_token_caps_the_own_score(backend):
    """The new token's own partial is (lse = capped score, out = v)."""
    gen = torch.Generator().manual_seed(8)
    dev = device_of(backend)
    b, hkv, group, d = 4, 2, 4, 64
    q = (torch.randn(b, hkv * group, d, generator=gen) * 3).to(dev)
    k, v = (torch.randn(b, hkv, d, generator=gen).to(dev) for _ in range(2))
    outs = torch.randn(2, b, hkv * group, d, generator=gen).to(dev)
    lses = (torch.randn(2, b, hkv * group, generator=gen) * 2).to(dev)
    index = torch.tensor([[0, -1, 2, 3], [1, 1, -1, 0]], device=dev)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=dev)
    scale = 0.3
    if backend == "interpret":
        launch_merge_new_token(q, k, v, outs, lses, index, scale, out, lse, softcap=CAP)
    else:
        merge_new_token(q, k, v, outs, lses, index, scale, out=out, lse=lse, softcap=CAP)
    for row in range(b):  # float64 by hand: the capped own score, then the row's partials
        kd = k[row].cpu().double().repeat_interleave(group, 0)
        own = torch.tanh((q[row].cpu().double() * kd).sum(-1) * scale / CAP) * CAP  # [Hq]
        parts_o = [v[row].cpu().double().repeat_interleave(group, 0)]
        parts_l = [own]
        for s in range(2):
            j = int(index[s, row])
            if j >= 0:
                parts_o.append(outs[s, j].cpu().double())
                parts_l.append(lses[s, j].cpu().double())
        ls = torch.stack(parts_l)  # [P, Hq]
        ref_l = ls.logsumexp(0)
        ref_o = ((ls - ref_l).exp()[..., None] * torch.stack(parts_o)).sum(0)
        assert_close_rel(out[row], ref_o, torch.float32, f"row {row}")
        assert torch.allclose(lse[row].cpu().double(), ref_l, atol=1e-5, rtol=1e-5)


def test_softcap_must_be_positive():
    pool = random_paged_kv(1, 16, 1, 16, 16)
    q = torch.randn(1, 2, 16)
    one = torch.ones(1, dtype=torch.int32)
    for bad in (0.0, -1.0, float("inf"), "x"):
        with pytest.raises(ValueError, match="softcap must be a positive"):
            split_kv_attention(q, pool.k_cache, pool.v_cache, pool.page_table, one * 0, one,
                               softcap=bad)
