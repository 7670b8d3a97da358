"""merge_attention_states and merge_state_ against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from kflume.kernels import merge_attention_states, merge_state_
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
