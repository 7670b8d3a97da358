"""Replicas in the router (kflume/replicas.py): every token on two nodes, the second copy
promoted when its primary goes, and a second copy made again where there is room.

`Nodes` plays the attention nodes: it carries out each plan as the weight node does
(frees, truncations, migrations, prompts, spans, restores, the step's appends) on sets
of positions, so the tests check what each node would hold, not only the router's books.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kflume.router import CapacityError, FillThenLeastLoaded, RouterError, TokenRangeRouter


def router(n: int, cap: int = 256, range_tokens: int = 8, page: int = 4) -> TokenRangeRouter:
    r = TokenRangeRouter(FillThenLeastLoaded(range_tokens=range_tokens), replicas=2)
    for i in range(n):
        r.add_node(f"n{i}", cap, page)
    return r


class Nodes:
    """What each node holds of each request: its positions in node-local order."""

    def __init__(self) -> None:
        self.kv: dict[str, dict] = {}
        self.restored: list = []

    def _take(self, node, rid, positions) -> None:
        held = self.kv.setdefault(node, {}).setdefault(rid, [])
        assert not set(held) & set(positions), f"{node} holds {rid} {positions} twice"
        held += positions
        held.sort()

    def write(self, plan, rid, start, end) -> None:
        """A prompt, span or restore: to every range (and copy) the plan names."""
        for r in plan.routes[rid] + plan.replicas.get(rid, ()):
            a, b = max(r.start, start), min(r.end, end)
            if a < b:
                self._take(r.node, rid, list(range(a, b)))

    def boundary(self, plan, lengths: dict) -> None:
        for node in plan.lost_nodes:
            self.kv.pop(node, None)
        sources = {(m.request, m.src) for m in plan.migrations}
        for rid, node in plan.freed:
            if (rid, node) not in sources:
                self.kv.get(node, {}).pop(rid, None)
        for rid, node, keep in plan.truncated:
            held = self.kv.get(node, {}).get(rid, [])
            del held[keep:]
        for m in plan.migrations:
            held = self.kv[m.src][m.request]
            want = list(range(m.start, m.end))
            assert set(want) <= set(held), f"{m}: {m.src} lacks some of them"
            self._take(m.dst, m.request, want)
        for rid, node in plan.freed:
            if (rid, node) in sources:
                self.kv[node].pop(rid)
        for node in plan.removed_nodes:
            self.kv.pop(node, None)
        for rid in plan.prefill:
            self.write(plan, rid, 0, lengths[rid])
        for s in plan.spans:
            self.write(plan, s.request, s.start, s.end)
        for r in plan.restores:
            self.restored.append(r)
            self.write(plan, r.request, r.start, r.end)

    def step(self, plan) -> None:
        """Check what the plan attends over, then append the step's tokens."""
        seen = {rid: [] for rid in plan.requests}
        for w in plan.nodes:
            for row, n in zip(w.rows, w.kv_len):
                rid = plan.requests[row]
                seen[rid] += self.kv[w.node][rid][:n]
        for rid, p in zip(plan.requests, plan.positions):
            first = plan.routes[rid][0].start
            assert sorted(seen[rid]) == list(range(first, p)), f"{rid} attends {seen[rid]}"
        for w in plan.nodes:
            for row, off in zip(w.append_rows, w.append_offsets):
                rid = plan.requests[row]
                held = self.kv.setdefault(w.node, {}).setdefault(rid, [])
                assert len(held) == off, f"{w.node} appends {rid} at {off}, holds {held}"
                held.append(plan.positions[row])


