"""Edits between and within turns: park, extend, truncate, forget_before (kflume/turns.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kflume.router import CapacityError, FillThenLeastLoaded, RouterError, Span, TokenRangeRouter


def router(*caps: int, range_tokens: int = 8) -> TokenRangeRouter:
    r = TokenRangeRouter(FillThenLeastLoaded(range_tokens=range_tokens))
    for i, cap in enumerate(caps):
        r.add_node(f"n{i}", cap)
    return r


def check_capacity(r: TokenRangeRouter) -> None:
    """Every node's load is the tokens of the ranges on it; ranges are contiguous."""
    load = dict.fromkeys(r.nodes(), 0)
    for rid in r.requests():
        ranges = r.ranges(rid)
        for a, b in zip(ranges, ranges[1:]):
            assert a.end == b.start
        for t in ranges:
            load[t.node] += len(t)
    assert load == {n: r.node_load(n) for n in r.nodes()}


def test_a_parked_request_keeps_its_kv_and_leaves_the_steps():
    r = router(100, 100)
    r.add_request("a", 12)
    r.add_request("b", 5)
    r.begin_step()
    r.advance("a")
    r.park("a")
    p = r.begin_step()
    assert p.requests == ("b",) and p.parked == ("a",)
    assert r.is_parked("a") and r.length("a") == 13
    assert p.routes["a"][-1].end == 13  # no slot reserved for a next token
    assert sum(r.node_load(n) for n in r.nodes()) == 13 + 6
    assert all(0 not in w.rows or w.rows == (0,) for w in p.nodes)  # only b has a row
    check_capacity(r)
    assert "parked" in p.table()
    # resumed with 4 new tokens: a span, then a slot for the next token
    r.extend("a", 4)
    p = r.begin_step()
    assert p.requests == ("a", "b") and p.spans == (Span("a", 13, 17),)
    assert p.positions[0] == 17 and p.routes["a"][-1].end == 18
    check_capacity(r)


def test_extend_zero_tokens_resumes_and_extend_an_active_request():
    r = router(100)
    r.add_request("a", 3)
    r.park("a")
    assert r.begin_step().requests == ()
    r.extend("a", 0)
    p = r.begin_step()
    assert p.requests == ("a",) and p.spans == () and p.positions == (3,)
    r.advance("a")
    r.extend("a", 5)  # after the decode token: the span follows it
    p = r.begin_step()
    assert p.spans == (Span("a", 4, 9),) and p.positions == (9,)
    check_capacity(r)


def test_extend_that_does_not_fit_is_refused_whole():
    r = router(16, 16)
    r.add_request("a", 10)
    r.begin_step()
    before = (r.ranges("a"), r.length("a"), [r.node_load(n) for n in r.nodes()])
    r.extend("a", 40)
    with pytest.raises(CapacityError):
        r.begin_step()
    assert (r.ranges("a"), r.length("a"), [r.node_load(n) for n in r.nodes()]) == before
    r.extend("a", 5)  # a smaller one fits
    assert r.begin_step().spans == (Span("a", 10, 15),)


def test_truncate_tells_each_node_how_many_to_keep():
    r = router(100, 100, range_tokens=8)
    r.add_request("a", 20)  # [0, 8) n0, [8, 16) n1, [16, 20) n0 (least loaded alternates)
    p = r.begin_step()
    held = {}
    for t in p.routes["a"]:
        held.setdefault(t.node, []).append(t)
    r.truncate("a", 6)
    p = r.begin_step()
    keep = {node: n for _, node, n in p.truncated}
    assert r.length("a") == 6 and p.positions == (6,)
    assert p.routes["a"][-1].end == 7
    # every node that held tokens past 6 keeps what it held before 6
    for node, ranges in held.items():
        before6 = sum(max(0, min(t.end, 6) - t.start) for t in ranges)
        assert keep.get(node, before6) == before6
        if any(t.end > 6 for t in ranges):
            assert node in keep
    check_capacity(r)
    r.truncate("a", 9)
    with pytest.raises(RouterError, match="truncate request 'a' to 9 tokens: it has 6"):
        r.begin_step()


def test_forget_before_frees_nodes_out_of_every_window():
    r = router(100, 100, 100, range_tokens=8)
    r.add_request("a", 30)
    p = r.begin_step()
    nodes = [t.node for t in p.routes["a"]]
    assert nodes[:3] == ["n0", "n1", "n2"] and nodes[3] == "n0"  # [24, 31) back on n0
    r.forget_before("a", 17)
    p = r.begin_step()
    # [0, 8) stays: n0 holds [24, 31) too; nothing after it is freed either
    assert p.freed == () and r.ranges("a")[0].start == 0
    r = router(100, 100, 100, 100, range_tokens=8)
    r.add_request("b", 30)
    assert [t.node for t in r.begin_step().routes["b"]] == ["n0", "n1", "n2", "n3"]
    r.forget_before("b", 17)
    p = r.begin_step()
    assert p.freed == (("b", "n0"), ("b", "n1"))
    assert r.node_load("n0") == r.node_load("n1") == 0
    assert r.ranges("b")[0].start == 16 and r.length("b") == 30
    check_capacity(r)
    r.truncate("b", r.ranges("b")[0].start - 1)
    with pytest.raises(RouterError, match="forgotten"):
        r.begin_step()


def test_a_lost_node_restores_parked_requests_too():
    r = router(100, 100, range_tokens=8)
    r.add_request("a", 20)
    r.begin_step()
    r.park("a")
    r.begin_step()
    r.lose_node("n1")
    p = r.begin_step()
    assert p.requests == () and {x.request for x in p.restores} == {"a"}
    assert all(t.node == "n0" for t in p.routes["a"])
    check_capacity(r)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["step", "park", "extend", "truncate", "forget"]),
                          st.integers(0, 40)), max_size=30))
def test_any_sequence_of_turn_edits_keeps_capacity_exact(ops):
    r = router(64, 64, 64, range_tokens=8)
    r.add_request("a", 10)
    r.add_request("b", 3)
    r.begin_step()
    for op, n in ops:
        if op == "step":
            for rid in r.last_plan.requests:
                r.advance(rid)
        elif op == "park":
            r.park("a")
        elif op == "extend":
            r.extend("a", n)
        elif op == "truncate":
            r.truncate("a", min(n, r.length("a")))
        else:
            r.forget_before("a", min(n, r.length("a")))
        try:
            p = r.begin_step()
        except RouterError:
            continue  # refused whole (no room, or before forgotten tokens): state unchanged
        check_capacity(r)
        for rid, pos in zip(p.requests, p.positions):
            assert p.routes[rid][-1].end == pos + 1
        if r.is_parked("a"):
            routes = p.routes["a"]
            assert "a" not in p.requests
            assert not routes or routes[-1].end == r.length("a")  # none: all forgotten
