"""UcxTransport between spawned processes on loopback: sizes, dtypes, deadlines, death."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback

import pytest
import torch

pytest.importorskip("ucxx", reason="the UCX transport needs the ucx extra")

from kflume.comm import DeadlineExceeded, Header, TransportError  # noqa: E402
from kflume.comm.ucx import UcxTransport  # noqa: E402

TOKEN = "echo-token"


def echo_server(q, token):
    """Echo every message back (same seq), until an 'shutdown'; 'stats' is never answered."""
    try:
        t = UcxTransport(token=token)
        lis = t.listen("127.0.0.1:0")
        q.put(lis.address)
        conn = None
        while conn is None:
            conn = lis.accept()
            t.progress(0.01)
        seq = 0
        while True:
            try:
                (m,) = t.wait([conn.post_recv(seq)], 60.0)
            except TransportError:  # the client went away: done
                break
            seq += 1
            if m.header.op == "shutdown":
                break
            if m.header.op == "stats":
                continue  # never answered: the client's deadline must fire
            if m.header.op == "stream":  # parts of the announced size, echoed (+- extra bytes)
                n, size, extra = (m.header.info[k] for k in ("parts", "bytes", "extra"))
                bufs = [torch.empty(size, dtype=torch.uint8) for _ in range(n)]
                t.wait([conn.post_part_recv(m.header.seq, i + 1, b) for i, b in enumerate(bufs)],
                       60.0)
                for i, b in enumerate(bufs):
                    conn.send_part(m.header.seq, i + 1,
                                   torch.cat([b, b[:extra]]) if extra >= 0 else b[:extra])
                continue
            conn.send(Header("result", seq=m.header.seq, info=m.header.info), m.tensors)
        t.progress(0.1)
    except Exception:  # forward the child's traceback to the parent
        q.put(traceback.format_exc())


@pytest.fixture
def echo():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=echo_server, args=(q, TOKEN), daemon=True)
    p.start()
    addr = q.get(timeout=60)
    assert ":" in addr, addr
    t = UcxTransport(token=TOKEN)
    conn = t.connect(addr, timeout=20)
    yield t, conn, p
    t.close()  # the server sees its peer gone and exits
    p.join(10)
    if p.is_alive():
        p.kill()


@pytest.mark.timeout(120)
def test_echo_sizes_and_dtypes(echo):
    t, conn, _ = echo
    tensors = [
        torch.empty(0, dtype=torch.float32),  # zero bytes
        torch.randn(3, 5).to(torch.bfloat16),  # small, bf16
        torch.randint(-9, 9, (7,), dtype=torch.int32),
        torch.randn(4 * 2**20),  # 16 MiB
    ]
    seq = 0
    for into in (None, [torch.empty_like(x) for x in tensors]):
        recv = conn.post_recv(seq, into)
        conn.send(Header("attend", seq=seq, info={"n": seq}), tensors)
        (m,) = t.wait([recv], 30.0)
        assert m.header.op == "result" and m.header.info == {"n": seq}
        for a, b in zip(m.tensors, tensors):
            assert a.dtype == b.dtype and torch.equal(a, b)
        if into is not None:
            assert all(a is b for a, b in zip(m.tensors, into))
        seq += 1


@pytest.mark.timeout(60)
def test_strided_tensors_are_refused(echo):
    _, conn, _ = echo
    with pytest.raises(ValueError, match="contiguous"):
        conn.send(Header("attend", seq=0), [torch.randn(4, 4).t()])


@pytest.mark.timeout(60)
def test_deadline(echo):
    t, conn, _ = echo
    recv = conn.post_recv(0)
    conn.send(Header("stats", seq=0))
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="within 0.3"):
        t.wait([recv], 0.3)
    assert time.monotonic() - t0 < 2.0


@pytest.mark.timeout(60)
def test_dead_peer_is_noticed(echo):
    t, conn, proc = echo
    recv = conn.post_recv(0)
    os.kill(proc.pid, 9)
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="peer"):
        t.wait([recv], 30.0)[0]
    assert time.monotonic() - t0 < 3.0
    with pytest.raises(TransportError):
        conn.send(Header("attend", seq=1))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [1, 4096, 1 << 20])
def test_parts_round_trip(echo, size):
    """Header-less parts, posted before they come, in sizes that go eagerly and by
    rendezvous; reusing the buffers for a second message."""
    t, conn, _ = echo
    dst = [torch.zeros(size, dtype=torch.uint8) for _ in range(3)]
    for seq in range(2):
        src = [torch.randint(0, 256, (size,), dtype=torch.uint8) for _ in range(3)]
        recvs = [conn.post_part_recv(seq, i + 1, d) for i, d in enumerate(dst)]
        conn.send(Header("stream", seq=seq, info={"parts": 3, "bytes": size, "extra": 0}))
        for i, x in reversed(list(enumerate(src))):  # any order
            conn.send_part(seq, i + 1, x, static=True)
        msgs = t.wait(recvs, 20.0)
        for x, d, m in zip(src, dst, msgs):
            assert m.tensors[0] is d and torch.equal(d, x)


@pytest.mark.timeout(60)
def test_a_part_of_another_size_than_its_buffer_is_an_error(echo):
    t, conn, _ = echo
    d = torch.zeros(64, dtype=torch.uint8)
    for seq, extra in enumerate((8, -8)):  # longer, shorter
        r = conn.post_part_recv(seq, 1, d)
        conn.send(Header("stream", seq=seq, info={"parts": 1, "bytes": 64, "extra": extra}))
        conn.send_part(seq, 1, torch.ones(64, dtype=torch.uint8))
        with pytest.raises(ValueError, match=f"part 1 of message {seq} has {64 + extra} "
                                             "bytes; 64 expected"):
            t.wait([r], 20.0)
    with pytest.raises(ValueError, match="part must be in"):
        conn.send_part(0, 255, d)
    with pytest.raises(ValueError, match="contiguous"):
        conn.post_part_recv(1, 1, torch.zeros(4, 4, dtype=torch.uint8)[:, 0])


def test_bad_address():
    t = UcxTransport(token=TOKEN)
    with pytest.raises(TransportError, match="cannot connect"):
        t.connect("127.0.0.1:1", timeout=2)
    with pytest.raises(ValueError, match="HOST:PORT"):
        t.connect("nowhere", timeout=2)
    t.close()