def check(r: TokenRangeRouter, nodes: Nodes | None = None) -> None:
    """The router's books: pairs, mirrored counts, capacity in pages; and, with `nodes`,
    that each node holds exactly what the router says (written tokens)."""
    used = dict.fromkeys(r.nodes(), 0)
    for rid in r.requests():
        req = r._requests[rid]
        primaries = {x.node for x in req.ranges}
        assert set(req.pairs) == primaries
        mates = [m for m in req.pairs.values() if m is not None]
        assert len(set(mates)) == len(mates) and not set(mates) & primaries
        for p, m in req.pairs.items():
            n = sum(len(x) for x in req.ranges if x.node == p)
            assert req.held[p] == n and (m is None or req.held[m] == n)
        assert set(req.held) == primaries | set(mates)
        for node, n in req.held.items():
            ps = r._nodes[node].page_size
            used[node] += -(-n // ps) * ps
        if nodes is not None:
            for x in r.ranges(rid) + r.replica_ranges(rid):
                got = [p for p in nodes.kv.get(x.node, {}).get(rid, []) if x.start <= p < x.end]
                want = list(range(x.start, min(x.end, r.length(rid))))
                assert got == want, f"{x} of {rid}: node holds {got}"
    assert used == {n: r.node_load(n) for n in r.nodes()}


def run(r: TokenRangeRouter, nodes: Nodes, steps: int = 1):
    plan = None
    for _ in range(steps):
        plan = r.begin_step()
        nodes.boundary(plan, {rid: r.length(rid) for rid in r.requests()})
        check(r, nodes)
        nodes.step(plan)
        for rid in plan.requests:
            r.advance(rid)
    return plan


def test_every_token_is_on_two_nodes_and_only_the_primary_attends():
    r, nodes = router(4), Nodes()
    r.add_request("a", 30)
    r.add_request("b", 10)
    plan = run(r, nodes, 3)
    for rid in "ab":
        copies = r.replica_ranges(rid)
        assert [(x.start, x.end) for x in copies] == [(x.start, x.end) for x in r.ranges(rid)]
        assert all(c.node != x.node for c, x in zip(copies, r.ranges(rid)))
    replicas = {c.node for rid in "ab" for c in r.replica_ranges(rid)}
    assert all(not w.rows for w in plan.nodes if w.node in replicas)
    st = r.replica_stats()
    assert st.copies == 2 and st.tokens_held == 2 * (33 + 13)
    assert st.unreplicated_tokens == 0 and "copies" in plan.table()


def test_a_lost_primary_is_promoted_and_copied_again_without_recompute():
    r, nodes = router(3), Nodes()
    r.add_request("a", 20)
    run(r, nodes, 2)
    primary, mate = r.ranges("a")[0].node, r.replica_ranges("a")[0].node
    r.lose_node(primary)
    plan = r.begin_step()
    assert not plan.restores and plan.lost_nodes == (primary,)
    assert {x.node for x in r.ranges("a")} == {mate}  # promoted: nothing moved
    (third,) = set(r.nodes()) - {mate}
    assert {m.dst for m in plan.migrations} == {third} and not plan.unreplicated
    nodes.boundary(plan, {"a": r.length("a")})
    check(r, nodes)
    assert r.replica_stats().promoted_tokens == 22


def test_with_no_room_for_a_second_copy_decoding_goes_on_with_one():
    r, nodes = router(2), Nodes()
    r.add_request("a", 12)
    run(r, nodes, 1)
    r.lose_node("n1")
    plan = run(r, nodes, 1)
    assert plan.unreplicated == ("a",) and not plan.restores
    st = r.replica_stats()
    assert st.unreplicated_requests == 1 and st.unreplicated_tokens == 14
    plan = run(r, nodes, 2)
    assert plan.unreplicated == ()  # named once
    r.add_node("n2", 256, 4)  # room again: copied at the next boundary
    plan = run(r, nodes, 1)
    assert {(m.src, m.dst) for m in plan.migrations} == {("n0", "n2")}
    assert r.replica_stats().unreplicated_tokens == 0


def test_both_copies_lost_are_recomputed():
    r, nodes = router(4), Nodes()
    r.add_request("a", 30)
    run(r, nodes, 1)
    x = r.ranges("a")[0]
    r.lose_node(x.node)
    r.lose_node(r.replica_ranges("a")[0].node)
    plan = r.begin_step()
    assert plan.restores and all(s.request == "a" for s in plan.restores)
    nodes.boundary(plan, {"a": r.length("a")})
    check(r, nodes)


def test_removing_a_node_promotes_its_replicas_and_moves_nothing_it_need_not():
    r, nodes = router(4), Nodes()
    r.add_request("a", 30)
    r.add_request("b", 17)
    run(r, nodes, 2)
    r.remove_node("n0")
    plan = run(r, nodes, 2)
    assert "n0" not in r.nodes() and not plan.restores


def test_a_request_spread_over_two_pairs_is_merged_into_one_when_three_nodes_remain():
    r, nodes = router(4), Nodes()
    r.add_request("a", 30)
    run(r, nodes, 1)
    assert len(r._requests["a"].pairs) == 2
    r.lose_node(r.ranges("a")[0].node)
    run(r, nodes, 2)
    assert r.replica_stats().unreplicated_tokens == 0


def test_replicas_must_be_one_or_two():
    with pytest.raises(ValueError, match="replicas must be 1 or 2"):
        TokenRangeRouter(replicas=3)


def test_capacity_counts_both_copies():
    r = router(2, cap=32)
    r.add_request("a", 30)
    r.begin_step()
    assert r.free_tokens("n0") == r.free_tokens("n1") == 0
    r.add_request("b", 4)
    with pytest.raises(CapacityError):
        r.begin_step()


OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40)),
    st.tuples(st.just("finish"), st.integers(0, 9)),
    st.tuples(st.just("lose"), st.integers(0, 9)),
    st.tuples(st.just("remove"), st.integers(0, 9)),
    st.tuples(st.just("node"), st.integers(32, 200)),
    st.tuples(st.just("truncate"), st.integers(0, 9), st.integers(0, 40)),
    st.tuples(st.just("park"), st.integers(0, 9)),
    st.tuples(st.just("extend"), st.integers(0, 9), st.integers(0, 12)),
    st.tuples(st.just("forget"), st.integers(0, 9), st.integers(0, 40)),
    st.tuples(st.just("step"), st.integers(1, 3)),
), max_size=30)


