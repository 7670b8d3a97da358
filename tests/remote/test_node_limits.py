"""Every value a peer sends is bounded before it reaches an allocator, UCX or a kernel: a
`kflume node` process answers each out-of-bounds message with an error naming the
problem, at once (before waiting for tensors it would have to allocate), and goes on
serving."""

from __future__ import annotations

import pytest

pytest.importorskip("ucxx", reason="the UCX transport needs the ucx extra")

from kflume.comm.ucx import UcxTransport  # noqa: E402
from kflume.comm.wire import Header, encode  # noqa: E402
from kflume.node import NodeConfig, NodeProcess  # noqa: E402

from .rawpeer import RawPeer, Worker  # noqa: E402
from .test_hardening import serving  # noqa: E402

TOKEN = "limits-token"
CONFIG = NodeConfig(layers=2, kv_heads=2, head_dim=64, capacity_tokens=4096, dtype="float32")


@pytest.fixture(scope="module")
def node():
    proc = NodeProcess(CONFIG, token=TOKEN)
    yield proc
    proc.stop()


def _k(tokens):  # an append's k or v descriptor
    return ("float32", (1, tokens, 2, 64))


CASES = [  # (header, what the error must say); the attend's q follows it as its part
    (Header("open", requests=["o"], ints={"tokens": [-5]}), "tokens"),
    (Header("attend", layer=0, requests=["o"], ints={"kv_len": [0]}, info={"scale": float("nan")},
            tensors=[("float32", (1, 8, 64))]), "scale"),
    (Header("append", requests=["o"], ints={"offsets": [0], "positions": [0]},
            tensors=[_k(1 << 20), _k(1 << 20)]), "capacity"),  # 512 MiB each, never sent
    (Header("append", requests=["o"], ints={"offsets": [0], "positions": [0]},
            tensors=[_k(4), ("float32", (1, 4, 2, 64, 1))]), "k, v"),
    (Header("import", requests=["o"], ints={"start": [0]},
            tensors=[("float32", (2, 1 << 22, 2, 64))] * 2), "capacity"),
    (Header("stream", layer=0, requests=["o"], ints={"kv_len": [0]},
            info={"layers": 200, "heads": 1024, "head_dim": 64, "dtype": "float32"}), "layers"),
    (Header("stream", layer=0, requests=["o"], ints={"kv_len": [0]},
            info={"layers": 2, "heads": 1024, "head_dim": 64, "dtype": "float32"}), "heads"),
    (Header("open", requests=["x" * 1000], ints={"tokens": [1]}), "request id"),
    (Header("free", requests=[2**63 + 5]), "request id"),
    (Header("stats", tensors=[("uint8", (1,))] * 300), "tensors"),
    (Header("export", requests=["o"], ints={"start": [5], "end": [2]}), "start"),
    (Header("open", requests=[f"z{i}" for i in range(3000)], ints={"tokens": [0] * 3000}),
     "requests"),
]


@pytest.mark.timeout(120)
def test_out_of_bounds_values_are_refused_at_once(node):
    p = RawPeer(Worker(), node.address, TOKEN)
    p.send(0, encode(Header("open", seq=0, requests=["o"], ints={"tokens": [4]})))
    assert p.recv(0).op == "ok"
    for seq, (h, what) in enumerate(CASES, start=1):
        h.seq = seq
        p.send(seq, encode(h))
        if h.op == "attend":
            p.send(seq, bytes(4 * 8 * 64), part=1)
        got = p.recv(seq, timeout=5.0)
        assert got.op == "error" and what in got.error, (h, got)
        assert node.running
    p.close()
    t = UcxTransport(token=TOKEN)
    serving(node, t)
    t.close()
