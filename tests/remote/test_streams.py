"""Attend streams (one header a step, then one header-less q and reply per layer) over the
in-process transport and over UCX loopback to a `kflume node` process: results equal a
float64 reference, refusals reach the caller and the node keeps serving."""

from __future__ import annotations

import gc
import time

import pytest
import torch

from kflume.comm import InProcHub, InProcTransport, RemoteError
from kflume.comm.mailbox import Mailbox, SharedWords
from kflume.comm.wire import state_row_bytes, unpack_states
from kflume.node import AttentionNode, NodeConfig, NodeServer
from kflume.testing import ReferenceKV, assert_close_rel
from kflume.weight.client import NodeClient

TOKEN = "stream-test-token"
CONFIG = NodeConfig(layers=3, kv_heads=2, head_dim=64, capacity_tokens=4096, dtype="float32",
                    page_size=16)
HQ = 8  # GQA ratio 4


@pytest.fixture(scope="module")
def ucx_node():
    pytest.importorskip("ucxx", reason="the UCX transport needs the ucx extra")
    from kflume.node import NodeProcess

    proc = NodeProcess(CONFIG, token=TOKEN)
    yield proc
    assert proc.stop() == 0


class InProc:
    def __init__(self):
        hub = InProcHub()
        self.transport = InProcTransport(hub)
        self.node = AttentionNode(CONFIG)
        self.server = NodeServer(self.node, self.transport, self.transport.listen("n"))
        hub.add_driver(self.server.poll)
        self.client = NodeClient.connect("n", self.transport, "n", timeout=10.0)


@pytest.fixture(params=["inproc", "ucx"])
def client(request):
    if request.param == "inproc":
        yield InProc().client
        return
    from kflume.comm.ucx import UcxTransport

    t = UcxTransport(token=TOKEN)
    c = NodeClient.connect("n", t, request.getfixturevalue("ucx_node").address, timeout=10.0)
    yield c
    c.close()
    t.close()


def fill(client, ref, lengths, seed):
    """Requests `name -> tokens` of random KV in every layer (one append message)."""
    g = torch.Generator().manual_seed(seed)
    rids = list(lengths)
    t = max(lengths.values())
    k = torch.randn(len(rids), CONFIG.layers, t, 2, 64, generator=g)
    v = torch.randn(len(rids), CONFIG.layers, t, 2, 64, generator=g)
    client.open(rids, [t] * len(rids))
    client.append(0, rids, [0] * len(rids), [0] * len(rids), k, v)
    client.flush()
    for i, rid in enumerate(rids):
        for layer in range(CONFIG.layers):
            ref.extend(layer, rid, k[i, layer, : lengths[rid]], v[i, layer, : lengths[rid]])
    return rids


def run_stream(client, rids, kv_len, qs, order, scale=None):
    row = state_row_bytes(HQ, 64, torch.float32)
    st = client.open_stream(range(CONFIG.layers), 1, rids, kv_len, HQ, 64, torch.float32,
                            scale)
    into = [torch.zeros(len(rids), row, dtype=torch.uint8) for _ in qs]
    replies = {layer: st.attend(layer, qs[layer], into[layer]) for layer in order}
    for layer in order:
        assert replies[layer].result().tensors[0] is into[layer]
    st.ack.result()
    return [unpack_states(t, HQ, 64, torch.float32) for t in into]


def test_stream_matches_reference(client):
    ref = ReferenceKV(CONFIG.layers)
    lengths = {"a": 37, "b": 1, "c": 16, "d": 5}  # odd lengths, one page exactly
    rids = fill(client, ref, lengths, seed=1)
    kv_len = [37, 1, 16, 0]  # "d": an empty range
    g = torch.Generator().manual_seed(2)
    for scale, order in ((None, [0, 1, 2]), (0.3, [2, 0, 1])):  # reused buffers, any order
        qs = [torch.randn(len(rids), HQ, 64, generator=g) for _ in range(CONFIG.layers)]
        states = run_stream(client, rids, kv_len, qs, order, scale)
        for layer, (out, lse) in enumerate(states):
            want = ref.attend(layer, rids[:3], qs[layer][:3], scale or 64**-0.5)
            assert_close_rel(out[:3], want, torch.float32, f"layer {layer}")
            assert torch.isfinite(lse[:3]).all()
            assert (out[3] == 0).all() and (lse[3] == float("-inf")).all()
    client.free(rids)


