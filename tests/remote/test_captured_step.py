"""CapturedStep on the CPU (its eager path, served the same way as a captured graph):
every step equals the plain per-layer loop over RemoteAttention, while nodes join,
requests come and go (new batch sizes) and a step fails."""

from __future__ import annotations

import pytest
import torch

from kflume import CapturedStep, Cluster

LAYERS, HQ, HKV, D, DIM = 3, 8, 2, 32, 64


class TinyModel:
    """Per-layer halves of a small attention stack; the state is (x [b, DIM], scale [b])."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        w = lambda *s: torch.randn(*s, generator=g) * s[-1] ** -0.5  # noqa: E731
        self.w = [dict(q=w(HQ * D, DIM), k=w(HKV * D, DIM), v=w(HKV * D, DIM), o=w(DIM, HQ * D))
                  for _ in range(LAYERS)]
        self.embedding = w(32, DIM)
        self.fail_at = None
        self.on_layer = None  # called with each layer's index before its work

    def embed(self, ids, scale):
        return self.embedding[ids] * scale[:, None], scale

    def before(self, layer, state):
        if self.on_layer is not None:
            self.on_layer(layer)
        if layer == self.fail_at:
            raise RuntimeError("model failed")
        x, w = state[0], self.w[layer]
        b = x.shape[0]
        return ((x @ w["q"].T).view(b, HQ, D), (x @ w["k"].T).view(b, HKV, D),
                (x @ w["v"].T).view(b, HKV, D))

    def after(self, layer, state, out):
        x, scale = state
        return x + out.reshape(x.shape[0], -1) @ self.w[layer]["o"].T, scale

    def head(self, state):
        return state[0]


def eager(cl, model, ids, scale):
    """The same step through RemoteAttention, one layer after another, on the plan of the
    boundary just made (its appends the captured step then rewrites with equal values)."""
    state = model.embed(ids, scale)
    for layer in range(LAYERS):
        q, k, v = model.before(layer, state)
        state = model.after(layer, state, cl.remote(layer, q, k, v))
    cl.end_step(wait=True)
    return model.head(state)


def prefill(cl, prompts, seed):
    for rid, n in prompts.items():
        cl.router.add_request(rid, n)
    cl.begin_step()
    g = torch.Generator().manual_seed(seed)
    for layer in range(LAYERS):
        for rid, n in prompts.items():
            cl.remote.prefill(layer, rid, torch.randn(n, HKV, D, generator=g),
                              torch.randn(n, HKV, D, generator=g))
    cl.end_step(wait=True)


@pytest.mark.parametrize("microbatches", [1, 2])
def test_steps_equal_the_eager_loop_while_nodes_and_requests_change(microbatches):
    cl = Cluster.in_process(2, layers=LAYERS, kv_heads=HKV, head_dim=D, q_heads=HQ,
                            capacity_tokens=2048, range_tokens=9)
    prefill(cl, {"a": 30, "b": 7, "c": 45, "d": 12}, seed=1)
    model = TinyModel(2)
    step = CapturedStep(cl, num_layers=LAYERS, before=model.before, after=model.after,
                        embed=model.embed, head=model.head, microbatches=microbatches,
                        max_nodes=3)
    g = torch.Generator().manual_seed(3)
    for i in range(10):
        if i == 3:
            cl.add_node()  # joins at the next boundary: no new buffers
        if i == 5:  # a new request: prefilled at a boundary of its own, a new batch size
            prefill(cl, {"e": 19}, seed=4)
        if i == 7:
            cl.router.finish_request("b")
        plan = step.boundary()
        b = len(plan.requests)
        ids, scale = torch.randint(0, 32, (b,), generator=g), torch.rand(b, generator=g) + .5
        want = eager(cl, model, ids, scale)
        got = step(ids, scale)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert cl.router.last_plan.epoch == plan.epoch  # the step used the plan given
    assert sorted(step.batch_sizes) == [4, 5]  # "e" joined (5 rows), "b" left (4 again)
    assert "node2" in step.captured.lanes.names
    step.boundary()  # the last step's tokens are history from the next boundary
    assert [cl.router.length(r) for r in "ac"] == [30 + 10, 45 + 10]
    step.close()
    with pytest.raises(RuntimeError, match="closed"):
        step(ids, scale)
    cl.close()


def test_a_failed_step_raises_and_the_next_one_is_right():
    """The model raises at layer 1 of a step: the error comes out of the call at once (the
    serving thread gives the step up), the requests do not advance, and the next step
    computes what the eager loop does."""
    cl = Cluster.in_process(2, layers=LAYERS, kv_heads=HKV, head_dim=D, q_heads=HQ,
                            capacity_tokens=2048, range_tokens=9)
    prefill(cl, {"a": 30, "b": 7, "c": 45}, seed=5)
    model = TinyModel(6)
    step = CapturedStep(cl, num_layers=LAYERS, before=model.before, after=model.after,
                        embed=model.embed, head=model.head, microbatches=2, timeout=20)
    ids, scale = torch.tensor([1, 2, 3]), torch.ones(3)
    step(ids, scale)  # the first step of this batch size
    step.boundary()
    lengths = [cl.router.length(r) for r in "abc"]
    model.fail_at = 1
    with pytest.raises(RuntimeError, match="model failed"):
        step(ids, scale)
    model.fail_at = None
    step.boundary()
    assert [cl.router.length(r) for r in "abc"] == lengths  # not advanced
    want = eager(cl, model, ids, scale)
    torch.testing.assert_close(step(ids, scale), want, rtol=1e-5, atol=1e-5)
    step.close()
    cl.close()


def test_inputs_must_have_the_plan_rows_and_a_cluster_needs_requests():
    cl = Cluster.in_process(1, layers=LAYERS, kv_heads=HKV, head_dim=D, q_heads=HQ,
                            capacity_tokens=512)
    model = TinyModel()
    step = CapturedStep(cl, num_layers=LAYERS, before=model.before, after=model.after,
                        embed=model.embed, head=model.head)
    with pytest.raises(ValueError, match="routes no requests"):
        step(torch.tensor([1]), torch.ones(1))
    prefill(cl, {"a": 5}, seed=7)
    with pytest.raises(ValueError, match="the plan's 1 rows"):
        step(torch.tensor([1, 2]), torch.ones(2))
    with pytest.raises(ValueError, match="capture=True needs a CUDA device"):
        CapturedStep(cl, num_layers=LAYERS, before=model.before, after=model.after,
                     capture=True)
    step.close()
    cl.close()


class Recompute:
    """A recompute callback for TinyModel: each position's inputs kept, a lost span run
    again through the model's halves with `RemoteAttention.extend`."""

    def __init__(self, cl, model):
        self.cl, self.model, self.inputs = cl, model, {}
        self.spans = []

    def record(self, plan, ids, scale):
        for rid, pos, i, s in zip(plan.requests, plan.positions, ids.tolist(), scale.tolist()):
            self.inputs[rid, pos] = (i, s)

    def __call__(self, r):
        self.spans.append((r.request, r.start, r.end))
        ids, scale = zip(*(self.inputs[r.request, p] for p in range(r.start, r.end)))
        state = self.model.embed(torch.tensor(ids), torch.tensor(scale))
        for layer in range(LAYERS):
            q, k, v = self.model.before(layer, state)
            state = self.model.after(layer, state,
                                     self.cl.remote.extend(layer, r.request, q, k, v, r.start))


