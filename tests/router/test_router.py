"""TokenRangeRouter: ranges cover each request, edits wait for the boundary, plans add up."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kflume.router import (
    CapacityError,
    FillThenLeastLoaded,
    RouterError,
    TokenRange,
    TokenRangeRouter,
)


def check_invariants(router: TokenRangeRouter, plan) -> None:
    """Ranges tile [0, length + 1); per-node history counts in the plan add up."""
    held = {n: 0 for n in router.nodes()}
    for row, rid in enumerate(plan.requests):
        ranges = plan.routes[rid]
        assert ranges[0].start == 0
        for a, b in zip(ranges, ranges[1:]):
            assert a.end == b.start and len(a) > 0
        pos = plan.positions[row]
        assert ranges[-1].end == pos + 1  # history plus this step's reserved slot
        history = sum(
            n for w in plan.nodes for r, n in zip(w.rows, w.kv_len) if r == row
        )
        assert history == pos
        tails = [w.node for w in plan.nodes if row in w.append_rows]
        assert tails == [ranges[-1].node]
        for r in ranges:
            held[r.node] += len(r)
    for node, n in held.items():
        assert router.node_load(node) == n
        assert router.free_tokens(node) >= 0


def test_edits_wait_for_the_boundary():
    r = TokenRangeRouter()
    r.add_node("a", 1000)
    r.add_request("x", 10)
    assert r.requests() == () and r.nodes() == ()  # nothing applied yet
    p1 = r.begin_step()
    assert p1.epoch == 1 and p1.requests == ("x",) and p1.prefill == ("x",)
    r.advance("x")
    r.add_node("b", 1000)
    assert r.length("x") == 10 and r.nodes() == ("a",)
    p2 = r.begin_step()
    assert p2.epoch == 2 and r.length("x") == 11 and r.nodes() == ("a", "b")
    assert p2.prefill == ()
    # Plans are immutable snapshots: the earlier one did not change.
    assert p1.positions == (10,) and p2.positions == (11,)
    with pytest.raises(AttributeError):
        p2.epoch = 5


def test_fill_then_least_loaded():
    r = TokenRangeRouter(FillThenLeastLoaded(range_tokens=8))
    r.add_node("a", 100)
    r.add_node("b", 50)
    r.add_request(1, 20)
    p = r.begin_step()
    # Ranges of at most 8 tokens, each opened on the node with the most free tokens:
    # a (100 free), a (92), a (84) -- b has only 50.
    assert p.routes[1] == (
        TokenRange(0, 8, "a"), TokenRange(8, 16, "a"), TokenRange(16, 21, "a"),
    )
    check_invariants(r, p)
    for _ in range(40):
        for rid in p.requests:
            r.advance(rid)
        p = r.begin_step()
        check_invariants(r, p)
    assert all(len(x) <= 8 for x in p.routes[1])
    # a takes ranges while it has more free tokens than b: 7 ranges (56), then b.
    assert r.length(1) == 60 and r.node_load("a") == 56 and r.node_load("b") == 5


def test_tail_moves_off_a_draining_node():
    r = TokenRangeRouter(FillThenLeastLoaded(range_tokens=1000))
    r.add_node("a", 1000)
    r.add_request(1, 5)
    p = r.begin_step()
    r.advance(1)
    r.add_node("b", 1000)
    r.drain_node("a")
    p = r.begin_step()
    assert [x.node for x in p.routes[1]] == ["a", "b"]
    assert p.routes[1][0] == TokenRange(0, 6, "a")  # the token appended on a stays on a
    assert p.node_work("b").append_rows == (0,) and p.node_work("b").append_offsets == (0,)
    check_invariants(r, p)


def test_remove_node_migrates_its_ranges():
    r = TokenRangeRouter(FillThenLeastLoaded(range_tokens=4))
    for n in ("a", "b", "c"):
        r.add_node(n, 100)
    r.add_request(1, 30)
    r.add_request(2, 7)
    p = r.begin_step()
    held_by_a = [x for rid in p.requests for x in p.routes[rid] if x.node == "a"]
    assert held_by_a
    for rid in p.requests:
        r.advance(rid)
    r.remove_node("a")
    p = r.begin_step()
    assert "a" not in r.nodes() and p.removed_nodes == ("a",)
    assert all(x.node != "a" for rid in p.requests for x in p.routes[rid])
    moved = sorted((m.request, m.start, m.end) for m in p.migrations)
    assert moved and all(m.src == "a" and m.dst in ("b", "c") for m in p.migrations)
    # Every token a held (including the one appended last step) is migrated.
    assert sum(m.end - m.start for m in p.migrations) == sum(len(x) for x in held_by_a)
    check_invariants(r, p)


@pytest.mark.parametrize("edit", ["lose_node", "remove_node", "drain_node"])
def test_new_tokens_never_land_on_a_node_leaving_at_the_same_boundary(edit):
    r = TokenRangeRouter(FillThenLeastLoaded(range_tokens=4))
    for n in ("a", "b", "c"):
        r.add_node(n, 100)
    r.add_request(1, 12)
    p = r.begin_step()
    r.advance(1)
    r.add_request(2, 30)  # queued before the node edit (a cluster finds a node gone at
    r.park(2)  # its boundary), and an edit of that new request after it
    getattr(r, edit)("a")
    p = r.begin_step()
    assert all(x.node != "a" for x in r.ranges(2)) and r.is_parked(2)
    assert all(x.request == 1 for x in p.restores + p.migrations)  # 2 has no KV yet


def test_finish_frees_capacity():
    r = TokenRangeRouter()
    r.add_node("a", 50)
    r.add_request(1, 40)
    r.begin_step()
    assert r.free_tokens("a") == 9
    r.finish_request(1)
    p = r.begin_step()
    assert p.freed == ((1, "a"),) and r.free_tokens("a") == 50 and p.requests == ()


def test_capacity_error_and_bad_edits():
    r = TokenRangeRouter()
    r.add_node("a", 10)
    r.add_request(1, 20)
    with pytest.raises(CapacityError, match="no attention node has room for request 1"):
        r.begin_step()
    r = TokenRangeRouter()
    r.add_node("a", 10)
    r.add_node("a", 10)
    with pytest.raises(RouterError, match="already in the routing table"):
        r.begin_step()
    with pytest.raises(RouterError, match="unknown request 7"):
        r.finish_request(7)
        r.begin_step()
    with pytest.raises(RouterError, match="unknown node 'z'"):
        r.drain_node("z")
        r.begin_step()
    with pytest.raises(ValueError, match="capacity_tokens must be >= page_size >= 1"):
        r.add_node("q", 0)
    with pytest.raises(ValueError, match="range_tokens"):
        FillThenLeastLoaded(range_tokens=0)


def test_capacity_counts_whole_pages_per_request():
    """A node stores each request's tokens in whole pages: six requests of 5 tokens take
    six pages of 16, not 30 tokens' worth; the router never overfills the node."""
    r = TokenRangeRouter(FillThenLeastLoaded(range_tokens=1000))
    r.add_node("a", 100, page_size=16)  # 6 pages (96 tokens)
    for i in range(6):
        r.add_request(i, 5)
    r.begin_step()  # each request reserved its next token: 6 tokens per request
    assert r.node_load("a") == 96 and r.free_tokens("a") == 0
    assert r.room("a", 0) == 10  # the rest of request 0's page
    for _ in range(10):
        for i in range(6):
            r.advance(i)
        r.begin_step()  # every request fills its own page
    for i in range(6):
        r.advance(i)
    r.add_node("b", 96, page_size=16)
    plan = r.begin_step()  # pages are full: the next tokens open ranges on b
    assert {x.node for x in plan.routes[0]} == {"a", "b"}
    assert r.node_load("a") == 96
    r.finish_request(0)
    r.begin_step()
    assert r.node_load("a") == 80