def test_replies_posted_ahead_land_in_one_buffer(client):
    """A stream opened with one reply buffer posts each layer's receive ahead; layers go
    one after another (each reply read before the next query), as in a decode step."""
    ref = ReferenceKV(CONFIG.layers)
    rids = fill(client, ref, {"p": 29, "q": 3}, seed=11)
    row = state_row_bytes(HQ, 64, torch.float32)
    g = torch.Generator().manual_seed(12)
    with pytest.raises(ValueError, match=f"into must be uint8 \\[2, {row}\\]"):
        client.open_stream(range(3), 1, rids, [29, 3], HQ, 64, torch.float32,
                           into=torch.zeros(2, row - 1, dtype=torch.uint8))
    into = torch.full((2, row), 255, dtype=torch.uint8)
    for step in range(2):  # the same buffer, stream after stream
        st = client.open_stream(range(3), 1, rids, [29, 3], HQ, 64, torch.float32, into=into)
        with pytest.raises(ValueError, match="give into for each layer, or once"):
            st.attend(0, torch.zeros(2, HQ, 64), into)
        for layer in range(3):
            q = torch.randn(2, HQ, 64, generator=g)
            assert st.attend(layer, q).result().tensors[0] is into
            out, lse = unpack_states(into, HQ, 64, torch.float32)
            want = ref.attend(layer, rids, q, 64**-0.5)  # fresh q: a stale reply fails
            assert_close_rel(out, want, torch.float32, f"step {step} layer {layer}")
            assert torch.isfinite(lse).all()
        st.ack.result()
    client.free(rids)


def test_mailbox_stream_replies_land_in_the_mailbox(client):
    """A stream opened on a registered mailbox: the node reads each layer's query once its
    post flag is up, copies the reply into the mailbox rows and raises the layer's
    doorbell to the stream's value; the next stream on the same rows lowers the doorbells
    first, and raises another value, so a stale one never reads as answered."""
    ref = ReferenceKV(CONFIG.layers)
    rids = fill(client, ref, {"m": 33, "n": 1, "o": 17}, seed=21)
    row = state_row_bytes(HQ, 64, torch.float32)
    flags = SharedWords(CONFIG.layers)
    box = Mailbox(rows=5, row_bytes=row, words=2 * CONFIG.layers, query_row_bytes=HQ * 64 * 4,
                  flags=flags)
    queries = box.queries.view(torch.float32).view(5, HQ, 64)
    with pytest.raises(ValueError, match="was not registered"):
        client.open_stream(range(3), 1, rids, [33, 1, 17], HQ, 64, torch.float32,
                           mailbox=(box, 2, 3), pull=(0, 1, [1, 1, 1]))
    client.register_mailbox([box])
    box.buffer.fill_(255)
    g = torch.Generator().manual_seed(22)
    with pytest.raises(ValueError, match="rows hold .* bytes; this stream's replies"):
        client.open_stream(range(3), 1, rids, [33, 1, 17], HQ, 32, torch.float32,
                           mailbox=(box, 2, 3), pull=(0, 1, [1, 1, 1]))
    values = []
    for step in range(2):
        post = [step + 1] * 3
        st = client.open_stream(range(3), 1, rids, [33, 1, 17], HQ, 64, torch.float32,
                                mailbox=(box, 2, 3), pull=(0, 1, post))  # rows 2..4, words 3..5
        assert all(box.bells[3:6] == 0)  # lowered before the node could raise them
        values.append(st.mail.value)
        if step:  # a late delivery of the stream before raises its own value: not an answer
            box.bells[3] = values[0]
        with pytest.raises(ValueError, match="reads this stream's queries itself"):
            st.attend(0, torch.zeros(3, HQ, 64))
        for layer in range(3):
            q = torch.randn(3, HQ, 64, generator=g)
            queries[2:5] = q
            r = st.expect(layer)
            flags.tensor[layer] = post[layer]  # "posted" (a GPU's post kernel, in a graph)
            assert r.result() is None and r.done
            assert box.bells[3 + layer] == values[-1]
            out, lse = unpack_states(box.buffer[2:5], HQ, 64, torch.float32)
            want = ref.attend(layer, rids, q, 64**-0.5)  # fresh q: a stale reply fails
            assert_close_rel(out, want, torch.float32, f"step {step} layer {layer}")
            assert torch.isfinite(lse).all()
        st.ack.result()
        assert (box.buffer[:2] == 255).all() and all(box.bells[:3] == 0)  # others untouched
    assert values[1] != values[0]
    with pytest.raises(ValueError, match="do not fit in the mailbox"):
        client.open_stream(range(3), 1, rids, [33, 1, 17], HQ, 64, torch.float32,
                           mailbox=(box, 3, 0), pull=(0, 1, [3, 3, 3]))
    # a mailbox the node cannot map (another host's) is refused as a whole, naming why;
    # the node keeps serving
    other = Mailbox(rows=1, row_bytes=row, words=1)
    desc = other.describe()
    other.describe = lambda: {**desc, "host": "elsewhere/0"}
    with pytest.raises(RemoteError, match="mailbox of host 'elsewhere/0'"):
        client.register_mailbox([other])
    q = torch.randn(3, HQ, 64, generator=g)
    queries[0:3] = q
    st = client.open_stream(range(3), 1, rids, [33, 1, 17], HQ, 64, torch.float32,
                            mailbox=(box, 0, 0), pull=(0, 1, [3, 3, 3]))
    flags.tensor[:] = 3
    for layer in range(3):
        st.expect(layer).result()
    st.ack.result()
    out, _ = unpack_states(box.buffer[0:3], HQ, 64, torch.float32)
    assert_close_rel(out, ref.attend(2, rids, q, 64**-0.5), torch.float32, "after refusal")
    client.free(rids)
    box.close()
    other.close()
    flags.close()


