"""A node that stops answering with its socket open (a hung process, or a partition that
keeps the connection) is lost at the cluster's reply deadline: the step goes on, its
spans recomputed on the others, and its process killed. A short deadline (to find such
a node fast) still gives a node's process the time it needs to start."""

from __future__ import annotations

import os
import signal
import time

import pytest

from .test_leave import local
from .test_recovery import Loop, holders

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
