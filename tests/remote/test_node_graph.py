"""AttendGraphs and the node's graph path: the same attention as the per-layer kernel call.

On CPU AttendGraphs runs its buffers eagerly (shifted page tables into one flattened pool,
lengths copied once per batch, one result buffer cloned per call); on CUDA it captures a
graph per batch shape and replays it across layers and steps.
"""

from __future__ import annotations

import pytest
import torch

from kflume.comm.wire import pack_states, state_row_bytes, unpack_states
from kflume.kernels.reference import split_kv_attention_ref
from kflume.node import AttentionNode, NodeConfig
from kflume.node.graphs import AttendGraphs
from kflume.node.pages import DeviceBatch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _pools(layers, pages, page_size, hkv, d, dtype, device, gen):
    shape = (layers, pages, page_size, hkv, d)
    return (torch.randn(shape, generator=gen).to(device, dtype),
            torch.randn(shape, generator=gen).to(device, dtype))


def _ref(q, kp, vp, layer, pt, lens, scale):
    start = torch.zeros_like(lens)
    return split_kv_attention_ref(q.double().cpu(), kp[layer].double().cpu(),
                                  vp[layer].double().cpu(), pt.cpu(), start.cpu(), lens.cpu(),
                                  scale)


def _batch(pt, lens) -> DeviceBatch:
    return DeviceBatch(pt, lens, torch.zeros_like(lens))


def _attend(graphs, layer, q, pt, lens, scale, out=None):
    """`AttendGraphs.attend` as (out, lse) views of its reply."""
    res = graphs.attend(layer, q, _batch(pt, lens), scale, out=out)
    return unpack_states(res, q.shape[1], q.shape[2], q.dtype)