def test_pull_stream_reads_posted_queries_and_can_be_given_up(client):
    """A pulling stream: no query is sent; the node reads layer i's from the mailbox's
    query rows once post flag `flag + i * stride` reaches the stream's value, and
    delivers the reply. A stream given up (`cancel`) is answered with an error, and the
    node keeps serving."""
    ref = ReferenceKV(CONFIG.layers)
    rids = fill(client, ref, {"u": 21, "w": 2}, seed=31)
    row = state_row_bytes(HQ, 64, torch.float32)
    flags = SharedWords(2 * CONFIG.layers)
    box = Mailbox(rows=4, row_bytes=row, words=2 * CONFIG.layers, query_row_bytes=HQ * 64 * 4,
                  flags=flags)
    client.register_mailbox([box])
    queries = box.queries.view(torch.float32).view(4, HQ, 64)
    g = torch.Generator().manual_seed(32)
    st = client.open_stream(range(3), 1, rids, [21, 2], HQ, 64, torch.float32,
                            mailbox=(box, 2, 3), pull=(1, 2, [5, 6, 5]))  # flags 1, 3, 5
    with pytest.raises(ValueError, match="reads this stream's queries itself"):
        st.attend(0, torch.zeros(2, HQ, 64))
    for layer in range(3):
        q = torch.randn(2, HQ, 64, generator=g)
        queries[2:4] = q
        r = st.expect(layer)
        want_flag = [5, 6, 5][layer]
        flags.tensor[1 + 2 * layer] = want_flag - 1  # the previous step's post
        time.sleep(0.05)
        assert not r.done  # not posted yet: the node waits
        flags.tensor[1 + 2 * layer] = want_flag  # "posted" (a GPU's post kernel, in a graph)
        assert r.result() is None
        out, _ = unpack_states(box.buffer[2:4], HQ, 64, torch.float32)
        assert_close_rel(out, ref.attend(layer, rids, q, 64**-0.5), torch.float32,
                         f"pulled layer {layer}")
    st.ack.result()
    with pytest.raises(ValueError, match="post flags do not fit"):
        client.open_stream(range(3), 1, rids, [21, 2], HQ, 64, torch.float32,
                           mailbox=(box, 2, 3), pull=(2, 2, [6, 6, 6]))
    with pytest.raises(ValueError, match="one value > 0 per layer"):
        client.open_stream(range(3), 1, rids, [21, 2], HQ, 64, torch.float32,
                           mailbox=(box, 2, 3), pull=(1, 2, [6, 6]))
    flags.tensor.zero_()
    st = client.open_stream(range(3), 1, rids, [21, 2], HQ, 64, torch.float32,
                            mailbox=(box, 0, 0), pull=(0, 2, [6, 6, 6]))
    st.cancel().result()
    with pytest.raises(RemoteError, match="given up by the peer"):
        st.ack.result()
    with pytest.raises(RemoteError, match="given up by the peer"):
        st.expect(0).result()
    run_stream(client, rids, [21, 2], [torch.randn(2, HQ, 64, generator=g)] * 3, [0, 1, 2])
    client.free(rids)
    box.close()
    flags.close()


