"""GraphSignal and CapturedRemoteAttention inside real CUDA graphs (GPU machine)."""

from __future__ import annotations

import time

import pytest
import torch

from kflume import CapturedStep, Cluster
from kflume.graph import GraphSignal, warm_and_capture

pytestmark = pytest.mark.cuda

def capture(fn, stream):
    """Warm `fn` up eagerly, then capture it (the usual torch recipe)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph


@pytest.mark.timeout(120)
def test_signal_orders_device_and_host_work():
    """Graph: a = x + 1; post; wait; b = a * h, where the host writes h before releasing.
    1000 replays with a new h each time: b is right every time, and nothing hangs."""
    sig = GraphSignal(2, "cuda")
    x = torch.randn(1 << 16, device="cuda")
    a = torch.empty_like(x)
    b = torch.empty_like(x)
    h = torch.zeros(1, pin_memory=True)
    h_dev = torch.zeros(1, device="cuda")
    seen = torch.zeros(1 << 16, pin_memory=True)
    s = torch.cuda.Stream()

    def step():
        torch.add(x, 1, out=a)
        sig.post(0)
        sig.wait(0)
        h_dev.copy_(h, non_blocking=True)  # reads the host's value after the release
        torch.mul(a, h_dev, out=b)
        sig.post(1)  # the host may read b now
        sig.wait(1)


    def host(i):
        sig.wait_posted(0, timeout=10)
        h[0] = float(i % 7 + 1)
        sig.release(0)
        sig.wait_posted(1, timeout=10)
        if i % 250 == 0:
            seen.copy_(b.cpu())
        sig.release(1)

    graph = warm_and_capture(step, s, lambda: host(0), timeout=30)
    torch.testing.assert_close(b, (x + 1) * 1)  # the eager warm-up ran (capture does not)
    for i in range(1, 1001):
        with torch.cuda.stream(s):
            graph.replay()
        host(i)
        s.synchronize()
        if i % 250 == 0:
            torch.testing.assert_close(seen, ((x + 1) * (i % 7 + 1)).cpu())
    torch.testing.assert_close(b, (x + 1) * (1000 % 7 + 1))


@pytest.mark.timeout(60)
def test_abort_lets_a_waiting_graph_finish():
    sig = GraphSignal(1, "cuda")
    s = torch.cuda.Stream()
    y = torch.zeros(4, device="cuda")
    y.add_(1)  # the add kernel is loaded before anything waits
    graph = capture(lambda: (sig.post(0), sig.wait(0), y.add_(1)), s)
    with torch.cuda.stream(s):
        graph.replay()
    sig.wait_posted(0, timeout=10)
    sig.abort()  # e.g. the host side failed: the graph must not hang
    s.synchronize()
    assert y.sum().item() == 8
    sig.reset()  # the replay finished: the next one waits for its release again
    with torch.cuda.stream(s):
        graph.replay()
    sig.wait_posted(0, timeout=10)
    time.sleep(0.05)
    assert y.sum().item() == 8  # held at the wait
    sig.release(0)
    s.synchronize()
    assert y.sum().item() == 12


LAYERS, HQ, HKV, D, DIM = 3, 8, 2, 64, 128


def _model(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = lambda *sh: torch.randn(*sh, generator=g, device="cuda") * sh[-1] ** -0.5  # noqa: E731
    W = [dict(q=w(HQ * D, DIM), k=w(HKV * D, DIM), v=w(HKV * D, DIM), o=w(DIM, HQ * D))
         for _ in range(LAYERS)]

    def before(layer, x):
        b = x.shape[0]
        return ((x @ W[layer]["q"].T).view(b, HQ, D), (x @ W[layer]["k"].T).view(b, HKV, D),
                (x @ W[layer]["v"].T).view(b, HKV, D))

    def after(layer, x, out):
        return x + out.reshape(x.shape[0], -1) @ W[layer]["o"].T

    return before, after


def _fill(cl, prompts: dict) -> None:
    """The cluster's weight-node side on this GPU, with `prompts` (id -> tokens) routed
    and their random KV prefilled into every layer."""
    cl.attention(num_q_heads=HQ, device="cuda")
    for rid, n in prompts.items():
        cl.router.add_request(rid, n)
    cl.begin_step()
    g = torch.Generator(device="cuda").manual_seed(1)
    for layer in range(LAYERS):
        for rid, n in prompts.items():
            k = torch.randn(n, HKV, D, device="cuda", generator=g)
            v = torch.randn(n, HKV, D, device="cuda", generator=g)
            cl.remote.prefill(layer, rid, k, v)
    cl.end_step(wait=True)


def _eager(cl, before, after, x_in):
    """The step run eagerly through the cluster's RemoteAttention (one message per
    layer) on the plan of the boundary just made: the reference the captured step on the
    same input is checked against (which then rewrites its appends with the same
    values)."""
    x = x_in.clone()
    for layer in range(LAYERS):
        q, k, v = before(layer, x)
        x = after(layer, x, cl.remote(layer, q, k, v))
    cl.end_step(wait=True)
    torch.cuda.synchronize()
    return x


@pytest.mark.timeout(600)
def test_captured_step_1000_replays_with_plan_changes():
    """A whole step (3 layers, 2 micro-batches) in one graph (`CapturedStep`), attention
    on in-process nodes served from the host between post and wait. The plan changes
    between replays (tokens appended every step, a node joins at replay 300): no
    recapture. Every 50th replay is checked against the eager RemoteAttention run just
    before it on the same cluster and inputs. The nodes capture no graph while the step
    runs (a capture there hung in the driver), only at the boundary."""
    prompts = {"a": 300, "b": 17, "c": 1000, "d": 64}
    cl = Cluster.in_process(2, layers=LAYERS, kv_heads=HKV, head_dim=D, dtype="float32",
                            capacity_tokens=8192, device="cuda", range_tokens=250)
    _fill(cl, prompts)
    before, after = _model(2)
    step = CapturedStep(cl, num_layers=LAYERS, before=before, after=after, microbatches=2,
                        max_nodes=3, device="cuda")

    def captured() -> int:  # graphs the in-process nodes have captured so far
        return sum(node.stats()["graphs_captured"] for node, _ in cl.provider.nodes.values())

    marks = []
    boundary = cl.begin_step

    def begin_step():  # what the nodes had captured once the boundary was over
        plan = boundary()
        marks.append(captured())
        return plan

    cl.begin_step = begin_step
    gen = torch.Generator(device="cuda").manual_seed(3)
    checked = during = 0
    for i in range(1000):
        if i == 300:
            cl.add_node(8192)
        step.boundary()
        x = torch.randn(len(prompts), 128, device="cuda", generator=gen)
        ref = _eager(cl, before, after, x) if i % 50 == 0 or i == 999 else None
        out = step(x)
        during += captured() - marks[-1]
        if ref is not None:
            torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)
            checked += 1
            if i % 200 == 0:
                print(f"replay {i}: ok", flush=True)
    cap = step.captured
    assert cap.steps >= 999 and checked == 21 and "node2" in cap.lanes.names
    assert during == 0 and captured() > 0  # the shapes were captured, between steps
    step.close()
    cl.close()


@pytest.mark.timeout(600)
def test_captured_step_over_a_node_process_with_mailboxes():
    """A `kflume node` process on the other GPU (or this one): it reads each layer's
    queries from the step's mailbox once posted and delivers its replies there. 60 steps
    with tokens appended every step, a request added (a new batch size: another graph)
    and finished; every 10th checked against the eager RemoteAttention run just before
    it on the same inputs."""
    pytest.importorskip("ucxx", reason="node processes talk UCX")
    two = torch.cuda.device_count() > 1
    prompts = {"a": 300, "b": 17, "c": 1000, "d": 64}
    with Cluster.local(1, layers=LAYERS, kv_heads=HKV, head_dim=D, dtype="float32",
                       capacity_tokens=8192, device="cuda", range_tokens=250,
                       env={"CUDA_VISIBLE_DEVICES": "1,0" if two else "0"}) as cl:
        _fill(cl, prompts)
        before, after = _model(4)
        step = CapturedStep(cl, num_layers=LAYERS, before=before, after=after,
                            microbatches=2, max_nodes=2, device="cuda")
        gen = torch.Generator(device="cuda").manual_seed(3)
        checked = 0
        for i in range(60):
            if i == 20:  # a new request: prefilled at a boundary of its own, then stepped
                cl.router.add_request("e", 40)
                cl.begin_step()
                for layer in range(LAYERS):
                    kv = torch.randn(40, HKV, D, device="cuda", generator=gen)
                    cl.remote.prefill(layer, "e", kv, kv)
                cl.end_step(wait=True)
            if i == 40:
                cl.router.finish_request("b")
            b = len(step.boundary().requests)
            x = torch.randn(b, 128, device="cuda", generator=gen)
            ref = _eager(cl, before, after, x) if i % 10 == 0 else None
            out = step(x)
            if i == 0:  # the node captured its streams' graphs when first prepared
                assert cl.clients["node0"].stats()["graphs_captured"] >= 2 * LAYERS
            if ref is not None:
                torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)
                checked += 1
        assert checked == 6 and step.captured.delivers("node0")
        assert sorted(step.batch_sizes) == [4, 5]  # "e" joined: 5 rows; "b" left: 4 again
        step.close()


@pytest.mark.timeout(600)
def test_captured_step_with_replicas_loses_a_node_process_and_recomputes_nothing():
    """Three `kflume node` processes on this GPU holding every token twice
    (`replicas=2`); one is killed (SIGKILL) between captured steps: its copies take over
    at the next boundary, nothing is recomputed, and the steps stay equal to the eager
    RemoteAttention run on the same inputs."""
    pytest.importorskip("ucxx", reason="node processes talk UCX")
    prompts = {"a": 300, "b": 17, "c": 1000, "d": 64}
    with Cluster.local(3, layers=LAYERS, kv_heads=HKV, head_dim=D, dtype="float32",
                       capacity_tokens=8192, device="cuda", range_tokens=250,
                       replicas=2) as cl:
        cl.recompute = lambda r: pytest.fail(f"recomputed {r}")
        _fill(cl, prompts)
        before, after = _model(5)
        step = CapturedStep(cl, num_layers=LAYERS, before=before, after=after,
                            microbatches=2, max_nodes=3, device="cuda")
        gen = torch.Generator(device="cuda").manual_seed(4)
        victim = None
        for i in range(24):
            plan = step.boundary()
            x = torch.randn(len(plan.requests), 128, device="cuda", generator=gen)
            ref = _eager(cl, before, after, x) if i % 4 == 0 or i in (11, 12) else None
            out = step(x)
            if ref is not None:
                torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)
            if i == 10:  # lost at the next boundary
                victim = plan.routes["c"][0].node
                cl.processes[victim].kill()
                cl.processes[victim].proc.wait(10)
        assert victim in cl.recovery.lost and victim not in cl.router.nodes()
        assert cl.router.replica_stats().unreplicated_tokens == 0
        step.close()
