"""A node acknowledges an append once its kernel is queued, without its host waiting for
the GPU work queued before it (GPU machine), and the KV lands in stream order.

The weight node waits for that acknowledgement at the end of each step, while the node
may still be running another micro-batch's attention: an acknowledgement (or a page
table upload from pageable memory, which waits for every kernel queued before it) that
waited for the GPU would put that attention on the step's critical path.
"""

from __future__ import annotations

import pytest
import torch

from kflume.comm import InProcHub, InProcTransport
from kflume.node import AttentionNode, NodeConfig, NodeServer
from kflume.testing import ReferenceKV, assert_close_rel
from kflume.weight.client import NodeClient

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


def test_append_is_acknowledged_while_earlier_gpu_work_runs():
    hub = InProcHub()
    transport = InProcTransport(hub)
    node = AttentionNode(NodeConfig(layers=2, kv_heads=2, head_dim=64, capacity_tokens=2048,
                                    dtype="float32", device="cuda", q_heads=4))
    server = NodeServer(node, transport, transport.listen("n"))
    hub.add_driver(server.poll)
    client = NodeClient.connect("n", transport, "n")
    g = torch.Generator().manual_seed(0)
    ref = ReferenceKV(2)
    rids = ["a", "b"]
    node.warmup()  # the kernels' first launch (compile, load) takes longer than the sleep
    torch.cuda.synchronize()
    for step, t in enumerate((7, 1, 1)):  # a prompt, then decode steps (new offsets)
        k = torch.randn(2, 2, t, 2, 64, generator=g)
        v = torch.randn(2, 2, t, 2, 64, generator=g)
        kd, vd = k.cuda(), v.cuda()  # (uploaded before the GPU is kept busy)
        off = [0, 0] if step == 0 else [6 + step] * 2
        torch.cuda.synchronize()
        torch.cuda._sleep(400_000_000)  # another micro-batch's attention, say: ~0.2 s
        busy = torch.cuda.Event()
        busy.record()
        client.append(0, rids, off, off, kd, vd).result()
        assert not busy.query(), f"step {step}: the ack waited for earlier GPU work"
        for i, rid in enumerate(rids):
            for layer in range(2):
                ref.extend(layer, rid, k[i, layer], v[i, layer])
    q = torch.randn(2, 4, 64, generator=g)
    for layer in range(2):  # queued behind the appends on the node's stream
        out, _ = node.attend(layer, server.peers[0].scope(rids), [9, 9], q.cuda())
        assert_close_rel(out.cpu(), ref.attend(layer, rids, q, 64**-0.5), torch.float32,
                         f"layer {layer}")
