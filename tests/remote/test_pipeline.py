"""LayerPipeline and CapturedRemoteAttention compute what the plain per-layer loop does."""

from __future__ import annotations

import pytest
import torch

from kflume import Cluster
from kflume.graph import CapturedRemoteAttention, SignalTimeout, StepServer
from kflume.weight import LayerPipeline

LAYERS, HQ, HKV, D, DIM = 3, 8, 2, 32, 64


class TinyModel:
    """Per-layer callables of a small attention stack (random weights, no RoPE)."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        w = lambda *s: torch.randn(*s, generator=g) * s[-1] ** -0.5  # noqa: E731
        self.w = [dict(q=w(HQ * D, DIM), k=w(HKV * D, DIM), v=w(HKV * D, DIM), o=w(DIM, HQ * D),
                       f=w(DIM, DIM)) for _ in range(LAYERS)]

    def before(self, layer, x):  # x: [b, DIM]
        w = self.w[layer]
        b = x.shape[0]
        return ((x @ w["q"].T).view(b, HQ, D), (x @ w["k"].T).view(b, HKV, D),
                (x @ w["v"].T).view(b, HKV, D))

    def after(self, layer, x, out):
        w = self.w[layer]
        x = x + out.reshape(x.shape[0], -1) @ w["o"].T
        return x + torch.tanh(x @ w["f"].T)


def make_cluster(prompts, seed, local=False):
    make = Cluster.local if local else Cluster.in_process
    cl = make(2, layers=LAYERS, kv_heads=HKV, head_dim=D, capacity_tokens=2048,
              range_tokens=11)
    remote = cl.attention(num_q_heads=HQ)
    for rid, n in prompts.items():
        cl.router.add_request(rid, n)
    cl.begin_step()
    g = torch.Generator().manual_seed(seed)
    for layer in range(LAYERS):
        for rid, n in prompts.items():
            remote.prefill(layer, rid, torch.randn(n, HKV, D, generator=g),
                           torch.randn(n, HKV, D, generator=g))
    return cl


def sequential(model, remote, x):
    for layer in range(LAYERS):
        q, k, v = model.before(layer, x)
        x = model.after(layer, x, remote(layer, q, k, v))
    return x


PROMPTS = {"a": 30, "b": 7, "c": 45, "d": 12, "e": 1}


def served_step(model, ref_cl, cl, cap, pipe, rows, server, g, advance=True):
    """One captured step on the CPU, served by `server`'s thread, against the plain
    per-layer loop on `ref_cl` (same inputs); then both clusters move a token on."""
    x = torch.randn(len(PROMPTS), DIM, generator=g)
    ref_cl.begin_step()
    cap.load(cl.begin_step())
    ref = sequential(model, ref_cl.remote, x)
    server.begin()  # the host thread serves this step's slots
    outs = pipe([x[r] for r in rows], rows)
    server.end()
    torch.testing.assert_close(torch.cat(outs), ref, rtol=1e-5, atol=1e-5)
    if advance:
        for c in (ref_cl, cl):
            c.end_step(wait=True)
            for rid in PROMPTS:
                c.router.advance(rid)


def captured_pipeline(cl, model, **kwargs):
    """Two micro-batches of PROMPTS through a CapturedRemoteAttention on `cl` (host
    signals, float32): (row ranges, the captured attention, the pipeline)."""
    rows = LayerPipeline(LAYERS, None, None, None, 2).split(len(PROMPTS))
    cap = CapturedRemoteAttention(cl.remote, batch=len(PROMPTS), num_layers=LAYERS,
                                  row_ranges=rows, dtype=torch.float32, **kwargs)
    return rows, cap, LayerPipeline(LAYERS, model.before, model.after, cap, 2)


@pytest.mark.parametrize("microbatches", [1, 2, 3])
def test_pipeline_matches_sequential(microbatches):
    model = TinyModel()
    ref_cl, cl = make_cluster(PROMPTS, 1), make_cluster(PROMPTS, 1)
    g = torch.Generator().manual_seed(2)
    for _ in range(4):  # decode steps
        x = torch.randn(len(PROMPTS), DIM, generator=g)
        for c in (ref_cl, cl):
            c.begin_step()
        ref = sequential(model, ref_cl.remote, x)
        pipe = LayerPipeline(LAYERS, model.before, model.after, cl.remote, microbatches)
        rows = pipe.split(len(PROMPTS))
        outs = pipe([x[r] for r in rows], rows)
        torch.testing.assert_close(torch.cat(outs), ref, rtol=1e-5, atol=1e-5)
        for c in (ref_cl, cl):
            c.end_step(wait=True)
            for rid in PROMPTS:
                c.router.advance(rid)


def test_captured_attention_with_host_signals_matches_eager():
    """The capturable path (gather, signals, host serving, scatter, merge) on CPU: the host
    side serves each step from a thread while the 'device' side runs the pipeline."""
    model = TinyModel(3)
    ref_cl, cl = make_cluster(PROMPTS, 4), make_cluster(PROMPTS, 4)
    pipe_rows = LayerPipeline(LAYERS, None, None, None, 2).split(len(PROMPTS))
    cap = CapturedRemoteAttention(cl.remote, batch=len(PROMPTS), num_layers=LAYERS,
                                  row_ranges=pipe_rows, max_nodes=3, dtype=torch.float32)
    pipe = LayerPipeline(LAYERS, model.before, model.after, cap, 2)
    server = StepServer(cap, timeout=20)
    g = torch.Generator().manual_seed(5)
    for step in range(6):
        if step == 3:  # a routing change between steps: a node joins, no new buffers
            cl.add_node()
        served_step(model, ref_cl, cl, cap, pipe, pipe_rows, server, g)
    assert cap.steps == 6 and "node2" in cap.lanes.names
    served = sum(c.stats()["attend_streams"] for c in cl.remote.clients.values())
    assert served >= 2 * 6  # one stream per (node, micro-batch) with rows, each step
    # A step nobody runs: serving gives up at its deadline and end() raises it.
    server.timeout = 0.5
    server.begin()
    with pytest.raises(SignalTimeout, match="not served within"):
        server.end()
    assert cap.signal.aborted
    # reset() makes the graph usable again: the next step pairs its posts and waits up
    # (still aborted, its waits would pass at once and the merge read stale replies)
    cap.reset()
    server.timeout = 20
    served_step(model, ref_cl, cl, cap, pipe, pipe_rows, server, g, advance=False)
    server.close()


def elsewhere(cap) -> None:
    """The step's mailboxes describe another host: nodes refuse them (messages)."""
    for box in cap.mailboxes:
        desc = box.describe()
        box.describe = lambda desc=desc: {**desc, "host": "elsewhere/0"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mailboxes", [True, False])
def test_captured_attention_over_node_processes(mailboxes):
    """`kflume node` processes over UCX loopback, CPU: nodes of this host read the
    queries from the send buffers once posted and deliver replies into the reply
    buffers, or (mailboxes of another host) get queries and answer with messages; a node
    joining mid-run gets the mailboxes when it first appears."""
    pytest.importorskip("ucxx", reason="the UCX transport needs the ucx extra")
    model = TinyModel(6)
    ref_cl = make_cluster(PROMPTS, 7)
    with make_cluster(PROMPTS, 7, local=True) as cl:
        rows, cap, pipe = captured_pipeline(cl, model, max_nodes=3)
        if not mailboxes:
            elsewhere(cap)
        g = torch.Generator().manual_seed(8)
        with StepServer(cap, timeout=60) as server:
            for step in range(5):
                if step == 2:
                    cl.add_node()
                served_step(model, ref_cl, cl, cap, pipe, rows, server, g)
            names = [n for n in cap.lanes.names if n]
            assert len(names) == 3  # the joined node is in the plan and holds rows
            lane = cap.lanes.names.index("node2")
            assert any(mb.shares[lane] and mb.shares[lane].requests for mb in cap.micro)
            assert all(cap.delivers(n) == mailboxes for n in names)
            streams = cap.serving.streams
            assert all((st.mail is not None) == mailboxes for st in streams.values())
            # A step nobody runs: serving gives up; reset() then waits until the nodes
            # have answered the given-up mailbox streams (cancelled), so nothing of them
            # lands later; the next step is right.
            server.timeout = 0.5
            server.begin()
            with pytest.raises(SignalTimeout):
                server.end()
            given_up = list(cap.serving.settling)  # the mailbox streams
            assert streams and len(given_up) == (len(streams) if mailboxes else 0)
            cap.reset()
            assert all(st.ack.done for st in given_up) and not cap.serving.settling
            # A step that fails partway (the model raises at layer 1): the first slots
            # were posted, the others not; the next steps still pair posts and waits
            server.begin()

            def broken(layer, state):
                if layer == 1:
                    raise RuntimeError("model failed")
                return model.before(layer, state)

            x = torch.randn(len(PROMPTS), DIM, generator=g)
            with pytest.raises(RuntimeError, match="model failed"):
                LayerPipeline(LAYERS, broken, model.after, cap, 2)(
                    [x[r] for r in rows], rows)
            with pytest.raises(SignalTimeout):
                server.end()
            cap.reset()
            server.timeout = 60
            served_step(model, ref_cl, cl, cap, pipe, rows, server, g, advance=False)
        cap.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("refuse", [False, True])
def test_a_joining_node_is_prepared_before_it_takes_rows(refuse):
    """add_node(wait=False) under a captured step: once its process is up, the node is
    connected at a boundary and prepared for the step's streams (the mailboxes
    registered, a node slot kept for it, its graphs of that slot captured:
    `CapturedRemoteAttention.prepare`), and enters the routing at a later boundary,
    once it has answered. A node that refuses the mailboxes (here: they name another
    host) joins all the same and answers with messages. Every step stays right."""
    pytest.importorskip("ucxx", reason="the UCX transport needs the ucx extra")
    model = TinyModel(12)
    ref_cl = make_cluster(PROMPTS, 13)
    with make_cluster(PROMPTS, 13, local=True) as cl:
        rows, cap, pipe = captured_pipeline(cl, model, max_nodes=4)
        g = torch.Generator().manual_seed(14)
        seen = []
        with StepServer(cap, timeout=60) as server:
            if refuse:  # (nodes 0 and 1 took them when the first plan was loaded)
                served_step(model, ref_cl, cl, cap, pipe, rows, server, g)
                elsewhere(cap)
            name = cl.add_node(wait=False)
            cl.processes[name].wait_ready()
            for _ in range(6):
                served_step(model, ref_cl, cl, cap, pipe, rows, server, g)
                seen.append((name in cap.lanes.names, name in cl.router.nodes(),
                             f"{name}: preparing" in cl.table()))
        assert seen[0] == (True, False, True)  # connected, a lane kept, not routed to
        assert seen[-1] == (True, True, False)
        assert cap.delivers(name) != refuse and cap.delivers("node0")
        lane = cap.lanes.names.index(name)
        assert any(mb.shares[lane] and mb.shares[lane].requests for mb in cap.micro)
        if not refuse:  # one prepared that then does not join gives its lane back
            for p in cl.remote.prepare_node("ghost", cl.clients["node1"]):
                p.result()
            assert "ghost" in cap.lanes.names
            cl.remote.forget_node("ghost")
            assert "ghost" not in cap.lanes.names and not cap.delivers("ghost")
        cap.close()


@pytest.mark.timeout(300)
def test_nodes_that_die_while_joining_are_dropped_and_the_steps_go_on(caplog):
    """add_node(wait=False) twice: one process dies before it listens, the other after
    (before it is connected). Each is logged, forgotten and stopped at a boundary; the
    steps stay right and the routing never names them."""
    pytest.importorskip("ucxx", reason="the UCX transport needs the ucx extra")
    model = TinyModel(15)
    ref_cl = make_cluster(PROMPTS, 16)
    with make_cluster(PROMPTS, 16, local=True) as cl:
        rows, cap, pipe = captured_pipeline(cl, model, max_nodes=4)
        g = torch.Generator().manual_seed(17)
        with StepServer(cap, timeout=60) as server:
            early, late = cl.add_node(wait=False), cl.add_node(wait=False)
            cl.processes[early].proc.kill()
            cl.processes[late].wait_ready()
            cl.processes[late].proc.kill()
            cl.processes[late].proc.wait()
            for _ in range(3):
                served_step(model, ref_cl, cl, cap, pipe, rows, server, g)
        for name in (early, late):
            assert name not in cl.router.nodes() and name not in cl.processes
            assert name not in cap.lanes.names
            assert f"node {name} could not join" in caplog.text
        assert not cl.joining.nodes
        cap.close()


def test_a_node_that_does_not_take_the_mailboxes_answers_with_messages(monkeypatch):
    """In one process the nodes can map the mailboxes too (shared memory); one whose
    registration fails (here: no answer in time) is served with messages, and load()
    goes on as if it had never asked."""
    from kflume.comm import TransportError
    from kflume.comm.mailbox import host_id

    model = TinyModel(9)
    ref_cl, cl = make_cluster(PROMPTS, 10), make_cluster(PROMPTS, 10)
    for c in cl.remote.clients.values():
        monkeypatch.setattr(c.conn, "info", {"host": host_id()}, raising=False)
    refuse = cl.remote.clients["node1"]

    def no_answer(boxes, wait=True):
        raise TransportError("node1: no answer")

    monkeypatch.setattr(refuse, "register_mailbox", no_answer)
    rows = LayerPipeline(LAYERS, None, None, None, 2).split(len(PROMPTS))
    cap = CapturedRemoteAttention(cl.remote, batch=len(PROMPTS), num_layers=LAYERS,
                                  row_ranges=rows, max_nodes=2, dtype=torch.float32)
    pipe = LayerPipeline(LAYERS, model.before, model.after, cap, 2)
    g = torch.Generator().manual_seed(11)
    with StepServer(cap, timeout=20) as server:
        for _ in range(2):
            served_step(model, ref_cl, cl, cap, pipe, rows, server, g)
    assert cap.delivers("node0") and not cap.delivers("node1")
    cap.close()