def test_padded_mailbox_place_is_captured_ahead_and_serves_changing_batches(client):
    """A mailbox stream over a fixed place of `rows` rows: the requests' rows get their
    attention, the rows past them (0, -inf), while the batch changes from step to step.
    `capture_ahead` for the place is answered first (a CPU node captures nothing); a
    capture without a place is refused, naming why, and the node keeps serving."""
    from kflume.comm.wire import Header

    ref = ReferenceKV(CONFIG.layers)
    rids = fill(client, ref, {"p": 40, "q": 3, "s": 18}, seed=41)
    row = state_row_bytes(HQ, 64, torch.float32)
    flags = SharedWords(2 * CONFIG.layers)
    box = Mailbox(rows=6, row_bytes=row, words=2 * CONFIG.layers, query_row_bytes=HQ * 64 * 4,
                  flags=flags)
    client.register_mailbox([box])
    place = dict(mailbox=(box, 2, 3), pull=(1, 2))
    with pytest.raises(RemoteError, match="give info rows, mailbox and pull"):
        client.call(Header("capture", info={"layers": 3})).result()
    with pytest.raises(ValueError, match="do not fit in the mailbox"):
        client.capture_ahead(range(3), 5, HQ, 64, torch.float32, **place)
    assert client.capture_ahead(range(3), 4, HQ, 64, torch.float32,
                                **place).result().header.info["captured"] == 0
    queries = box.queries.view(torch.float32).view(6, HQ, 64)
    g = torch.Generator().manual_seed(42)
    for step, (batch, lens) in enumerate(((rids[:2], [40, 3]), (rids, [40, 3, 18]),
                                          (rids[2:], [18]))):
        value = 10 + step
        st = client.open_stream(range(3), 1, batch, lens, HQ, 64, torch.float32,
                                mailbox=(box, 2, 3), pull=(1, 2, [value] * 3), rows=4)
        for layer in range(3):
            q = torch.randn(4, HQ, 64, generator=g)
            queries[2:6] = q
            r = st.expect(layer)
            flags.tensor[1 + 2 * layer] = value
            assert r.result() is None
            out, lse = unpack_states(box.buffer[2:6], HQ, 64, torch.float32)
            b = len(batch)
            want = ref.attend(layer, batch, q[:b], 64**-0.5)
            assert_close_rel(out[:b], want, torch.float32, f"step {step} layer {layer}")
            assert out[b:].eq(0).all() and lse[b:].eq(float("-inf")).all()
        st.ack.result()
    with pytest.raises(ValueError, match="rows needs a mailbox"):
        client.open_stream(range(3), 1, rids, [40, 3, 18], HQ, 64, torch.float32, rows=4)
    run_stream(client, rids, [40, 3, 18], [torch.randn(3, HQ, 64, generator=g)] * 3, [2, 0, 1])
    client.free(rids)
    box.close()
    flags.close()