@settings(max_examples=300, deadline=None)
@given(OPS, st.integers(1, 12), st.sampled_from([1, 4]))
def test_any_sequence_of_edits_keeps_every_node_holding_what_the_router_says(ops, rt, page):
    r, nodes = router(4, cap=160, range_tokens=rt, page=page), Nodes()
    count = [4, 0]  # nodes, requests made
    for op in ops:
        rids, names = r.requests(), r.nodes()
        try:
            if op[0] == "add":
                r.add_request(count[1], op[1])
                count[1] += 1
            elif op[0] == "finish" and rids:
                r.finish_request(rids[op[1] % len(rids)])
            elif op[0] in ("lose", "remove") and len(names) > 1:
                name = names[op[1] % len(names)]
                if op[0] == "lose":
                    r.lose_node(name)
                elif r.can_remove(name):
                    r.remove_node(name)
            elif op[0] == "node":
                r.add_node(f"n{count[0]}", op[1], page)
                count[0] += 1
            elif op[0] == "truncate" and rids:
                rid = rids[op[1] % len(rids)]
                r.truncate(rid, min(op[2], r.length(rid)))
            elif op[0] == "park" and rids:
                r.park(rids[op[1] % len(rids)])
            elif op[0] == "extend" and rids:
                r.extend(rids[op[1] % len(rids)], op[2])
            elif op[0] == "forget" and rids:
                r.forget_before(rids[op[1] % len(rids)], op[2])
            if op[0] == "step":
                run(r, nodes, op[1])
            else:
                plan = r.begin_step()
                nodes.boundary(plan, {rid: r.length(rid) for rid in r.requests()})
                check(r, nodes)
                nodes.step(plan)
                for rid in plan.requests:
                    r.advance(rid)
        except RouterError:  # a refused edit (no room, a bad truncation): books still exact
            check(r)
            return