@pytest.mark.parametrize("when", ["between steps", "mid-step"])
def test_a_lost_node_is_recomputed_and_the_step_run_again(when):
    """A node dies (between steps, or while a step is served): its spans are recomputed
    through the cluster's recompute callback and the step runs again; every step equals
    the same run on a cluster that lost nothing."""
    model = TinyModel(8)
    runs = []
    for lose in (False, True):
        cl = Cluster.in_process(3, layers=LAYERS, kv_heads=HKV, head_dim=D, q_heads=HQ,
                                capacity_tokens=2048, range_tokens=7)
        rec = Recompute(cl, model)
        cl.recompute = rec
        plan = cl.router
        for rid in "abc":
            plan.add_request(rid, 0)
        step = CapturedStep(cl, num_layers=LAYERS, before=model.before, after=model.after,
                            embed=model.embed, head=model.head, microbatches=2, timeout=10)
        g, outs = torch.Generator().manual_seed(9), []
        for i in range(12):
            p = step.boundary()
            ids, scale = torch.randint(0, 32, (3,), generator=g), torch.rand(3, generator=g) + .5
            rec.record(p, ids, scale)
            if lose and i == 6:
                victim = p.routes["a"][0].node  # holds history of "a"
                if when == "between steps":
                    cl.processes[victim].kill()
                else:  # the node's server goes while this step is served
                    def kill(layer, victim=victim, cl=cl):
                        if layer == 1 and victim in cl.processes:
                            cl.processes[victim].kill()
                    model.on_layer = kill
            outs.append(step(ids, scale))
        model.on_layer = None
        runs.append((outs, rec.spans, dict(cl.recovery.lost)))
        step.close()
        cl.close()
    (want, _, _), (got, spans, lost) = runs
    assert lost and spans, "no node was lost, nothing recomputed"
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {i}")