def test_failed_edit_keeps_later_edits_queued():
    r = TokenRangeRouter()
    r.add_node("a", 100)
    r.finish_request("ghost")
    r.add_request(1, 5)
    with pytest.raises(RouterError, match="ghost"):
        r.begin_step()
    p = r.begin_step()
    assert p.requests == (1,)


def test_table_lists_every_range():
    r = TokenRangeRouter(FillThenLeastLoaded(range_tokens=3))
    r.add_node("a", 100)
    r.add_node("b", 100)
    r.add_request("req", 5)
    text = r.begin_step().table()
    assert "request    req (5 tokens): [0, 3) -> a  [3, 6) -> b" in text


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add_req", "finish", "add_node", "drain",
                                           "remove", "step"]),
                          st.integers(0, 5), st.integers(0, 40)), max_size=60),
       st.integers(1, 16))
def test_random_edit_sequences_keep_invariants(ops, range_tokens):
    r = TokenRangeRouter(FillThenLeastLoaded(range_tokens=range_tokens))
    r.add_node("n0", 400)
    next_node = 1
    plan = r.begin_step()
    for op, i, n in ops:
        try:
            if op == "add_req" and i not in plan.requests:
                r.add_request(i, n)
            elif op == "finish" and i in plan.requests:
                r.finish_request(i)
            elif op == "add_node":
                r.add_node(f"n{next_node}", 100 + n * 10)
                next_node += 1
            elif op == "drain" and r.nodes():
                r.drain_node(r.nodes()[i % len(r.nodes())])
            elif op == "remove" and len(r.nodes()) > 1:
                r.remove_node(r.nodes()[i % len(r.nodes())])
            for rid in plan.requests:
                if rid in r.requests():
                    r.advance(rid)
            plan = r.begin_step()
        except CapacityError:
            r = None
            break
        check_invariants(r, plan)
