"""torch.compile traces code that calls the kflume ops (registered with torch.library)."""

from __future__ import annotations

import torch

from kflume.kernels import (
    append_kv,
    merge_attention_states,
    merge_new_token,
    merge_state_,
    split_kv_attention,
)
from kflume.testing import random_paged_kv


def decode_attention(q, k_new, v_new, k_cache, v_cache, page_table, start, length, sinks):
    append_kv(k_cache, v_cache, page_table, start + length, k_new, v_new, check=False)
    out, lse = split_kv_attention(q, k_cache, v_cache, page_table, start, length + 1,
                                  check=False)
    out2, lse2 = split_kv_attention(q, k_cache, v_cache, page_table, start, length, check=False,
                                    softcap=5.0)
    merged, mlse = merge_attention_states(torch.stack([out, out2]), torch.stack([lse, lse2]),
                                          sinks=sinks)
    merge_state_(merged, mlse, out, lse)
    # the new token against the two partials above (as two sources of one row each)
    index = torch.arange(q.shape[0]).expand(2, -1)
    new_out, new_lse = merge_new_token(q, k_new, v_new, torch.stack([out, out2]),
                                       torch.stack([lse, lse2]), index, 0.125, softcap=5.0,
                                       sinks=sinks)
    return merged, mlse, new_out, new_lse


def test_ops_are_registered():
    for name in ("split_kv_attention_", "merge_attention_states_", "merge_state_", "append_kv_",
                 "merge_new_token_"):
        assert hasattr(torch.ops.kflume, name)


def test_fullgraph_compile_matches_eager():
    gen = torch.Generator().manual_seed(0)
    pool = random_paged_kv(3, 64, 2, 64, 16, generator=gen)
    q = torch.randn(3, 8, 64, generator=gen)
    k_new = torch.randn(3, 2, 64, generator=gen)
    v_new = torch.randn(3, 2, 64, generator=gen)
    start = torch.tensor([0, 3, 10], dtype=torch.int32)
    length = torch.tensor([20, 0, 41], dtype=torch.int32)
    sinks = torch.randn(8, generator=gen)
    caches = [(pool.k_cache.clone(), pool.v_cache.clone()) for _ in range(2)]
    eager = decode_attention(q, k_new, v_new, *caches[0], pool.page_table, start, length, sinks)
    compiled_fn = torch.compile(decode_attention, fullgraph=True, backend="aot_eager")
    compiled = compiled_fn(q, k_new, v_new, *caches[1], pool.page_table, start, length, sinks)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    torch.testing.assert_close(compiled[2:], eager[2:])
    torch.testing.assert_close(caches[1][0], caches[0][0])  # the append happened once
