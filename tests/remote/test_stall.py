"""Short reply deadlines: a cluster that gives every reply little time (to find a hung
node fast) still gives a node's process the time it needs to start."""

from __future__ import annotations

import pytest

from .test_leave import local

pytest.importorskip("ucxx", reason="node processes talk UCX")


def test_a_reply_deadline_shorter_than_a_node_start_still_starts_nodes():
    # a process start (interpreter, torch, the pools) takes seconds; a reply, milliseconds
    cl = local(2, timeout=0.5)
    try:
        assert set(cl.clients) == {"node0", "node1"}
        cl.add_node(wait=True)
        assert len(cl.clients) == 3
    finally:
        cl.close()
