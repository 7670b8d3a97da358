"""RemoteAttention over real UCX: `kflume node` processes on loopback, spawned fresh.

Every wait in these tests has a deadline (the client's `timeout`), and pytest-timeout
bounds each test as a whole.
"""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("ucxx", reason="the UCX transport needs the ucx extra")

from kflume.comm import DeadlineExceeded, RemoteError, TransportError  # noqa: E402
from kflume.comm.ucx import UcxTransport  # noqa: E402
from kflume.comm.ucx_conn import tag  # noqa: E402
from kflume.comm.wire import unpack_states  # noqa: E402
from kflume.node import (
    NodeConfig,  # noqa: E402
    NodeProcess,  # noqa: E402
)
from kflume.weight.client import NodeClient  # noqa: E402

from .scenario import Scenario  # noqa: E402

TOKEN = "test-cluster-token"
CONFIG = NodeConfig(layers=2, kv_heads=2, head_dim=64, capacity_tokens=6000, dtype="float32")


@pytest.fixture(scope="module")
def nodes():
    procs = [NodeProcess(CONFIG, token=TOKEN) for _ in range(3)]
    yield procs
    for p in procs:
        assert p.stop() == 0, "a node did not shut down cleanly on SIGTERM"


@pytest.fixture
def transport():
    t = UcxTransport(token=TOKEN)
    yield t
    t.close()


def connect(transport, procs, timeout=10.0):
    return {f"n{i}": NodeClient.connect(f"n{i}", transport, p.address, timeout=timeout)
            for i, p in enumerate(procs)}


@pytest.mark.timeout(240)
def test_64_steps_over_3_nodes(nodes, transport):
    clients = connect(transport, nodes)
    sc = Scenario(clients, {n: CONFIG.capacity_tokens for n in clients}, range_tokens=40,
                  seed=64, timeout=10.0)
    sc.prefill({"u1": 77, "u2": 3, "u3": 150, "u4": 16})
    for _ in range(64):
        sc.step()
    held = [c.stats()["tokens_held"] for c in clients.values()]
    assert all(h > 0 for h in held) and sum(held) == 77 + 3 + 150 + 16 + 4 * 64
    for rid in ("u1", "u2", "u3", "u4"):
        sc.finish(rid)
    sc.router.begin_step()
    for c in clients.values():
        c.free(["u1", "u2", "u3", "u4"])
        assert c.stats()["requests"] == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n_nodes", [1, 2])
def test_fewer_nodes_bf16_geometry_checked(nodes, transport, n_nodes):
    clients = connect(transport, nodes[:n_nodes])
    for c in clients.values():
        assert c.info["layers"] == 2 and c.info["head_dim"] == 64  # from the handshake
    sc = Scenario(clients, {n: CONFIG.capacity_tokens for n in clients}, range_tokens=13,
                  seed=n_nodes, timeout=10.0)
    rids = {f"f{n_nodes}-{i}": n for i, n in enumerate([5, 33, 1])}
    sc.prefill(rids)
    for _ in range(6):
        sc.step()
    for c in clients.values():
        c.free(list(rids))


@pytest.mark.timeout(120)
def test_a_step_of_every_layer_in_one_message_over_ucx(nodes, transport):
    """What a captured step sends once per micro-batch: k, v [b, layers, T, Hkv, D]."""
    c = connect(transport, nodes[1:2])["n0"]
    g = torch.Generator().manual_seed(7)
    k = torch.randn(2, 2, 5, 2, 64, generator=g)
    v = torch.randn(2, 2, 5, 2, 64, generator=g)
    c.append(0, ["all1", "all2"], [0, 0], [0, 0], k, v)  # both layers, one message
    for layer in range(2):  # the same tokens, one message per layer
        c.append(layer, ["per1", "per2"], [0, 0], [0, 0], k[:, layer].contiguous(),
                 v[:, layer].contiguous())
    c.flush()
    q = torch.randn(2, 8, 64, generator=g)
    for layer in range(2):
        (one,) = c.attend(layer, 1, ["all1", "all2"], [5, 5], q).result().tensors
        (per,) = c.attend(layer, 1, ["per1", "per2"], [5, 5], q).result().tensors
        assert torch.equal(one, per)
        out, lse = unpack_states(one, 8, 64, torch.float32)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    c.append(0, ["all1"], [7], [7], k[:1], v[:1])  # a gap in both layers: refused
    with pytest.raises(RemoteError, match="leaves a gap in layer 0"):
        c.flush()
    c.free(["all1", "all2", "per1", "per2"])


