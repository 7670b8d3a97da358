"""A node no peer can stall, crash or cross: each failure class against a `kflume node`
process over UCX on loopback, with peers that misbehave on purpose (tests/remote/rawpeer.py),
and the node checked to serve well-behaved clients exactly afterwards."""

from __future__ import annotations

import socket
import time

import pytest
import torch

pytest.importorskip("ucxx", reason="the UCX transport needs the ucx extra")

from kflume.comm import DeadlineExceeded, RemoteError  # noqa: E402
from kflume.comm.handshake import parse_address  # noqa: E402
from kflume.comm.ucx import UcxTransport  # noqa: E402
from kflume.comm.wire import Header, encode, unpack_states  # noqa: E402
from kflume.node import NodeConfig, NodeProcess  # noqa: E402
from kflume.testing import ReferenceKV, assert_close_rel  # noqa: E402
from kflume.weight.client import NodeClient, wait_all  # noqa: E402

from .rawpeer import VERSION, RawPeer, Worker, hello  # noqa: E402

TOKEN = "hardening-token"
CONFIG = NodeConfig(layers=2, kv_heads=2, head_dim=64, capacity_tokens=4096, dtype="float32")
HQ = 8


@pytest.fixture(scope="module")
def node():
    proc = NodeProcess(CONFIG, token=TOKEN)
    yield proc
    proc.stop()


@pytest.fixture
def transport():
    t = UcxTransport(token=TOKEN)
    yield t
    t.close()


@pytest.fixture(scope="module")
def worker():
    return Worker()


