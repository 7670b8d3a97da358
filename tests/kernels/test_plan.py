"""SplitKVPlan (plan once, run many times) and the plans split_kv_attention keeps.

On the CPU the plan runs the torch reference; the Triton path of `run` and of
`split_kv_attention` is driven here under the interpreter by sending CPU tensors down
the CUDA branch; on a GPU, plans are also captured in CUDA graphs and checked for host
syncs.
"""

from __future__ import annotations

import pytest
import torch

from kflume.kernels import SplitKVPlan, _validate, split_kv, split_kv_attention
from kflume.kernels._launcher import Launch
from kflume.kernels.reference import split_kv_attention_ref
from kflume.testing import assert_close_rel, random_paged_kv

from .helpers import INTERPRET, triton_available

HKV, GROUP, D, PAGE = 2, 4, 64, 16


def case(gen, lengths, device="cpu", dtype=torch.float32, tokens=None):
    b = len(lengths)
    starts = torch.randint(0, 2 * PAGE + 1, (b,), generator=gen)
    length = torch.tensor(lengths)
    tokens = tokens or int((starts + length).max())
    pool = random_paged_kv(b, tokens, HKV, D, PAGE, dtype=dtype, device=device, generator=gen)
    q = torch.randn(b, HKV * GROUP, D, generator=gen).to(device, dtype)
    return q, pool, starts.to(device, torch.int32), length.to(device, torch.int32)


def poisoned(q):
    return (torch.full_like(q, float("nan")),
            torch.full(q.shape[:2], float("nan"), device=q.device))


def check(out, lse, q, pool, start, length, softcap=None, scale=None):
    scale = D**-0.5 if scale is None else scale
    ref_o, ref_l = split_kv_attention_ref(q.double(), pool.k_cache.double(),
                                          pool.v_cache.double(), pool.page_table, start, length,
                                          scale, softcap=softcap)
    assert_close_rel(out, ref_o, q.dtype)
    empty = (length == 0).cpu()
    assert torch.isneginf(lse.cpu()[empty]).all() and (out.cpu()[empty] == 0).all()
    assert torch.allclose(lse.cpu()[~empty].double(), ref_l.cpu()[~empty], atol=1e-3,
                          rtol=1e-4)


def make_plan(q, pool, **kw):
    b, hq, d = q.shape
    return SplitKVPlan(b, hq, HKV, d, PAGE, pool.page_table.shape[1], dtype=q.dtype,
                       device=q.device, **kw)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_plan_runs_many_times_on_fresh_inputs(softcap):
    gen = torch.Generator().manual_seed(1)
    q, pool, start, length = case(gen, [40, 0, 97], tokens=130)
    plan = make_plan(q, pool, softcap=softcap, scale=0.2)
    for _ in range(3):  # new values in the same shapes, poisoned outputs each time
        q.normal_(generator=gen)
        pool.k_cache.normal_(generator=gen)
        length.random_(0, 98, generator=gen)
        out, lse = poisoned(q)
        res = plan.run(q, pool.k_cache, pool.v_cache, pool.page_table, start, length, out=out,
                       lse=lse)
        assert res[0] is out and res[1] is lse
        check(out, lse, q, pool, start, length, softcap, scale=0.2)


def test_plan_refuses_other_shapes_and_bad_plans():
    gen = torch.Generator().manual_seed(2)
    q, pool, start, length = case(gen, [10, 20])
    plan = make_plan(q, pool)
    with pytest.raises(ValueError, match="build a plan for this shape"):
        plan.run(q[:1], pool.k_cache, pool.v_cache, pool.page_table[:1], start[:1], length[:1])
    with pytest.raises(ValueError, match="build a plan for this shape"):
        plan.run(q, pool.k_cache, pool.v_cache, torch.cat([pool.page_table] * 2, 1), start,
                 length)
    with pytest.raises(TypeError, match="kv_len must have dtype int32"):
        plan.run(q, pool.k_cache, pool.v_cache, pool.page_table, start, length.long())
    with pytest.raises(ValueError, match="multiple of Hkv"):
        SplitKVPlan(1, 6, 4, 64, 16, 8, device="cpu")
    with pytest.raises(ValueError, match="num_splits must be in"):
        SplitKVPlan(1, 8, 4, 64, 16, 8, device="cpu", num_splits=0)
    with pytest.raises(ValueError, match="softcap must be a positive"):
        SplitKVPlan(1, 8, 4, 64, 16, 8, device="cpu", softcap=-2.0)