@pytest.mark.timeout(120)
def test_bad_input_gets_a_clear_error_and_the_node_keeps_serving(nodes, transport):
    c = connect(transport, nodes[:1])["n0"]
    k = torch.randn(1, 4, 2, 64)
    c.append(0, ["ok"], [0], [0], k, k)
    c.append(1, ["ok"], [0], [0], k, k)
    c.flush()
    q = torch.randn(1, 8, 64)
    cases = [
        (lambda: c.attend(0, 1, ["ghost"], [1], q), "unknown request 'ghost'"),
        (lambda: c.attend(9, 1, ["ok"], [4], q), "layer 9 out of range"),
        (lambda: c.attend(0, 1, ["ok"], [4], torch.randn(1, 7, 64)), "q must be"),
        (lambda: c.attend(0, 1, ["ok"], [4], q.bfloat16()), "q has dtype torch.bfloat16"),
        (lambda: c.attend(0, 1, ["ok"], [9], q), "kv_len 9 for request 'ok'"),
        (lambda: c.attend(0, 1, ["ok", "ok"], [4], torch.randn(2, 8, 64)), "kv_len"),
    ]
    for call, match in cases:
        with pytest.raises(RemoteError, match=match):
            call().result()
    # A malformed header: raw bytes where a header should be.
    seq = c._seq
    c._seq += 1
    recv = c.conn.post_recv(seq)
    garbage = torch.frombuffer(bytearray(b"\x05\x00\x00\x00not-msgpack-at-all"), dtype=torch.uint8)
    L, Array = transport.L, transport.Array
    req = c.conn.ep.tag_send(Array(garbage.numpy()), L.UCXXTag(tag(c.conn.tx_channel, seq, 0)))
    (reply,) = transport.wait([recv], 10.0)
    assert req.completed and reply.header.op == "error" and "WireError" in reply.header.error
    # ... and the node still serves this client correctly.
    def attend(n):
        (states,) = c.attend(0, 1, ["ok"], [n], q).result().tensors
        return unpack_states(states, 8, 64, q.dtype)

    out, lse = attend(4)
    assert out.shape == (1, 8, 64) and torch.isfinite(out).all() and torch.isfinite(lse).all()
    # A 5th token appended: attends over the first 4 are unchanged, over 5 they differ.
    k5 = torch.randn(1, 1, 2, 64)
    c.append(0, ["ok"], [4], [4], k5, k5)
    torch.testing.assert_close(attend(4), (out, lse))
    c.flush()
    assert c.stats()["tokens_held"] == 5
    five, _ = attend(5)
    assert not torch.allclose(five, out)
    s = c.stats(reset_timings=True)  # the node timed the attends it served
    assert s["attend_messages"] >= 3 and 0 < s["attend_handle_us"] < 1e6
    assert "attend_messages" not in c.stats()
    c.free(["ok"])


@pytest.mark.timeout(60)
def test_peer_without_the_token_is_refused(nodes):
    for token in ("wrong", ""):
        t = UcxTransport(token=token)
        with pytest.raises(TransportError, match="wrong cluster token"):
            NodeClient.connect("x", t, nodes[0].address, timeout=5.0)
        t.close()


@pytest.mark.timeout(120)
def test_node_killed_mid_step(transport):
    with NodeProcess(CONFIG, token=TOKEN) as victim, NodeProcess(CONFIG, token=TOKEN) as other:
        clients = connect(transport, [victim, other], timeout=20.0)
        sc = Scenario(clients, {"n0": 6000, "n1": 6000}, range_tokens=10, seed=3, timeout=20.0)
        sc.prefill({"k1": 30, "k2": 25})
        sc.step()
        plan = sc.router.begin_step()
        sc.remote.begin_step(plan)
        q = torch.randn(2, 8, 64)
        kv = torch.randn(2, 2, 64)
        handle = sc.remote.start(0, q, kv, kv)  # queries are out ...
        victim.kill()  # ... and the node dies before answering
        t0 = time.monotonic()
        with pytest.raises((TransportError, DeadlineExceeded), match="n0|127.0.0.1"):
            sc.remote.finish(handle)
        assert time.monotonic() - t0 < 5.0, "a dead node must be noticed well before the deadline"
        # The surviving node keeps serving.
        assert clients["n1"].stats()["requests"] == 2