def fill(client: NodeClient, ref: ReferenceKV, rid, tokens: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in range(CONFIG.layers):
        k, v = (torch.randn(1, tokens, 2, 64, generator=g) for _ in range(2))
        client.append(layer, [rid], [0], [0], k, v)
        ref.extend(layer, rid, k[0], v[0])
    client.flush()


def check_exact(client: NodeClient, ref: ReferenceKV, rid, tokens: int,
                timeout: float = 5.0) -> None:
    """The node's attention over `rid` equals the float64 reference, in every layer."""
    q = torch.randn(1, HQ, 64)
    for layer in range(CONFIG.layers):
        (states,) = client.attend(layer, 1, [rid], [tokens], q).result(timeout).tensors
        out, _ = unpack_states(states, HQ, 64, torch.float32)
        assert_close_rel(out, ref.attend(layer, [rid], q, 64**-0.5), torch.float32)


def serving(node: NodeProcess, transport, rid="alive", seed=5) -> None:
    """The node process lives and a fresh client gets exact attention from it."""
    assert node.running, "the node process died"
    c = NodeClient.connect("n", transport, node.address, timeout=10.0)
    ref = ReferenceKV(CONFIG.layers)
    fill(c, ref, rid, 21, seed)
    check_exact(c, ref, rid, 21)
    c.free([rid])
    c.close()


# ---- handshakes never block serving -------------------------------------------------------
@pytest.mark.timeout(120)
def test_idle_and_slow_handshakes_do_not_stall_serving(node, transport):
    c = NodeClient.connect("n", transport, node.address, timeout=10.0)
    idle = [socket.create_connection(parse_address(node.address)) for _ in range(80)]
    slow = socket.create_connection(parse_address(node.address))
    slow.sendall(b"\x40\x00")  # half a length prefix, the rest never comes
    try:
        worst = 0.0
        for _ in range(20):
            t0 = time.monotonic()
            c.stats()
            worst = max(worst, time.monotonic() - t0)
        assert worst < 1.0, f"a call took {worst:.2f} s while handshakes were pending"
        ref = ReferenceKV(CONFIG.layers)  # and a new peer is accepted meanwhile
        other = NodeClient.connect("n2", transport, node.address, timeout=5.0)
        fill(other, ref, "h1", 9, 1)
        check_exact(other, ref, "h1", 9)
        other.free(["h1"])
        # Handshakes that never finish are given up after their deadline.
        idle[0].settimeout(15.0)
        assert idle[0].recv(1) == b""
    finally:
        for s in idle + [slow]:
            s.close()
        c.close()


# ---- frames: lengths checked against the bytes received -----------------------------------
@pytest.mark.timeout(60)
def test_a_short_frame_is_refused_not_decoded_from_stale_bytes(node, worker):
    p = RawPeer(worker, node.address, TOKEN)
    full = encode(Header("stats", seq=0))
    p.send(0, full)
    assert p.recv(0).op == "ok"
    p.send(1, full[:4])  # the same length prefix, and nothing after it
    p.send(2, full[: len(full) // 2])
    for seq in (1, 2):
        h = p.recv(seq, timeout=5.0)
        assert h.op == "error" and h.seq == seq and "received" in h.error, h
    body = encode(Header("stats", seq=7))  # a header claiming another message's number
    p.send(3, body)
    h = p.recv(3, timeout=5.0)
    assert h.op == "error" and "sequence number" in h.error
    p.close()


@pytest.mark.timeout(60)
def test_a_short_stream_query_fails_the_stream(node, transport):
    c = NodeClient.connect("n", transport, node.address, timeout=10.0)
    ref = ReferenceKV(CONFIG.layers)
    fill(c, ref, "s1", 12, 3)
    st = c.open_stream(range(0, 1), 1, ["s1"], [12], HQ, 64, torch.float32)
    into = torch.empty(1, 8 * 64 * 4 + 4 * 8, dtype=torch.uint8)
    r = c.conn.post_part_recv(st.seq, 1, into)
    c.conn.send_part(st.seq, 1, torch.randn(1, HQ, 32))  # half the agreed bytes
    with pytest.raises(RemoteError, match="bytes"):
        st.ack.result(5.0)
    r.cancel()
    check_exact(c, ref, "s1", 12)  # the client and the node go on
    c.free(["s1"])


@pytest.mark.timeout(60)
def test_the_tensors_of_a_refused_header_are_discarded(node, transport):
    """A header refused before its tensors' buffers exist: the tensors, sent anyway,
    are received into nothing (truncated) on the node, so the sender's sends finish."""
    c = NodeClient.connect("n", transport, node.address, timeout=10.0)
    k = torch.randn(1, 4000, 2, 64).bfloat16()  # 1 MiB each, the wrong dtype for the node
    c.append(0, ["d"], [0], [0], k, k)
    with pytest.raises(RemoteError, match="k has dtype torch.bfloat16"):
        c.flush()
    deadline = time.monotonic() + 10.0
    while transport._inflight:
        assert time.monotonic() < deadline, "the refused message's tensors were never taken"
        transport.progress(0.01)
    ref = ReferenceKV(CONFIG.layers)
    fill(c, ref, "d", 7, 2)
    check_exact(c, ref, "d", 7)
    c.free(["d"])


# ---- addresses: a peer cannot crash the node -----------------------------------------------
@pytest.mark.timeout(180)
def test_malformed_worker_addresses_are_refused_and_the_node_lives(node, worker, transport):
    good = worker.address
    bad = [b"", b"\xff", bytes([0xFF]) + good[1:], good[:40], good + b"\x00" * 8,
           bytes(range(256)) * 200]
    for i in range(len(good)):  # every byte flipped, one at a time
        b = bytearray(good)
        b[i] = 0 if good[i] else 0xFF
        bad.append(bytes(b))
    replies = []
    for addr in bad:
        sock, reply = hello(node.address, {"v": VERSION, "token": TOKEN, "chan": 5,
                                           "addr": addr, "info": {}, "inline": 0})
        sock.close()
        time.sleep(0.01)  # (a node that aborts takes a moment to go)
        assert node.running, f"the node died on the address {addr.hex()}"
        replies.append(reply)
    for reply in replies[:6]:  # (a flipped byte of the worker's id, say, is valid)
        assert reply is not None and not reply["ok"] and "address" in reply["err"], reply
    serving(node, transport)


# ---- refused calls leave the client usable --------------------------------------------------
@pytest.mark.timeout(60)
def test_calls_refused_on_the_client_leave_it_in_step(node, transport):
    c = NodeClient.connect("n", transport, node.address, timeout=5.0)
    ref = ReferenceKV(CONFIG.layers)
    fill(c, ref, "c1", 17, 4)
    q = torch.randn(1, HQ, 64)
    big = torch.randn(1, 2048, 2, 64, requires_grad=True)  # 1 MiB: a message of its own
    refused = [
        lambda: c.attend(0, 1, ["c1"], [17], q.double()),  # a dtype the wire cannot carry
        lambda: c.attend(0, 1, ["c1"], [17], torch.randn(1, 64, HQ).transpose(1, 2)),
        lambda: c.attend(0, 1, [f"r{i:0>40}" for i in range(4000)], [1] * 4000, q),  # header
        lambda: c.attend(0, 1, ["c1"], [17], q, into=torch.empty(8, 1, dtype=torch.uint8).t()),
        lambda: c.append(0, ["c1"], [17], [17], q.double()[:, :1], q.double()[:, :1]),
    ]
    try:  # tensors that need a gradient are sent as their data, or refused
        c.append(0, ["c1"], [17], [17], big, big)
    except (ValueError, TypeError, RuntimeError):
        pass
    check_exact(c, ref, "c1", 17)
    kept = []  # the errors, kept (to be reported later, say)
    for call in refused:
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        kept.append(info.value)
        check_exact(c, ref, "c1", 17)
    c.outstanding.clear()
    c.free(["c1"])


# ---- request ids are scoped per connection --------------------------------------------------
@pytest.mark.timeout(60)
def test_two_weight_nodes_with_the_same_request_ids_stay_apart(node):
    ta, tb = UcxTransport(token=TOKEN), UcxTransport(token=TOKEN)
    a = NodeClient.connect("a", ta, node.address, timeout=10.0)
    b = NodeClient.connect("b", tb, node.address, timeout=10.0)
    ra, rb = ReferenceKV(CONFIG.layers), ReferenceKV(CONFIG.layers)
    fill(a, ra, "same", 20, 10)
    fill(b, rb, "same", 20, 11)
    check_exact(a, ra, "same", 20)
    check_exact(b, rb, "same", 20)
    assert a.stats()["requests"] == 1 and b.stats()["requests"] == 1
    assert b.free(["same"]) == 20  # b's own, not a's
    check_exact(a, ra, "same", 20)
    with pytest.raises(RemoteError, match="unknown request 'same'"):
        b.attend(0, 1, ["same"], [20], torch.randn(1, HQ, 64)).result()
    with pytest.raises(RemoteError, match="unknown request 'same'"):
        b.export_range("same", 0, 20)
    a.free(["same"])
    for c, t in ((a, ta), (b, tb)):
        c.close()
        t.close()


# ---- every timeout names the node and the operation -------------------------------------
@pytest.mark.timeout(60)
def test_timeouts_name_the_node_and_the_operation(node, transport):
    mute = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    addr = f"127.0.0.1:{mute.getsockname()[1]}"
    try:
        with pytest.raises(TimeoutError, match=rf"mute.*{addr}.*handshake"):
            NodeClient.connect("mute", transport, addr, timeout=0.5)
    finally:
        mute.close()
    c = NodeClient.connect("n7", transport, node.address, timeout=10.0)
    import os
    import signal

    os.kill(node.pid, signal.SIGSTOP)
    try:
        with pytest.raises(DeadlineExceeded, match=rf"n7.*{node.address}.*stats"):
            c.call(Header("stats")).result(0.3)
        with pytest.raises(DeadlineExceeded, match=rf"n7.*{node.address}.*free"):
            wait_all([c.call(Header("free", requests=["x"]))], 0.3)
    finally:
        os.kill(node.pid, signal.SIGCONT)
    c.stats()


# ---- no token, no public address ----------------------------------------------------------
def _start(args: list[str], timeout: float = 90.0):
    """`kflume node ARGS` without a token: (process, its first line or None if it exited)."""
    import os
    import select
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "KFLUME_TOKEN"}
    cmd = [sys.executable, "-m", "kflume", "node", "--capacity-tokens", "64", "--layers", "1",
           "--kv-heads", "1", "--head-dim", "8", "--dtype", "float32", *args]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([p.stdout], [], [], 0.2)[0]:
            return p, p.stdout.readline().decode() or None  # ("": it exited)
        if p.poll() is not None:
            return p, None
    p.kill()
    raise AssertionError(f"kflume node {args} neither listened nor exited in {timeout} s")


@pytest.mark.timeout(240)
def test_no_token_on_a_public_address_needs_an_explicit_flag():
    p, line = _start(["--listen", "0.0.0.0:0"])
    try:
        assert line is None and p.wait(30) != 0, f"listened without a token: {line}"
        assert "--insecure-no-token" in p.stderr.read().decode()
    finally:
        p.kill()
    p, line = _start(["--listen", "0.0.0.0:0", "--insecure-no-token"])
    try:
        assert line and line.startswith("kflume node listening on 0.0.0.0:")
    finally:
        p.terminate()
        _, err = p.communicate(timeout=30)
    assert "without a token" in err.decode()
    p, line = _start(["--listen", "127.0.0.1:0"])  # loopback: no token needed
    p.terminate()
    p.communicate(timeout=30)
    assert line and line.startswith("kflume node listening on 127.0.0.1:")
