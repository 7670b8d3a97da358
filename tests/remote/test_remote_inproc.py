"""RemoteAttention over the in-process transport equals local attention over the whole KV."""

from __future__ import annotations

import pytest
import torch

from kflume.comm import InProcHub, InProcTransport, RemoteError
from kflume.node import AttentionNode, NodeConfig, NodeServer
from kflume.weight.client import NodeClient

from .scenario import Scenario


class LocalCluster:
    """n AttentionNodes served over one in-process hub, and a client to each."""

    def __init__(self, names, *, layers=2, hkv=2, d=64, dtype="float32", capacity=4096,
                 page_size=16):
        self.hub = InProcHub()
        self.transport = InProcTransport(self.hub)
        self.clients, self.nodes, self.servers = {}, {}, {}
        for name in names:
            self.add(name, layers=layers, hkv=hkv, d=d, dtype=dtype, capacity=capacity,
                     page_size=page_size)

    def add(self, name, *, layers=2, hkv=2, d=64, dtype="float32", capacity=4096, page_size=16):
        node = AttentionNode(NodeConfig(layers=layers, kv_heads=hkv, head_dim=d,
                                        capacity_tokens=capacity, dtype=dtype,
                                        page_size=page_size))
        server = NodeServer(node, self.transport, self.transport.listen(name))
        self.hub.add_driver(server.poll)
        self.nodes[name], self.servers[name] = node, server
        self.clients[name] = NodeClient.connect(name, self.transport, name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("n_nodes", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_local_attention(n_nodes, dtype):
    names = [f"n{i}" for i in range(n_nodes)]
    cl = LocalCluster(names, dtype=dtype)
    # Ranges of 24 tokens on pages of 16: ranges start and end mid-page.
    sc = Scenario(cl.clients, {n: 4096 for n in names}, dtype=DTYPES[dtype], range_tokens=24,
                  seed=n_nodes)
    sc.prefill({"a": 37, "b": 5, "c": 100, "d": 1})
    for _ in range(12):
        sc.step()
    held = [cl.nodes[n].stats()["tokens_held"] for n in names]
    # Every token is on exactly one node: the history, plus the last step's token of each
    # request (its advance is confirmed at the next boundary).
    assert sum(held) == sum(sc.router.length(rid) + 1 for rid in sc.router.requests())
    if n_nodes > 1:
        assert all(h > 0 for h in held), "every node should hold some ranges"


def test_nodes_join_drain_and_leave_between_steps():
    cl = LocalCluster(["n0", "n1"])
    sc = Scenario(cl.clients, {"n0": 4096, "n1": 4096}, range_tokens=13, seed=5)
    sc.prefill({"a": 50, "b": 20})
    for _ in range(5):
        sc.step()
    cl.add("n2")
    sc.router.add_node("n2", 4096)  # joins at the next boundary
    for _ in range(20):
        sc.step()
    assert cl.nodes["n2"].stats()["tokens_held"] > 0
    sc.router.remove_node("n0")  # its ranges migrate to n1/n2 at the boundary
    sc.step()
    assert cl.nodes["n0"].stats()["requests"] == 0 or all(
        r.node != "n0" for rid in sc.router.requests() for r in sc.router.ranges(rid))
    sc.prefill({"e": 30})
    sc.finish("b")
    for _ in range(5):
        sc.step()
    assert "b" not in cl.nodes["n1"].requests and "b" not in cl.nodes["n2"].requests


def test_node_refusal_reaches_the_caller_and_node_keeps_serving():
    cl = LocalCluster(["n0"])
    c = cl.clients["n0"]
    q = torch.randn(1, 8, 64)
    with pytest.raises(RemoteError, match="unknown request 'ghost'") as e:
        c.attend(0, 1, ["ghost"], [3], q).result()
    assert e.value.kind == "unknown_request"
    with pytest.raises(RemoteError, match="layer 7 out of range"):
        c.attend(7, 1, ["ghost"], [3], q).result()
    with pytest.raises(RemoteError, match="q must be"):
        c.attend(0, 1, ["ghost"], [3], torch.randn(1, 7, 64)).result()
    k = torch.randn(1, 4, 2, 64)
    c.append(0, ["r"], [2], [0], k, k)  # a gap: refused, reported at flush
    with pytest.raises(RemoteError, match="leaves a gap"):
        c.flush()
    c.append(0, ["r"], [0], [0], k, k)
    c.flush()
    assert c.stats()["requests"] == 1
    cap = LocalCluster(["small"], capacity=32)
    with pytest.raises(RemoteError, match="node is full") as e:
        cap.clients["small"].open(["big"], [1000])
    assert e.value.kind == "capacity"


def test_a_step_of_every_layer_in_one_append_message():
    """What CapturedRemoteAttention sends once a step: k, v [b, layers, T, Hkv, D]."""
    cl = LocalCluster(["one", "per_layer"], layers=3)
    g = torch.Generator().manual_seed(3)
    reqs = ["a", "b"]

    def append(layers, rids, offs, k, v):  # to "one" in one message, to the other per layer
        cl.clients["one"].append(layers[0], rids, offs, offs, k, v)
        for i, layer in enumerate(layers):
            cl.clients["per_layer"].append(layer, rids, offs, offs, k[:, i], v[:, i])

    prompt = torch.randn(2, 3, 21, 2, 64, generator=g)
    append([0, 1, 2], reqs, [0, 0], prompt, -prompt)
    extra = torch.randn(1, 3, 4, 2, 64, generator=g)
    append([0, 1, 2], ["b"], [21], extra, extra)  # b now holds 25 tokens, a 21
    new = torch.randn(2, 2, 1, 2, 64, generator=g)
    append([1, 2], reqs, [21, 25], new, -new)  # one token more, in layers 1 and 2 only
    for c in cl.clients.values():
        c.flush()
    one, per_layer = cl.nodes["one"], cl.nodes["per_layer"]
    keys, keys2 = (cl.servers[n].peers[0].scope(reqs) for n in ("one", "per_layer"))
    assert [one.requests[k].lengths for k in keys] == [[21, 22, 22], [25, 26, 26]]
    q = torch.randn(2, 8, 64, generator=g)
    for layer, lens in ((0, [21, 25]), (1, [22, 26]), (2, [22, 26])):
        o1, s1 = one.attend(layer, keys, lens, q)
        o2, s2 = per_layer.attend(layer, keys2, lens, q)
        torch.testing.assert_close((o1, s1), (o2, s2), rtol=0, atol=0)
    # Refused, and the node unchanged: a gap in one of the layers, a shape that does not
    # match the layer count, layers past the node's.
    free = one.stats()["pages_free"]
    for layer, offs, k, match in (
        (0, [22, 26], new[:, :1].expand(2, 3, 1, 2, 64).contiguous(),
         "offset 22 for request 'a' leaves a gap in layer 0: the node holds 21"),
        (1, [22, 27], torch.randn(2, 2, 1, 2, 64),
         "offset 27 for request 'b' leaves a gap in layer 1: the node holds 26"),
        (1, [-1, 26], torch.randn(2, 2, 1, 2, 64), "offset -1 for request 'a' leaves a gap"),
        (1, [22, 26], torch.randn(2, 3, 1, 2, 64), "out of range"),
        (0, [21, 25], torch.randn(2, 2, 1, 2, 32), "must be"),
    ):
        cl.clients["one"].append(layer, reqs, offs, offs, k, k)
        with pytest.raises(RemoteError, match=match):
            cl.clients["one"].flush()
    assert one.stats()["pages_free"] == free
    assert [one.requests[k].lengths for k in keys] == [[21, 22, 22], [25, 26, 26]]
    with pytest.raises(ValueError, match="range of consecutive layers"):
        one.append_layers(range(0, 3, 2), reqs, [0, 0], [0, 0], prompt[:, :2], prompt[:, :2])


@pytest.mark.parametrize("capacity,page_size", [(4096, 16), (16, 16), (48, 8)])
def test_warmup_leaves_the_node_as_it_found_it(capacity, page_size, monkeypatch):
    """`kflume node` runs `warmup()` before it listens (its kernels and torch ops loaded,
    a weight node's append of every layer in one call among them): afterwards the node
    holds nothing and serves as a fresh one does."""
    cfg = NodeConfig(layers=3, kv_heads=2, head_dim=64, capacity_tokens=capacity,
                     page_size=page_size, q_heads=4, dtype="float32")
    warm, fresh = AttentionNode(cfg), AttentionNode(cfg)
    calls, append_layers = [], AttentionNode.append_layers
    monkeypatch.setattr(AttentionNode, "append_layers",
                        lambda self, layers, *a: calls.append(layers) or append_layers(
                            self, layers, *a))
    warm.warmup()
    assert range(3) in calls  # the path a weight node's appends take
    monkeypatch.undo()
    assert warm.stats() == fresh.stats()
    g = torch.Generator().manual_seed(4)
    k = torch.randn(1, 3, 5, 2, 64, generator=g)
    q = torch.randn(1, 4, 64, generator=g)
    for node in (warm, fresh):
        node.append_layers(range(3), ["r"], [0], [0], k, -k)
    assert warm.requests["r"].pages == fresh.requests["r"].pages
    for layer in range(3):
        torch.testing.assert_close(warm.attend(layer, ["r"], [5], q),
                                   fresh.attend(layer, ["r"], [5], q), rtol=0, atol=0)