def test_refused_streams_raise_and_the_node_keeps_serving(client):
    ref = ReferenceKV(CONFIG.layers)
    rids = fill(client, ref, {"r": 20}, seed=3)
    q = [torch.randn(1, HQ, 64) for _ in range(CONFIG.layers)]
    row = state_row_bytes(HQ, 64, torch.float32)
    cases = [(["ghost"], [3], range(3), 64, "unknown request 'ghost'"),
             (rids, [21], range(3), 64, "kv_len 21 for request 'r'"),
             (rids, [20], range(1, 4), 64, "layer 3 out of range"),
             (rids, [20], range(3), 32, "head_dim 32")]
    st = client.open_stream(range(3), 1, ["x", "y"], [1, 1], HQ, 64, torch.float32)
    with pytest.raises(RemoteError, match="names 2 requests; this node holds 1"):
        st.ack.result()  # refused before any buffer exists: nothing sent to drain
    for reqs, kv_len, layers, d, match in cases:
        st = client.open_stream(layers, 1, reqs, kv_len, HQ, d, torch.float32)
        qd = torch.randn(1, HQ, d)
        into = torch.zeros(1, state_row_bytes(HQ, d, torch.float32), dtype=torch.uint8)
        replies = [st.attend(layer, qd, into.clone()) for layer in layers]  # all are sent
        for r in replies:
            with pytest.raises(RemoteError, match=match):
                r.result()
        with pytest.raises(RemoteError, match=match):
            st.ack.result()
    out = run_stream(client, rids, [20], q, [0, 1, 2])  # still serving, same connection
    assert_close_rel(out[1][0], ref.attend(1, rids, q[1], 64**-0.5), torch.float32)
    assert client.stats()["requests"] == 1
    with pytest.raises(ValueError, match="q must be"):
        client.open_stream(range(3), 1, rids, [20], HQ, 64, torch.float32).attend(
            0, torch.randn(2, HQ, 64), torch.zeros(2, row, dtype=torch.uint8))
    st = client.open_stream(range(3), 1, rids, [20], HQ, 64, torch.float32)
    for layer in range(3):
        st.attend(layer, q[layer], torch.zeros(1, row, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not an unsent layer"):
        st.attend(0, q[0], torch.zeros(1, row, dtype=torch.uint8))
    st.ack.result()
    with pytest.raises(ValueError, match="1 to 254 consecutive layers"):
        client.open_stream(range(300), 1, rids, [20], HQ, 64, torch.float32)
    client.free(rids)


def test_a_stream_whose_queries_stop_is_given_up():
    c = InProc()
    c.server.streams.stream_deadline = 0.2
    ref = ReferenceKV(CONFIG.layers)
    rids = fill(c.client, ref, {"s": 9}, seed=4)
    row = state_row_bytes(HQ, 64, torch.float32)
    q = torch.randn(1, HQ, 64)
    st = c.client.open_stream(range(3), 1, rids, [9], HQ, 64, torch.float32)
    first = st.attend(0, q, torch.zeros(1, row, dtype=torch.uint8))
    first.result()  # answered; layers 1 and 2 never sent
    time.sleep(0.3)
    with pytest.raises(RemoteError, match="2 queries never came") as e:
        st.ack.result()
    assert e.value.kind == "timeout"
    assert not any(p.streams for p in c.server.peers)
    out = run_stream(c.client, rids, [9], [q, q, q], [0, 1, 2])
    assert_close_rel(out[2][0], ref.attend(2, rids, q, 64**-0.5), torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.timeout(300)
def test_cuda_stream_over_ucx_matches_reference():
    """A CUDA node process (bf16, captured attention graphs) answering streams whose
    queries and replies are CUDA buffers (cuda_ipc on one host; another GPU if there is
    one), several steps reusing the same buffers."""
    pytest.importorskip("ucxx", reason="the UCX transport needs the ucx extra")
    from kflume.comm.ucx import UcxTransport
    from kflume.node import NodeProcess

    gpu = "1,0" if torch.cuda.device_count() > 1 else "0"
    cfg = NodeConfig(layers=4, kv_heads=8, head_dim=128, capacity_tokens=1 << 17,
                     dtype="bfloat16", device="cuda")
    proc = NodeProcess(cfg, token=TOKEN, env={"CUDA_VISIBLE_DEVICES": gpu})
    t = UcxTransport(token=TOKEN)
    try:
        c = NodeClient.connect("n", t, proc.address, timeout=30.0)
        lengths = {i: n for i, n in enumerate([4097, 1, 300, 8191, 77, 0, 2048, 5])}
        rids, b, hq = list(lengths), len(lengths), 32  # GQA ratio 4
        g = torch.Generator().manual_seed(7)
        ref = ReferenceKV(cfg.layers)
        c.open(rids, [8191] * b)
        for layer in range(cfg.layers):
            k = torch.randn(b, 8191, 8, 128, generator=g).to(torch.bfloat16)
            v = torch.randn(b, 8191, 8, 128, generator=g).to(torch.bfloat16)
            c.append(layer, rids, [0] * b, [0] * b, k.cuda(), v.cuda())
            for i, rid in enumerate(rids):
                ref.extend(layer, rid, k[i, : lengths[rid]], v[i, : lengths[rid]])
        c.flush()
        row = state_row_bytes(hq, 128, torch.bfloat16)
        q = torch.zeros(b, hq, 128, dtype=torch.bfloat16, device="cuda")
        into = [torch.zeros(b, row, dtype=torch.uint8, device="cuda") for _ in range(4)]
        live = [i for i in rids if lengths[i]]
        for _ in range(3):
            st = c.open_stream(range(4), 1, rids, list(lengths.values()), hq, 128,
                               torch.bfloat16)
            for layer in range(4):
                q.copy_(torch.randn(b, hq, 128, generator=g).to(torch.bfloat16))
                st.attend(layer, q, into[layer]).result()  # q is reused by the next layer
                out, lse = unpack_states(into[layer], hq, 128, torch.bfloat16)
                want = ref.attend(layer, live, q[live].cpu(), 128**-0.5)
                assert_close_rel(out[live], want, torch.bfloat16, f"layer {layer}")
                assert (lse[5] == float("-inf")).all() and (out[5] == 0).all()
            st.ack.result()
        assert c.stats()["attend_streams"] == 3
        # through a mailbox in this process's GPU memory, which the node maps (CUDA IPC):
        # it reads each layer's q there once its post flag (shared memory) is up, and its
        # kernel writes the reply, doorbell last (two layers' graphs are captured after
        # each stream: the first step runs none of them, the last all)
        flags = SharedWords(4, cuda=True)
        pbox = Mailbox(b, row, 4, device="cuda", query_row_bytes=hq * 128 * 2, flags=flags)
        c.register_mailbox([pbox])
        queries = pbox.queries.view(torch.bfloat16).view(b, hq, 128)
        for step in range(3):  # a layer's graph, once captured, also fetches and delivers
            st = c.open_stream(range(4), 1, rids, list(lengths.values()), hq, 128,
                               torch.bfloat16, mailbox=(pbox, 0, 0),
                               pull=(0, 1, [step + 1] * 4))
            for layer in range(4):
                queries.copy_(torch.randn(b, hq, 128, generator=g).to(torch.bfloat16))
                torch.cuda.synchronize()
                r = st.expect(layer)
                flags.tensor[layer] = step + 1
                assert r.result() is None
                out, _ = unpack_states(pbox.buffer, hq, 128, torch.bfloat16)
                want = ref.attend(layer, live, queries[live].cpu(), 128**-0.5)
                assert_close_rel(out[live], want, torch.bfloat16, f"pulled layer {layer}")
            st.ack.result()
        c.close()
    finally:
        t.close()
        assert proc.stop() == 0


def test_node_trace_names_each_stream_layer_in_order():
    c = InProc()
    ref = ReferenceKV(CONFIG.layers)
    rids = fill(c.client, ref, {"t": 12}, seed=5)
    q = [torch.randn(1, HQ, 64) for _ in range(CONFIG.layers)]
    c.client.stats(reset_timings=True)
    t0 = time.perf_counter()
    st = c.client.open_stream(range(3), 1, rids, [12], HQ, 64, torch.float32)
    row = state_row_bytes(HQ, 64, torch.float32)
    replies = [st.attend(layer, q[layer], torch.zeros(1, row, dtype=torch.uint8))
               for layer in (2, 1, 0)]  # sent in reverse, run in order
    for r in replies:
        r.result()
    st.ack.result()
    info = c.client.stats(trace=5)
    trace = info["attend_trace"]
    assert [e[:2] for e in trace] == [[st.seq, 0], [st.seq, 1], [st.seq, 2]]
    for _, _, seen, launched, sent in trace:
        assert t0 <= seen <= launched <= sent <= time.perf_counter()
    assert info["attend_streams"] == 1 and info["attend_messages"] == 3
    # the other messages answered since the reset (which is one of them), and the
    # stream's acknowledgement: after its last layer was launched
    assert [e[1] for e in info["op_trace"]] == ["stats", "stream"]
    assert info["op_trace"][1][0] == st.seq
    *_, last_launched, acked = info["op_trace"][-1]
    assert trace[-1][3] <= last_launched <= acked <= time.perf_counter()
    t1 = time.perf_counter()
    k = torch.randn(1, 1, 2, 64)
    seq = c.client.append(0, rids, [12], [12], k, k).result().header.seq
    with pytest.raises(RemoteError, match="gap"):  # refused: not answered, not traced
        c.client.append(0, rids, [20], [20], k, k).result()
    *_, (s, op, seen, launched, sent) = c.client.stats(trace=5)["op_trace"]
    assert (s, op) == (seq, "append")
    assert t1 <= seen <= launched <= sent <= time.perf_counter()
    # the process's collector pauses: a full collection here is the last one
    n = c.client.stats()["gc_collections"]
    t2 = time.perf_counter()
    gc.collect()
    info = c.client.stats(trace=5)
    began, secs, gen = info["gc_trace"][-1]
    assert info["gc_collections"] >= n + 1 and gen == 2
    assert t2 <= began and 0 <= secs <= time.perf_counter() - t2
    with pytest.raises(RemoteError, match="trace must be an int"):
        c.client.stats(trace=513)
