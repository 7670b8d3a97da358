"""merge_attention_states and merge_state_ against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from kflume.kernels import merge_attention_states, merge_new_token, merge_state_
from kflume.kernels.merge import launch_merge, launch_merge_two
from kflume.kernels.reference import merge_attention_states_ref
from kflume.testing import assert_close_rel

from .helpers import BACKENDS, device_of


def random_states(n, b, h, d, dtype, device, gen):
    outs = torch.randn(n, b, h, d, generator=gen).to(device, dtype)
    lses = (torch.randn(n, b, h, generator=gen) * 4).to(device)
    # Some empty partials, and whole rows where every partial is empty.
    empty = torch.rand(n, b, h, generator=gen) < 0.3
    empty[:, 0, 0] = True
    empty[:, b - 1, h - 1] = True
    lses[empty.to(device)] = float("-inf")
    outs[empty.to(device)] = 0
    return outs, lses


def merge(backend, outs, lses):
    n, b, h, d = outs.shape
    out = torch.full((b, h, d), float("nan"), dtype=outs.dtype, device=outs.device)
    lse = torch.full((b, h), float("nan"), device=outs.device)
    if backend == "interpret":
        launch_merge(outs, lses, out, lse)
    else:
        merge_attention_states(outs, lses, out=out, lse=lse)
    return out, lse


def check(out, lse, ref_o, ref_lse, dtype):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close_rel(out, ref_o, dtype)
    empty = torch.isneginf(ref_lse)
    assert torch.isneginf(lse.cpu()[empty]).all()
    assert (out.cpu()[empty] == 0).all()
    assert torch.allclose(lse.cpu()[~empty].double(), ref_lse[~empty], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 5, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_merge_matches_reference(backend, n, dtype):
    gen = torch.Generator().manual_seed(n)
    outs, lses = random_states(n, 7, 6, 128, dtype, device_of(backend), gen)
    out, lse = merge(backend, outs, lses)
    ref_o, ref_lse = merge_attention_states_ref(outs.double().cpu(), lses.double().cpu())
    check(out, lse, ref_o, ref_lse, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_merge_two_in_place(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    outs, lses = random_states(2, 9, 4, 64, dtype, device_of(backend), gen)
    ref_o, ref_lse = merge_attention_states_ref(outs.double().cpu(), lses.double().cpu())
    out, lse = outs[0].clone(), lses[0].clone()
    if backend == "interpret":
        launch_merge_two(out, lse, outs[1], lses[1])
    else:
        res = merge_state_(out, lse, outs[1], lses[1])
        assert res[0] is out and res[1] is lse
    check(out, lse, ref_o, ref_lse, dtype)


def test_merge_is_associative_over_splits():
    """Merging (a, b) then c equals merging a, b, c at once."""
    gen = torch.Generator().manual_seed(9)
    outs, lses = random_states(3, 4, 4, 64, torch.float32, "cpu", gen)
    ab_o, ab_l = merge_attention_states(outs[:2], lses[:2])
    o1, l1 = merge_state_(ab_o, ab_l, outs[2], lses[2])
    o2, l2 = merge_attention_states(outs, lses)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(l1, l2)


def test_merge_rejects_bad_input():
    outs = torch.randn(2, 3, 4, 8)
    with pytest.raises(ValueError, match="lses"):
        merge_attention_states(outs, torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="lses must have dtype float32"):
        merge_attention_states(outs, torch.randn(2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="outs must have 4 dimensions"):
        merge_attention_states(outs[0], torch.randn(3, 4))
    with pytest.raises(ValueError, match="other_out"):
        merge_state_(outs[0], torch.randn(3, 4), torch.randn(3, 4, 9), torch.randn(3, 4))


def new_token_case(s, r, b, hkv, group, d, dtype, device, gen, strided=False):
    """q, k, v of b new tokens; S sources of R rows each, where row b's partial sits at a
    random position or nowhere (index -1), some partials empty (-inf)."""
    hq = hkv * group
    q, = (torch.randn(b, hq, d, generator=gen).to(device, dtype),)
    k, v = (torch.randn(b, hkv, d, generator=gen).to(device, dtype) for _ in range(2))
    outs, lses = random_states(s, r, hq, d, dtype, device, gen)
    if strided:  # reply buffers: out and lse of a row interleaved in one allocation
        buf = torch.zeros(s, r, hq * d + hq, dtype=torch.float32, device=device)
        if dtype != torch.float32:
            buf = torch.zeros(s, r, hq * d + 2 * hq, dtype=dtype, device=device)
        o_view = buf[..., : hq * d].unflatten(2, (hq, d))
        l_view = buf[..., hq * d :].view(torch.float32) if dtype != torch.float32 else (
            buf[..., hq * d :])
        o_view.copy_(outs)
        l_view.copy_(lses)
        outs, lses = o_view, l_view
    index = torch.full((s, b), -1, dtype=torch.long)
    for i in range(s):
        rows = torch.randperm(r, generator=gen)[:b]
        held = torch.rand(b, generator=gen) < 0.7
        index[i, held] = rows[held]
    index[:, 0] = -1  # a row with no history anywhere: its own token only
    return q, k, v, outs, lses, index.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group,d", [(1, 64), (4, 128), (8, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_merge_new_token_matches_reference(backend, group, d, dtype):
    gen = torch.Generator().manual_seed(group * d)
    for s, r, b, strided in ((3, 9, 5, True), (1, 1, 1, False), (4, 7, 7, False)):
        q, k, v, outs, lses, index = new_token_case(s, r, b, 2, group, d, dtype,
                                                    device_of(backend), gen, strided)
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:2], float("nan"), device=q.device)
        scale = d**-0.5
        if backend == "interpret":
            from kflume.kernels.merge import launch_merge_new_token

            launch_merge_new_token(q, k, v, outs, lses, index, scale, out, lse)
        else:
            res = merge_new_token(q, k, v, outs, lses, index, scale, out=out, lse=lse)
            assert res[0] is out and res[1] is lse
        # float64 yardstick, built independently: every partial of the row, gathered by
        # hand, and the row's own token as one more partial
        qd, kd, vd = (t.double().cpu() for t in (q, k, v))
        od, ld, idx = outs.double().cpu(), lses.double().cpu(), index.cpu()
        for row in range(b):
            ks = kd[row].repeat_interleave(group, 0)
            parts_o = [vd[row].repeat_interleave(group, 0)]
            parts_l = [(qd[row] * ks).sum(-1) * scale]
            for i in range(s):
                if idx[i, row] >= 0:
                    parts_o.append(od[i, idx[i, row]])
                    parts_l.append(ld[i, idx[i, row]])
            ref_o, ref_l = merge_attention_states_ref(torch.stack(parts_o)[:, None],
                                                      torch.stack(parts_l)[:, None])
            assert torch.isfinite(out[row].float()).all() and torch.isfinite(lse[row]).all()
            assert_close_rel(out[row], ref_o[0], dtype, f"row {row}")
            assert torch.allclose(lse[row].double().cpu(), ref_l[0], atol=1e-4, rtol=1e-4)


def test_merge_new_token_names_bad_arguments():
    q, k, v, outs, lses, index = new_token_case(2, 4, 3, 2, 4, 64, torch.float32, "cpu",
                                                torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="k must be"):
        merge_new_token(q, k[:, :1].expand(3, 3, 64), v, outs, lses, index, 0.1)
    with pytest.raises(ValueError, match="outs must be"):
        merge_new_token(q, k, v, outs[..., :32], lses, index, 0.1)
    with pytest.raises(TypeError, match="index must have dtype int64"):
        merge_new_token(q, k, v, outs, lses, index.int(), 0.1)
    with pytest.raises(ValueError, match="index has shape"):
        merge_new_token(q, k, v, outs, lses, index[:, :2], 0.1)
    with pytest.raises(TypeError, match="v must have dtype float32"):
        merge_new_token(q, k, v.double(), outs, lses, index, 0.1)