def test_plan_with_a_contiguous_cache():
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 50, HKV, D, generator=gen)
    v = torch.randn(2, 50, HKV, D, generator=gen)
    q = torch.randn(2, HKV * GROUP, D, generator=gen)
    start = torch.tensor([0, 7], dtype=torch.int32)
    length = torch.tensor([50, 40], dtype=torch.int32)
    plan = SplitKVPlan(2, HKV * GROUP, HKV, D, 50, 1, dtype=q.dtype, device="cpu")
    out, lse = plan.run(q, k, v, None, start, length)
    ref, ref_l = split_kv_attention(q, k, v, None, start, length)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_l)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """CPU tensors down the CUDA branch, so that the Triton launches run in the
    interpreter; a fresh plan cache."""
    if not (INTERPRET and triton_available()):
        pytest.skip("Triton interpreter runs only when TRITON_INTERPRET=1 at start")
    monkeypatch.setattr(_validate, "uses_triton", lambda t: True)
    monkeypatch.setattr(Launch, "stream_of", staticmethod(lambda index: 0))
    monkeypatch.setattr(split_kv, "_PLANS", {})


@pytest.mark.interpret
def test_plan_run_through_triton(triton_on_cpu):
    """run's Triton path (split kernel, scratch kept across runs, merge of the splits)."""
    gen = torch.Generator().manual_seed(4)
    q, pool, start, length = case(gen, [45, 0, 33], dtype=torch.bfloat16, tokens=80)
    plan = make_plan(q, pool, num_splits=3, softcap=5.0)
    scratch = None
    for _ in range(2):
        length.random_(0, 46, generator=gen)
        out, lse = poisoned(q)
        plan.run(q, pool.k_cache, pool.v_cache, pool.page_table, start, length, out=out, lse=lse)
        check(out, lse, q, pool, start, length, softcap=5.0)
        assert scratch is None or plan._partials[0] is scratch  # no new allocation
        scratch = plan._partials[0]


@pytest.mark.interpret
def test_split_kv_attention_keeps_one_plan_per_shape(triton_on_cpu):
    gen = torch.Generator().manual_seed(5)
    q, pool, start, length = case(gen, [29, 64])
    for _ in range(2):
        out, lse = split_kv_attention(q, pool.k_cache, pool.v_cache, pool.page_table, start,
                                      length, num_splits=2)
        check(out, lse, q, pool, start, length)
    assert len(split_kv._PLANS) == 1
    out, lse = split_kv_attention(q, pool.k_cache, pool.v_cache, pool.page_table, start, length,
                                  num_splits=1, softcap=2.0)  # another plan
    check(out, lse, q, pool, start, length, softcap=2.0)
    assert len(split_kv._PLANS) == 2


@pytest.mark.cuda
def test_plan_on_gpu_takes_the_fast_launch_and_never_syncs():
    gen = torch.Generator().manual_seed(6)
    q, pool, start, length = case(gen, [300, 0, 1000, 77], device="cuda",
                                  dtype=torch.bfloat16)
    plan = make_plan(q, pool, num_splits=4)

    def calls():
        for softcap in (None, 30.0):
            out, lse = split_kv_attention(q, pool.k_cache, pool.v_cache, pool.page_table, start,
                                          length, softcap=softcap)
        out2, lse2 = poisoned(q)
        plan.run(q, pool.k_cache, pool.v_cache, pool.page_table, start, length, out=out2,
                 lse=lse2)
        return out, lse, out2, lse2

    calls()  # first calls: compile, plan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync below raises
    try:
        out, lse, out2, lse2 = calls()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    check(out, lse, q, pool, start, length, softcap=30.0)
    check(out2, lse2, q, pool, start, length)
    split_launch, merge_launch = plan._launches
    assert split_launch.fast and split_launch._entries and merge_launch._entries


@pytest.mark.cuda
def test_plan_run_in_a_cuda_graph_follows_new_values():
    """Captured once; between replays the ranges and the page table change in place."""
    gen = torch.Generator().manual_seed(7)
    q, pool, start, length = case(gen, [500, 3, 900], device="cuda", dtype=torch.bfloat16,
                                  tokens=1000)
    plan = make_plan(q, pool)
    out, lse = poisoned(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        plan.run(q, pool.k_cache, pool.v_cache, pool.page_table, start, length, out=out, lse=lse)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.run(q, pool.k_cache, pool.v_cache, pool.page_table, start, length, out=out, lse=lse)
        o2, l2 = split_kv_attention(q, pool.k_cache, pool.v_cache, pool.page_table, start,
                                    length, softcap=10.0)
    for _ in range(3):
        length.copy_(torch.randint(0, 901, (3,), generator=gen).int())
        start.copy_(torch.randint(0, 80, (3,), generator=gen).int())
        perm = torch.randperm(pool.k_cache.shape[0], generator=gen)[: pool.page_table.numel()]
        pool.page_table.copy_(perm.view_as(pool.page_table).int())
        q.copy_(torch.randn(q.shape, generator=gen).to(q.dtype))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(out, lse, q, pool, start, length)
        check(o2, l2, q, pool, start, length, softcap=10.0)
