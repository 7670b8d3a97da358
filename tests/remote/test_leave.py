"""A node told to leave (SIGTERM to `kflume node`) drains: its replies say it is leaving,
its cluster migrates its ranges at the next boundaries and removes it, nothing is
recomputed, and the process exits by itself once it holds nothing (and, empty, takes
the tokens already on their way to it)."""

from __future__ import annotations

import subprocess
import time

import pytest

from kflume import Cluster

from .test_recovery import HKV, HQ, LAYERS, D, Loop, holders


def local(n=3, cap=1024, **kw):
    return Cluster.local(n, layers=LAYERS, kv_heads=HKV, head_dim=D, q_heads=HQ,
                         capacity_tokens=cap, range_tokens=8, page_size=4, **kw)


def test_sigterm_drains_the_node_and_its_ranges_move_without_recompute():
    cl = local()
    try:
        loop = Loop(cl, {"a": 30, "b": 13, "c": 21})
        loop.step()
        victim = "node1"
        assert any(victim in holders(cl, r) for r in "abc")
        proc = cl.processes[victim]
        proc.leave()
        deadline = time.monotonic() + 30
        while victim in cl.clients:
            assert time.monotonic() < deadline, "the leaving node was never removed"
            loop.step()  # every step's output checked against float64 attention
        for _ in range(2):
            loop.step()
        assert not loop.recomputed and not cl.recovery.lost
        assert victim not in cl.router.nodes()
        assert all(victim not in holders(cl, r) for r in "abc")
        assert proc.proc.wait(10) == 0  # exited cleanly, by itself or stopped
    finally:
        cl.close()


def test_a_node_that_leaves_while_its_cluster_is_idle_exits_at_its_deadline():
    # no boundary comes before the deadline (the weight node waits on a tool call):
    # the node exits holding its ranges, and the next boundary recomputes them
    cl = local(env={"KFLUME_DRAIN_DEADLINE": "0.5"})
    try:
        loop = Loop(cl, {"a": 30, "b": 13, "c": 21})
        loop.step()
        victim = "node1"
        assert any(victim in holders(cl, r) for r in "abc")
        proc = cl.processes[victim]
        proc.leave()
        assert proc.proc.wait(10) == 0
        for _ in range(3):
            loop.step()
        assert victim in cl.recovery.lost and loop.recomputed
        assert all(victim not in holders(cl, r) for r in "abc")
    finally:
        cl.close()


def test_a_node_told_to_leave_while_empty_takes_the_tokens_already_on_their_way():
    # SIGTERM reaches a node holding nothing just before its cluster places new tokens
    # on it: it stays for them (and for its clusters to learn that it leaves), then they
    # move off like any others; nothing is lost or recomputed
    cl = local()
    try:
        proc = cl.processes["node1"]
        proc.leave()
        with pytest.raises(subprocess.TimeoutExpired):
            proc.proc.wait(0.5)  # not gone at once
        loop = Loop(cl, {"a": 30, "b": 13, "c": 21})  # prompts placed on it too
        assert any("node1" in holders(cl, r) for r in "abc")
        deadline = time.monotonic() + 30
        while "node1" in cl.clients:
            assert time.monotonic() < deadline, "the leaving node was never removed"
            loop.step()
        assert not loop.recomputed and not cl.recovery.lost
        assert proc.proc.wait(10) == 0
    finally:
        cl.close()
