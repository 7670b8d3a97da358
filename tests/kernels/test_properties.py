"""Cutting a range into pieces, attending each and merging equals attending the whole.

This is the identity disaggregation rests on: attention nodes hold pieces of a request's
range and the weight node merges their partials.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kflume.kernels import merge_attention_states, split_kv_attention
from kflume.kernels.merge import launch_merge
from kflume.kernels.split_kv import launch_split_kv
from kflume.testing import assert_close_rel, random_paged_kv

from .helpers import INTERPRET, triton_available


@st.composite
def cut_ranges(draw, max_len=300):
    """A batch of ranges and, for each, the same cut points count (pieces may be empty)."""
    bsz = draw(st.integers(1, 4))
    pieces = draw(st.integers(1, 5))
    page_size = draw(st.sampled_from([1, 16, 64]))
    starts, cuts = [], []
    for _ in range(bsz):
        start = draw(st.integers(0, 70))
        length = draw(st.integers(0, max_len))
        points = sorted(draw(st.lists(st.integers(0, length), min_size=pieces - 1,
                                      max_size=pieces - 1)))
        starts.append(start)
        cuts.append([0, *points, length])
    group = draw(st.sampled_from([1, 4, 8]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    return bsz, pieces, page_size, starts, cuts, group, dtype, seed


def check_cut(case, attend, merge):
    bsz, pieces, page_size, starts, cuts, group, dtype, seed = case
    gen = torch.Generator().manual_seed(seed)
    tokens = max(s + c[-1] for s, c in zip(starts, cuts)) or 1
    pool = random_paged_kv(bsz, tokens, 2, 64, page_size, dtype=dtype, generator=gen)
    q = torch.randn(bsz, 2 * group, 64, generator=gen).to(dtype)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    whole = attend(q, pool, i32(starts), i32([c[-1] for c in cuts]))
    outs, lses = [], []
    for p in range(pieces):
        piece_start = i32([s + c[p] for s, c in zip(starts, cuts)])
        piece_len = i32([c[p + 1] - c[p] for c in cuts])
        o, s = attend(q, pool, piece_start, piece_len)
        outs.append(o)
        lses.append(s)
    out, lse = merge(torch.stack(outs), torch.stack(lses))
    assert_close_rel(out, whole[0], dtype)
    finite = torch.isfinite(whole[1])
    assert torch.equal(finite, torch.isfinite(lse))
    assert torch.allclose(lse[finite], whole[1][finite], atol=1e-4, rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(cut_ranges())
def test_cut_attend_merge_equals_whole(case):
    def attend(q, pool, start, length):
        return split_kv_attention(q, pool.k_cache, pool.v_cache, pool.page_table, start, length)

    check_cut(case, attend, merge_attention_states)


@pytest.mark.interpret
@pytest.mark.skipif(not (INTERPRET and triton_available()),
                    reason="Triton interpreter runs only when TRITON_INTERPRET=1 at start")
@settings(max_examples=12, deadline=None)
@given(cut_ranges(max_len=140))
def test_cut_attend_merge_equals_whole_triton(case):
    def attend(q, pool, start, length):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2])
        launch_split_kv(q, pool.k_cache, pool.v_cache, pool.page_table, start, length, out, lse,
                        q.shape[-1] ** -0.5, 2)
        return out, lse

    def merge(outs, lses):
        out = torch.empty_like(outs[0])
        lse = torch.empty(lses.shape[1:])
        launch_merge(outs, lses, out, lse)
        return out, lse

    check_cut(case, attend, merge)