def _close(out, lse, ref_out, ref_lse, lens, dtype):
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    rows = lens.cpu() > 0
    o, r = out.double().cpu()[rows], ref_out[rows]
    assert torch.isfinite(o).all()
    assert (o - r).norm() <= tol * r.norm()
    torch.testing.assert_close(lse.double().cpu()[rows], ref_lse[rows], rtol=tol, atol=tol)
    assert (lse.cpu()[~rows] == float("-inf")).all() and (out.cpu()[~rows] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group,d,page_size", [(1, 64, 16), (4, 128, 16), (8, 64, 7)])
def test_graphs_match_the_reference_across_layers_steps_and_shapes(device, group, d, page_size):
    gen = torch.Generator().manual_seed(group * d + page_size)
    layers, pages, hkv = 3, 40, 2
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kp, vp = _pools(layers, pages, page_size, hkv, d, dtype, device, gen)
    graphs = AttendGraphs(kp, vp)
    scale = d**-0.5
    for b, width, steps in ((3, 5, 3), (3, 9, 2), (1, 5, 2), (3, 5, 1)):
        for step in range(steps):
            pt = torch.randperm(pages, generator=gen)[: b * width].view(b, width)
            pt = pt.to(device, torch.int32)
            lens = torch.randint(0, width * page_size + 1, (b,), generator=gen)
            lens[0] = 0 if step == 0 else width * page_size - 1  # empty, then odd and long
            lens = lens.to(device, torch.int32)
            for layer in (2, 0, 1):
                q = torch.randn(b, hkv * group, d, generator=gen).to(device, dtype)
                out, lse = _attend(graphs, layer, q, pt, lens, scale)
                _close(out, lse, *_ref(q, kp, vp, layer, pt, lens, scale), lens, dtype)
    if device == "cuda":  # one graph per (batch, page-table width): reused across layers
        assert graphs.captured == 3


@pytest.mark.parametrize("device", DEVICES)
def test_results_survive_the_next_call_and_fill_given_buffers(device):
    """A reply may still be in flight when the next message replays the same graph."""
    gen = torch.Generator().manual_seed(1)
    kp, vp = _pools(2, 12, 16, 2, 64, torch.float32, device, gen)
    graphs = AttendGraphs(kp, vp)
    pt = torch.arange(8, dtype=torch.int32, device=device).view(2, 4)
    lens = torch.tensor([50, 17], dtype=torch.int32, device=device)
    q1, q2 = (torch.randn(2, 4, 64, generator=gen).to(device) for _ in range(2))
    first = graphs.attend(0, q1, _batch(pt, lens), 0.125)
    keep = first.clone()
    into = torch.full_like(first, 255)
    second = graphs.attend(1, q2, _batch(pt, lens), 0.125, out=into)
    assert second is into
    assert torch.equal(first, keep)
    o2, s2 = unpack_states(second, 4, 64, torch.float32)
    _close(o2, s2, *_ref(q2, kp, vp, 1, pt, lens, 0.125), lens, torch.float32)
    assert torch.equal(second, pack_states(o2, s2))


def test_graphs_need_one_allocation_per_pool():
    kp = torch.zeros(2, 4, 16, 2, 64)[:, :3]
    with pytest.raises(ValueError, match="contiguous pools"):
        AttendGraphs(kp, kp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group,d,page_size", [(1, 128, 16), (4, 64, 16), (8, 64, 5)])
def test_stream_graphs_read_and_write_the_stream_buffers(device, group, d, page_size):
    """A stream's layer i reads q[i] where it lands and writes reply i in place: through
    the per-shape graph until `capture_pending` captured the layer's own graph, then by
    that graph alone. The same buffers serve the next stream with new lengths and page
    tables, a stream may start at any layer, and an evicted set starts over."""
    gen = torch.Generator().manual_seed(group + d + page_size)
    layers, pages, hkv = 4, 48, 2
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kp, vp = _pools(layers, pages, page_size, hkv, d, dtype, device, gen)
    graphs = AttendGraphs(kp, vp, max_streams=1)
    # b=4: every layer's buffers 16-byte aligned, so every layer gets its graph (a layer
    # whose buffers are not, e.g. b=3 with 2 heads, stays on the per-shape graph)
    hq, scale, b, width = hkv * group, d**-0.5, 4, 6
    row = state_row_bytes(hq, d, dtype)
    bufs = [(torch.zeros(3, b, hq, d, dtype=dtype, device=device),
             torch.zeros(3, b, row, dtype=torch.uint8, device=device)) for _ in range(2)]
    captured = []
    for step, (span, which) in enumerate(((range(0, 3), 0), (range(1, 4), 0), (range(0, 3), 0),
                                          (range(0, 3), 1), (range(0, 3), 0))):
        q, res = bufs[which]
        pt = torch.randperm(pages, generator=gen)[: b * width].view(b, width)
        pt = pt.to(device, torch.int32)
        lens = torch.randint(0, width * page_size + 1, (b,), generator=gen)
        lens[step % b] = 0 if step % 2 else width * page_size - 1  # empty, odd and full
        lens = lens.to(device, torch.int32)
        run = graphs.stream(span, q, res, _batch(pt, lens), scale)
        for i in (2, 0, 1):  # layers may land in any order
            q[i].copy_(torch.randn(b, hq, d, generator=gen).to(device, dtype))
            res[i].fill_(255)  # NaN bytes: every byte must be written
            run(i)
            out, lse = unpack_states(res[i], hq, d, dtype)
            _close(out, lse, *_ref(q[i], kp, vp, span[i], pt, lens, scale), lens, dtype)
        captured.append(graphs.capture_pending(limit=2))
    if device == "cuda":
        # A set is buffers and a first layer: each stream here is a set the one before
        # evicted (max_streams=1), so it starts over, 2 of its layers captured after it.
        # Plus one per-shape graph for the uncaptured layers.
        assert captured == [2, 2, 2, 2, 2]
        assert graphs.captured == 10 + 1
    else:
        assert captured == [0] * 5  # eager from the start


def test_attend_stream_checks_its_buffers():
    node = AttentionNode(NodeConfig(layers=2, kv_heads=2, head_dim=64, capacity_tokens=64,
                                    dtype="float32"))
    node.append(0, ["a"], [0], [0], torch.randn(1, 5, 2, 64), torch.randn(1, 5, 2, 64))
    node.append(1, ["a"], [0], [0], torch.randn(1, 5, 2, 64), torch.randn(1, 5, 2, 64))
    q, row = torch.zeros(2, 1, 8, 64), state_row_bytes(8, 64, torch.float32)
    out = torch.zeros(2, 1, row, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"q must be \[2, R >= 1, Hq, 64\]"):
        node.attend_stream(range(2), ["a"], [5], q[:1], out)
    node.append(0, ["b"], [0], [0], torch.randn(1, 3, 2, 64), torch.randn(1, 3, 2, 64))
    with pytest.raises(ValueError, match=r"q must be \[1, R >= 2, Hq, 64\]"):
        node.attend_stream(range(1), ["a", "b"], [5, 3], q[:1], out[:1])  # 1 row, 2 requests
    with pytest.raises(TypeError, match="q must be float32"):
        node.attend_stream(range(2), ["a"], [5], q.double(), out)
    with pytest.raises(ValueError, match=f"out must be uint8 \\[2, 1, {row}\\]"):
        node.attend_stream(range(2), ["a"], [5], q, out[:, :, :-1])
    with pytest.raises(ValueError, match="kv_len 6"):
        node.attend_stream(range(2), ["a"], [6], q, out)
    run = node.attend_stream(range(2), ["a"], [5], q.normal_(), out)
    run(1)
    got = unpack_states(out[1], 8, 64, torch.float32)
    want = node.attend(1, ["a"], [5], q[1])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_attend_stream_pads_rows_past_the_requests():
    """A stream's buffers may have more rows than its batch (a mailbox place's, which
    stays the same while the batch changes): the requests' rows are what attend gives,
    the rest attend over nothing, (0, -inf)."""
    node = AttentionNode(NodeConfig(layers=2, kv_heads=2, head_dim=64, capacity_tokens=256,
                                    dtype="float32"))
    for rid, n in (("a", 5), ("b", 33)):
        node.append(0, [rid], [0], [0], torch.randn(1, n, 2, 64), torch.randn(1, n, 2, 64))
        node.append(1, [rid], [0], [0], torch.randn(1, n, 2, 64), torch.randn(1, n, 2, 64))
    q, row = torch.randn(2, 4, 8, 64), state_row_bytes(8, 64, torch.float32)
    out = torch.full((2, 4, row), 7, dtype=torch.uint8)
    run = node.attend_stream(range(2), ["b", "a"], [30, 5], q, out)
    for i in range(2):
        run(i)
        o, lse = unpack_states(out[i], 8, 64, torch.float32)
        want = node.attend(i, ["b", "a"], [30, 5], q[i, :2])
        torch.testing.assert_close((o[:2], lse[:2]), want, rtol=0, atol=0)
        assert o[2:].eq(0).all() and lse[2:].eq(float("-inf")).all()


def _capturing_on_cpu(monkeypatch, gen, **kwargs):
    """AttendGraphs over CPU pools that runs a CUDA node's bookkeeping: a "capture"
    returns the eager launch (the real one needs a GPU) and refuses a replay (a graph
    captured twice); `captures` counts them."""
    kp, vp = _pools(3, 30, 16, 2, 128, torch.float32, "cpu", gen)
    graphs = AttendGraphs(kp, vp, **kwargs)
    graphs.capturing = True
    captures = []

    def capture(launch):
        assert not getattr(launch, "replay", False), "a graph captured twice"
        captures.append(True)

        def replay():
            launch()
        replay.replay = True
        graphs.captured += 1
        return replay

    monkeypatch.setattr(graphs, "_capture", capture)
    return kp, vp, graphs, captures


def test_shapes_first_seen_while_serving_wait_for_capture_pending(monkeypatch):
    """`capture_while_serving=False` (an in-process node on the GPU of a step that waits
    on it): new batch shapes run uncaptured and right, and are captured only by
    capture_pending(), each once, the pending ones evicted past `max_graphs` included
    (dropped, then made again when they come back); evicting waits for the device."""
    gen = torch.Generator().manual_seed(7)
    kp, vp, graphs, captures = _capturing_on_cpu(monkeypatch, gen, max_graphs=2,
                                                 capture_while_serving=False)
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    b, hq = 3, 4
    lens = torch.tensor([40, 0, 17], dtype=torch.int32)

    def serve(width):
        pt = torch.randperm(30, generator=gen)[: b * width].view(b, width).int()
        q = torch.randn(b, hq, 128, generator=gen)
        for layer in (0, 2):
            out, lse = _attend(graphs, layer, q, pt, lens, 0.1)
            _close(out, lse, *_ref(q, kp, vp, layer, pt, lens, 0.1), lens, torch.float32)

    for width in (3, 5, 7):
        serve(width)
    assert captures == [] and syncs == []  # nothing while serving, nothing evicted yet
    assert graphs.capture_pending(limit=1) == 1  # width 7; then 3 evicted (pending)
    assert len(syncs) == 1
    serve(3)  # back: made again, uncaptured
    assert graphs.capture_pending(None) == 2  # widths 5 and 3, once each
    assert graphs.capture_pending(None) == 0 and len(captures) == 3
    for width in (3, 7):  # replays of the captured ones, still right
        serve(width)


def test_stream_layers_wait_for_capture_pending_and_skip_misaligned_buffers(monkeypatch):
    """The bookkeeping a CUDA node runs, on CPU: a "capture" here returns the eager launch
    (the real one needs a GPU). Layers go through the per-shape path until
    capture_pending() took them, at most `limit` a call; a layer whose buffers are not
    16-byte aligned is never captured and keeps being served right."""
    gen = torch.Generator().manual_seed(3)
    kp, vp, graphs, captures = _capturing_on_cpu(monkeypatch, gen)
    b, hq, width = 3, 2, 4  # a reply row of 1032 bytes: layer 1's buffers sit 8 bytes off
    row = state_row_bytes(hq, 128, torch.float32)
    q = torch.zeros(3, b, hq, 128)
    res = torch.zeros(3, b, row, dtype=torch.uint8)
    pt = torch.randperm(30, generator=gen)[: b * width].view(b, width).int()
    lens = torch.tensor([64, 0, 37], dtype=torch.int32)
    counts = []
    for _ in range(3):
        run = graphs.stream(range(3), q, res, _batch(pt, lens), 0.1)
        for i in range(3):
            q[i].normal_(generator=gen)
            run(i)
            out, lse = unpack_states(res[i], hq, 128, torch.float32)
            _close(out, lse, *_ref(q[i], kp, vp, i, pt, lens, 0.1), lens, torch.float32)
        counts.append(graphs.capture_pending(limit=1))
    assert counts == [1, 1, 0]  # layers 0 and 2; layer 1 is misaligned
    assert len(captures) == 3  # the per-shape graph, then 2 layers


def test_capture_set_captures_every_layer_before_the_first_stream(monkeypatch):
    """`capture_set` captures a stream set's layers at once (the kernels run first on lengths
    of 0, so no capture warms them), before any stream: the first stream on those buffers
    replays every layer, with nothing left for capture_pending, and computes the same as
    the per-layer kernel, however wide the node's page table has grown since (a set's
    table is as wide as a layer's pages). `now=False` leaves them to capture_pending."""
    gen = torch.Generator().manual_seed(5)
    kp, vp, graphs, captures = _capturing_on_cpu(monkeypatch, gen)
    rows, hq = 4, 4  # 2064-byte reply rows: every layer 16-byte aligned
    q = torch.zeros(3, rows, hq, 128)
    res = torch.zeros(3, rows, state_row_bytes(hq, 128, torch.float32), dtype=torch.uint8)
    assert graphs.capture_set(0, q, res, 0.1) == 3
    assert graphs.capture_set(0, q, res, 0.1) == 0  # done already
    assert len(captures) == 3
    lens = torch.tensor([64, 1, 37, 0], dtype=torch.int32)  # the last row: padding
    for width in (4, 7, 48):  # the node's table grew wider (48: than a layer's 30 pages,
        # as a table that doubles can): the same graphs
        pt = torch.zeros(rows, width, dtype=torch.int32)
        pt[:, : min(width, 7)] = torch.randperm(30, generator=gen)[: rows * min(width, 7)].view(
            rows, -1)
        run = graphs.stream(range(3), q, res, _batch(pt, lens), 0.1)
        for i in (0, 1, 2):
            q[i].normal_(generator=gen)
            run(i)
            out, lse = unpack_states(res[i], hq, 128, torch.float32)
            _close(out, lse, *_ref(q[i], kp, vp, i, pt, lens, 0.1), lens, torch.float32)
        assert graphs.capture_pending(limit=8) == 0
    assert len(captures) == 3  # no per-shape graph was needed
    q2, res2 = torch.zeros_like(q), torch.zeros_like(res)  # another place, later
    assert graphs.capture_set(0, q2, res2, 0.1, now=False) == 0
    assert graphs.capture_pending(limit=2) == 2 and graphs.capture_pending(limit=2) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("group,d,page_size", [(4, 128, 16), (8, 64, 5)])
def test_cuda_graphs_captured_ahead_serve_the_first_stream(group, d, page_size):
    """On a GPU: `capture_set` captures every layer of a set before its first stream (no
    per-shape graph, nothing left pending), and those graphs compute the reference on
    the streams' lengths and page tables, padding rows (0, -inf) included, as the node's
    table grows wider."""
    gen = torch.Generator().manual_seed(group * d)
    kp, vp = _pools(3, 48, page_size, 2, d, torch.bfloat16, "cuda", gen)
    graphs = AttendGraphs(kp, vp)
    hq, rows = 2 * group, 4
    q = torch.zeros(3, rows, hq, d, dtype=torch.bfloat16, device="cuda")
    res = torch.zeros(3, rows, state_row_bytes(hq, d, torch.bfloat16), dtype=torch.uint8,
                      device="cuda")
    assert graphs.capture_set(0, q, res, d**-0.5) == 3 and graphs.captured == 3
    for step, width in enumerate((5, 11)):
        pt = torch.randperm(48, generator=gen)[: rows * width].view(rows, width)
        lens = torch.tensor([width * page_size - 1, 1 + step, 0, 0])  # odd, short, padding
        pt, lens = pt.to("cuda", torch.int32), lens.to("cuda", torch.int32)
        run = graphs.stream(range(3), q, res, _batch(pt, lens), d**-0.5)
        for i in (1, 2, 0):
            q[i].copy_(torch.randn(rows, hq, d, generator=gen).to("cuda", torch.bfloat16))
            res[i].fill_(255)
            run(i)
            out, lse = unpack_states(res[i], hq, d, torch.bfloat16)
            _close(out, lse, *_ref(q[i], kp, vp, i, pt, lens, d**-0.5), lens, torch.bfloat16)
        assert graphs.capture_pending(limit=8) == 0
    assert graphs.captured == 3
