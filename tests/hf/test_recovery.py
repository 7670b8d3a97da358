"""A node lost in the middle of `generate()` costs time, not tokens: the output equals the
unpatched model's, whether the node dies during the prompt, between decode steps, in the
middle of a step, two of them, or while another joins."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402

import kflume  # noqa: E402
from kflume import Cluster  # noqa: E402


def llama(layers=3):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, pad_token_id=0,
                                   eos_token_id=None)
    return transformers.LlamaForCausalLM(cfg).eval()


def prompts():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 23), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding
    return ids * mask, mask


class Events(StoppingCriteria):
    """Runs `events[step]()` after that many generated tokens (never stops)."""

    def __init__(self, events: dict):
        self.events, self.seen = events, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.seen += 1
        if self.seen in self.events:
            self.events[self.seen]()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def kill_in_layer(model, layer: int, forward: int, kill):
    """Run `kill()` before decoder layer `layer` of the model's `forward`-th forward
    (1: the prompt's): in the middle of a step."""
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if calls[0] == forward:
            kill()
    return model.model.layers[layer].register_forward_pre_hook(hook)


def generate(model, cl, ids, mask, events=None, new=14):
    crit = StoppingCriteriaList([Events(events or {})])
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                          do_sample=False, stopping_criteria=crit)


def run(kind, setup):
    model = llama()
    ids, mask = prompts()
    want = generate(model, None, ids, mask)
    kwargs = dict(capacity_tokens=1024, range_tokens=8, page_size=4)
    with Cluster.for_model(4, model, kind=kind, **kwargs) as cl:
        kflume.patch(model, cl)
        events, hooks = setup(model, cl)
        try:
            got = generate(model, cl, ids, mask, events)
        finally:
            for h in hooks:
                h.remove()
            kflume.unpatch(model)
        lost = dict(cl.recovery.lost)
    assert torch.equal(got, want)
    return lost


def kill(cl, name):
    return lambda: cl.processes[name].kill()


CASES = {
    "between steps": lambda m, cl: ({3: kill(cl, "node1")}, []),
    "late": lambda m, cl: ({11: kill(cl, "node2")}, []),
    "mid-step": lambda m, cl: ({}, [kill_in_layer(m, 2, 6, kill(cl, "node0"))]),
    "during the prompt": lambda m, cl: ({}, [kill_in_layer(m, 1, 1, kill(cl, "node3"))]),
    "two, then a join": lambda m, cl: ({2: kill(cl, "node0"), 5: kill(cl, "node2"),
                                         6: lambda: cl.add_node()}, []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generate_is_unchanged_when_an_in_process_node_dies(case):
    lost = run("in_process", CASES[case])
    assert lost, "no node was lost"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", list(CASES))
def test_generate_is_unchanged_when_a_node_process_is_killed(case):
    """The same with `kflume node` processes over UCX, each killed with SIGKILL."""
    pytest.importorskip("ucxx", reason="node processes talk UCX")
    lost = run("local", CASES[case])
    assert lost, "no node was lost"


def test_generate_is_unchanged_when_a_node_process_leaves():
    """SIGTERM to a node mid-generation: its ranges migrate at the next boundaries,
    nothing is lost or recomputed, and the node process exits cleanly."""
    pytest.importorskip("ucxx", reason="node processes talk UCX")
    procs = {}

    def leave(cl, name):
        procs[name] = cl.processes[name]
        return lambda: cl.processes[name].leave()

    def nodes_later(cl):
        return lambda: procs.update(nodes=set(cl.router.nodes()), held=sum(
            r.node == "node1" for rid in cl.router.requests() for r in cl.router.ranges(rid)))

    def setup(m, cl):
        return {3: leave(cl, "node1"), 9: nodes_later(cl)}, []

    lost = run("local", setup)
    assert not lost
    assert "node1" not in procs["nodes"] and procs["held"] == 0  # moved off mid-run
    assert procs["node1"].proc.wait(10) == 0


@pytest.mark.parametrize("kind", ["in_process", "local"])
def test_generate_is_unchanged_after_a_node_died_between_two_calls(kind):
    """The next call's prompts are placed at the boundary that finds the node gone: none
    of them on it."""
    if kind == "local":
        pytest.importorskip("ucxx", reason="node processes talk UCX")
    model = llama()
    ids, mask = prompts()
    want = generate(model, None, ids, mask)
    with Cluster.for_model(3, model, kind=kind, capacity_tokens=1024, range_tokens=8,
                           page_size=4) as cl:
        kflume.patch(model, cl)
        try:
            assert torch.equal(generate(model, cl, ids, mask), want)
            cl.processes["node1"].kill()  # while no generation runs
            assert torch.equal(generate(model, cl, ids, mask), want)
        finally:
            kflume.unpatch(model)
        assert set(cl.recovery.lost) == {"node1"}


def session_calls(model, cl, kill_at=None):
    """Two calls of one session (the second extends it by a tool's output); `kill_at(cl)`
    returns events and hooks for the second call."""
    g = torch.Generator().manual_seed(2)
    prompt, tool = torch.randint(3, 128, (2, 20), generator=g), torch.randint(3, 128, (2, 7),
                                                                                generator=g)
    cache = kflume.KflumeCache(cl, model.config) if cl else transformers.DynamicCache()
    out = generate_cached(model, prompt, cache)
    events, hooks = kill_at(cl) if kill_at else ({}, [])
    try:
        return generate_cached(model, torch.cat([out, tool], -1), cache, events)
    finally:
        for h in hooks:
            h.remove()


def generate_cached(model, ids, cache, events=None):
    return model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False,
                          stopping_criteria=StoppingCriteriaList([Events(events or {})]))


SESSION_CASES = {
    # the second call's first forward: its new tokens, a span over the history
    "while a span extends the session": lambda m, cl: (
        {}, [kill_in_layer(m, 1, 1, kill(cl, "node1"))]),
    "between the calls": lambda m, cl: (cl.processes["node1"].kill(), ({}, []))[1],
    "in a later step": lambda m, cl: ({2: kill(cl, "node2")}, []),
}


@pytest.mark.parametrize("kind", ["in_process", "local"])
@pytest.mark.parametrize("case", list(SESSION_CASES))
def test_a_session_goes_on_when_a_node_is_lost(kind, case):
    if kind == "local":
        pytest.importorskip("ucxx", reason="node processes talk UCX")
    model = llama()
    want = session_calls(model, None)
    with Cluster.for_model(3, model, kind=kind, capacity_tokens=1024, range_tokens=8,
                           page_size=4) as cl:
        kflume.patch(model, cl)
        try:
            got = session_calls(model, cl, lambda c: SESSION_CASES[case](model, c))
        finally:
            kflume.unpatch(model)
        assert cl.recovery.lost
    assert torch.equal(got, want)
