"""NodeProcess readiness as a warm pool sees it: a node that listened long before it is
asked counts as ready, whatever its start deadline; one that exits first is reported."""

from __future__ import annotations

import select
import time

import pytest

pytest.importorskip("ucxx", reason="a node process listens over UCX (the ucx extra)")

from kflume.config import NodeConfig  # noqa: E402
from kflume.node.process import NodeProcess  # noqa: E402

CONFIG = NodeConfig(layers=1, kv_heads=1, head_dim=16, capacity_tokens=64, dtype="float32")


@pytest.mark.timeout(120)
def test_output_written_before_the_deadline_counts_after_it():
    p = NodeProcess(CONFIG, token="t", wait=False, timeout=60.0)
    try:
        r, _, _ = select.select([p.proc.stdout], [], [], 60.0)  # it printed its address
        assert r, "the node did not listen within 60 s"
        time.sleep(0.2)
        p.timeout = 0.0  # asked only now, past its deadline
        assert p.ready() and p.address.startswith("127.0.0.1:")
    finally:
        assert p.stop() == 0


@pytest.mark.timeout(120)
def test_a_node_that_exits_before_listening_is_reported():
    p = NodeProcess(CONFIG, token="t", wait=False, listen="127.0.0.1:99999")  # no such port
    deadline = time.monotonic() + 60
    with pytest.raises(RuntimeError, match="exited with 1 before listening"):
        while not p.ready():
            assert time.monotonic() < deadline, "the node neither listened nor exited"
            time.sleep(0.05)
