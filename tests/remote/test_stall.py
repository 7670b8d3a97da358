"""Nodes lost at awkward moments. One that stops answering with its socket open (a hung
process, or a partition that keeps the connection) is lost at the cluster's reply
deadline: the step goes on, its spans recomputed on the others, its process killed. One
lost while its ranges are moved off has what it did not export recomputed. One that died
while its cluster was idle gets no new tokens. A short reply deadline (to find a hung
node fast) still gives a node's process the time it needs to start."""

from __future__ import annotations

import os
import signal
import time

import pytest

from kflume import Cluster, NodeConfig
from kflume.node.process import NodeProcess
from kflume.weight.recovery import RequestsLost

from .test_leave import local
from .test_recovery import HKV, HQ, LAYERS, D, Loop, holders

pytest.importorskip("ucxx", reason="node processes talk UCX")

DEADLINE = 1.0


def test_a_reply_deadline_shorter_than_a_node_start_still_starts_nodes():
    # a process start (interpreter, torch, the pools) takes seconds; a reply, milliseconds
    cl = local(2, timeout=0.5)
    try:
        assert set(cl.clients) == {"node0", "node1"}
        cl.add_node(wait=True)
        assert len(cl.clients) == 3
    finally:
        cl.close()


def test_a_node_that_stops_answering_is_lost_at_the_deadline_and_the_step_goes_on():
    cl = local(timeout=DEADLINE)
    proc = cl.processes["node1"]
    try:
        loop = Loop(cl, {"a": 30, "b": 13, "c": 21})
        loop.step()
        assert any("node1" in holders(cl, r) for r in "abc")
        os.kill(proc.pid, signal.SIGSTOP)  # hung, its socket open: no link breaks
        t0 = time.monotonic()
        loop.step()  # every layer's output checked against float64 attention
        took = time.monotonic() - t0
        assert cl.recovery.lost == {"node1": "no answer within the deadline"}
        # the hung process is killed, not asked to stop (it cannot: the step would wait)
        assert not proc.running and took < DEADLINE + 5, f"the step took {took:.1f} s"
        assert loop.recomputed and all("node1" not in holders(cl, r) for r in "abc")
        for _ in range(2):
            loop.step()
    finally:
        if proc.running:
            os.kill(proc.pid, signal.SIGKILL)
        cl.close()


def test_a_leaving_node_that_hangs_while_its_ranges_move_off_has_them_recomputed():
    cl = local(timeout=DEADLINE)
    proc = cl.processes["node1"]
    try:
        loop = Loop(cl, {"a": 30, "b": 13, "c": 21})
        loop.step()
        assert any("node1" in holders(cl, r) for r in "abc")
        proc.leave()
        loop.step()  # its replies say it is leaving: the next boundary moves its ranges
        os.kill(proc.pid, signal.SIGSTOP)  # ... and their export gets no answer
        loop.step()
        assert "node1" in cl.recovery.lost and "node1" not in cl.clients
        assert loop.recomputed and not proc.running
        assert all("node1" not in holders(cl, r) for r in "abc")
        for _ in range(2):
            loop.step()
    finally:
        if proc.running:
            os.kill(proc.pid, signal.SIGKILL)
        cl.close()


def started_apart(n: int) -> tuple[list[NodeProcess], Cluster]:
    """`n` nodes started apart from the cluster (`Cluster.connect`): only a node's link
    tells the cluster that it died, read when the transport is driven."""
    config = NodeConfig(layers=LAYERS, kv_heads=HKV, head_dim=D, capacity_tokens=1024,
                        dtype="float32", page_size=4, q_heads=HQ)
    procs = [NodeProcess(config, token="t", wait=False) for _ in range(n)]
    try:
        return procs, Cluster.connect({f"n{i}": p.wait_ready() for i, p in enumerate(procs)},
                                      layers=LAYERS, kv_heads=HKV, head_dim=D, q_heads=HQ,
                                      token="t", range_tokens=8)
    except BaseException:
        for p in procs:
            p.stop()
        raise


def test_a_node_that_dies_while_its_ranges_move_off_has_them_recomputed():
    procs, cl = started_apart(3)  # the death is found in the export's wait
    try:
        loop = Loop(cl, {"a": 30, "b": 13, "c": 21})
        loop.step()
        assert any("n1" in holders(cl, r) for r in "abc")
        procs[1].leave()
        loop.step()  # its replies say it is leaving: the next boundary moves its ranges
        procs[1].kill()  # ... from a node that is gone
        loop.step()
        assert "n1" in cl.recovery.lost and "n1" not in cl.clients and loop.recomputed
        assert all("n1" not in holders(cl, r) for r in "abc")
        for _ in range(2):
            loop.step()
    finally:
        cl.close()
        for p in procs:
            p.stop()


def test_a_request_cut_by_a_window_that_loses_a_range_in_a_move_is_named_and_dropped():
    cl = local(timeout=DEADLINE)
    proc = cl.processes["node0"]
    try:
        loop = Loop(cl, {"a": 30, "w": 21, "c": 13})
        loop.step()
        assert any(r.node == "node0" and r.end > 8 for r in cl.router.ranges("w"))
        proc.leave()
        loop.step()  # its replies say it is leaving: the next boundary moves its ranges
        cl.router.forget_before("w", 8)  # a sliding window passed w's first 8 tokens
        os.kill(proc.pid, signal.SIGSTOP)
        with pytest.raises(RequestsLost, match=r"requests \['w'\] could not be restored"):
            cl.begin_step()
        assert "w" not in cl.router.requests() and "node0" in cl.recovery.lost
        loop.ref.forget("w")
        for _ in range(2):  # the others go on, checked against float64 attention
            loop.step()
        assert loop.recomputed and all("node0" not in holders(cl, r) for r in "ac")
    finally:
        if proc.running:
            os.kill(proc.pid, signal.SIGKILL)
        cl.close()


def test_a_node_that_died_while_its_cluster_was_idle_is_given_no_new_tokens():
    procs, cl = started_apart(2)
    try:
        procs[1].kill()  # nothing on it yet; the cluster does not drive its transport
        time.sleep(0.1)
        loop = Loop(cl, {"a": 30, "b": 13})  # a boundary places the prompts
        for _ in range(2):
            loop.step()
        assert cl.recovery.lost.keys() == {"n1"} and not loop.recomputed
    finally:
        cl.close()
        for p in procs:
            p.stop()
