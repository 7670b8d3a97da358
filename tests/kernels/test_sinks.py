"""Attention sinks (GPT-OSS): one more partial state per row, out 0 and lse sinks[h],
against a float64 softmax with the sink column, on every back end."""

from __future__ import annotations

import types

import pytest
import torch

from kflume.kernels import merge_attention_states, merge_new_token, split_kv_attention
from kflume.kernels.merge import launch_merge, launch_merge_new_token
from kflume.kernels.reference import merge_attention_states_ref, sink_state
from kflume.testing import assert_close_rel, random_paged_kv

from .helpers import BACKENDS, device_of


def softmax_with_sinks(scores, values, sinks):
    """float64 attention of one row set: `scores [H, L]`, `values [H, L, D]`, `sinks [H]`.
    The sink column joins the softmax and is dropped before the values (transformers'
    GPT-OSS eager formula). Returns out [H, D] and lse [H] (with the sink)."""
    logits = torch.cat([scores, sinks[:, None]], dim=-1)
    probs = logits.softmax(-1)[:, :-1]
    return torch.einsum("hl,hld->hd", probs, values), logits.logsumexp(-1)


def merge(backend, outs, lses, sinks):
    out = torch.full(outs.shape[1:], float("nan"), dtype=outs.dtype, device=outs.device)
    lse = torch.full(lses.shape[1:], float("nan"), device=outs.device)
    if backend == "interpret":
        launch_merge(outs, lses, out, lse, sinks=sinks)
    else:
        merge_attention_states(outs, lses, out=out, lse=lse, sinks=sinks)
    return out, lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pieces_merged_with_sinks_match_the_softmax_with_a_sink_column(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    dev = device_of(backend)
    b, hkv, group, d, ps = 3, 2, 4, 64, 16
    hq = hkv * group
    lengths = [70, 0, 33]  # request 1 is empty everywhere: its answer is the sink alone
    pool = random_paged_kv(b, max(lengths), hkv, d, ps, dtype=dtype, generator=gen)
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    sinks = (torch.randn(hq, generator=gen) * 2).to(dtype)
    # Two pieces per request, attended on the CPU path; the merge runs on the backend.
    cuts = [(0, 25, 70), (0, 0, 0), (0, 33, 33)]
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    parts = [split_kv_attention(q, pool.k_cache, pool.v_cache, pool.page_table,
                                i32([c[p] for c in cuts]), i32([c[p + 1] - c[p] for c in cuts]))
             for p in range(2)]
    outs = torch.stack([o for o, _ in parts]).to(dev)
    lses = torch.stack([s for _, s in parts]).to(dev)
    out, lse = merge(backend, outs, lses, sinks.to(dev))
    for row in range(b):
        n = lengths[row]
        toks = torch.arange(n)
        pages = pool.page_table[row].long()[toks // ps]
        k = pool.k_cache.double()[pages, toks % ps].repeat_interleave(group, 1)  # [L, Hq, D]
        v = pool.v_cache.double()[pages, toks % ps].repeat_interleave(group, 1)
        scores = torch.einsum("hd,lhd->hl", q[row].double(), k) * d**-0.5
        ref_o, ref_l = softmax_with_sinks(scores, v.transpose(0, 1), sinks.double())
        if n == 0:
            assert (out[row].cpu() == 0).all()
        else:
            assert_close_rel(out[row], ref_o, dtype, f"row {row}")
        assert torch.allclose(lse[row].cpu().double(), ref_l, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_are_one_more_state(backend):
    """merge(sinks=) equals merging the sinks' state as one more partial, and a sink of
    -inf changes nothing."""
    gen = torch.Generator().manual_seed(4)
    dev = device_of(backend)
    outs = torch.randn(3, 3, 6, 32, generator=gen).to(dev)
    lses = (torch.randn(3, 3, 6, generator=gen) * 3).to(dev)
    lses[:, 0] = float("-inf")  # an all-empty row
    sinks = torch.randn(6, generator=gen).to(dev)
    sinks[2] = float("-inf")
    out, lse = merge(backend, outs, lses, sinks)
    so, sl = sink_state(sinks.cpu().double(), 3, 32, torch.float64)
    ref_o, ref_l = merge_attention_states_ref(torch.cat([outs.cpu().double(), so[None]]),
                                              torch.cat([lses.cpu().double(), sl[None]]))
    assert_close_rel(out, ref_o, torch.float32)
    assert torch.allclose(lse.cpu().double(), ref_l, atol=1e-5, rtol=1e-5)
    assert (out[0, [0, 1, 3, 4, 5]].cpu() == 0).all() and torch.isneginf(lse[0, 2].cpu())
    plain_o, plain_l = merge(backend, outs, lses, None)
    assert torch.allclose(plain_o[:, 2], out[:, 2])
    assert torch.allclose(plain_l[1:, 2], lse[1:, 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_new_token_with_sinks(backend):
    gen = torch.Generator().manual_seed(6)
    dev = device_of(backend)
    b, hkv, group, d = 3, 2, 2, 64
    hq = hkv * group
    q = torch.randn(b, hq, d, generator=gen).to(dev)
    k, v = (torch.randn(b, hkv, d, generator=gen).to(dev) for _ in range(2))
    outs = torch.randn(2, 4, hq, d, generator=gen).to(dev)
    lses = (torch.randn(2, 4, hq, generator=gen) * 2).to(dev)
    index = torch.tensor([[3, -1, 0], [1, -1, 2]], device=dev)
    sinks = (torch.randn(hq, generator=gen) + 1).to(dev)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, hq), float("nan"), device=dev)
    if backend == "interpret":
        launch_merge_new_token(q, k, v, outs, lses, index, 0.125, out, lse, sinks=sinks)
    else:
        merge_new_token(q, k, v, outs, lses, index, 0.125, out=out, lse=lse, sinks=sinks)
    for row in range(b):  # float64 by hand: own token, the row's partials, the sink
        kd = k[row].cpu().double().repeat_interleave(group, 0)
        parts_l = [(q[row].cpu().double() * kd).sum(-1) * 0.125, sinks.cpu().double()]
        parts_o = [v[row].cpu().double().repeat_interleave(group, 0), torch.zeros(hq, d).double()]
        for s in range(2):
            j = int(index[s, row])
            if j >= 0:
                parts_l.append(lses[s, j].cpu().double())
                parts_o.append(outs[s, j].cpu().double())
        ls = torch.stack(parts_l)
        ref_l = ls.logsumexp(0)
        ref_o = ((ls - ref_l).exp()[..., None] * torch.stack(parts_o)).sum(0)
        assert_close_rel(out[row], ref_o, torch.float32, f"row {row}")
        assert torch.allclose(lse[row].cpu().double(), ref_l, atol=1e-5, rtol=1e-5)


def test_sinks_match_transformers_gpt_oss():
    """split_kv_attention over the whole range, merged with the sinks, against
    transformers' own GPT-OSS eager attention."""
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    gen = torch.Generator().manual_seed(7)
    b, hq, hkv, d, length = 2, 8, 2, 32, 29
    k = torch.randn(b, length, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, length, hkv, d, generator=gen, dtype=torch.float64)
    q = torch.randn(b, hq, d, generator=gen, dtype=torch.float64)
    sinks = torch.randn(hq, generator=gen, dtype=torch.float64) * 3
    module = types.SimpleNamespace(num_key_value_groups=hq // hkv, training=False, sinks=sinks)
    ref, _ = gpt_oss.eager_attention_forward(module, q[:, :, None], k.transpose(1, 2),
                                             v.transpose(1, 2), None, scaling=d**-0.5)
    zero = torch.zeros(b, dtype=torch.int32)
    o, s = split_kv_attention(q.float(), k.float(), v.float(), None, zero,
                              torch.full((b,), length, dtype=torch.int32))
    out, _ = merge_attention_states(o[None], s[None], sinks=sinks.float())
    assert_close_rel(out, ref[:, 0], torch.float32)


def test_bad_sinks_are_named():
    outs, lses = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="sinks has shape"):
        merge_attention_states(outs, lses, sinks=torch.randn(5))
    with pytest.raises(TypeError, match="sinks must have dtype"):
        merge_attention_states(outs, lses, sinks=torch.randn(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="sinks must have 1 dimensions"):
        merge_attention_states(outs, lses, sinks=torch.randn(1, 4))
