"""`generate()` over a cluster with replicas: a node lost mid-generation (between steps,
in the middle of a step, during the prompt) gives the unpatched model's tokens with
nothing recomputed."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import kflume  # noqa: E402
from kflume import Cluster  # noqa: E402

from .test_recovery import CASES, generate, kill, kill_in_layer, llama, prompts  # noqa: E402

REPLICA_CASES = {k: CASES[k] for k in ("between steps", "mid-step", "during the prompt")}


def run(kind, setup, nodes=4):
    model = llama()
    ids, mask = prompts()
    want = generate(model, None, ids, mask)
    kwargs = dict(capacity_tokens=1024, range_tokens=8, page_size=4, replicas=2)
    with Cluster.for_model(nodes, model, kind=kind, **kwargs) as cl:
        restores = []
        restore = cl.recovery.restore
        cl.recovery.restore = lambda plan: (restores.extend(plan.restores), restore(plan))
        kflume.patch(model, cl)
        events, hooks = setup(model, cl)
        try:
            got = generate(model, cl, ids, mask, events)
        finally:
            for h in hooks:
                h.remove()
            kflume.unpatch(model)
        lost = dict(cl.recovery.lost)
        stats = cl.router.replica_stats()
    assert torch.equal(got, want)
    return lost, restores, stats


@pytest.mark.parametrize("case", list(REPLICA_CASES))
def test_generate_is_unchanged_and_recomputes_nothing_when_a_node_dies(case):
    lost, restores, stats = run("in_process", REPLICA_CASES[case])
    assert lost, "no node was lost"
    assert not restores and stats.promoted_tokens + stats.copied_tokens > 0


def test_both_copies_lost_fall_back_to_recompute():
    def setup(model, cl):
        def both():
            plan = cl.router.last_plan
            first = plan.routes[plan.requests[0]][0].node
            mate = plan.replicas[plan.requests[0]][0].node
            cl.processes[first].kill()
            cl.processes[mate].kill()
        return {3: both}, []
    lost, restores, _ = run("in_process", setup)
    assert len(lost) == 2 and restores


@pytest.mark.timeout(600)
def test_generate_is_unchanged_when_a_node_process_is_killed():
    """The same with `kflume node` processes over UCX, one killed with SIGKILL mid-step."""
    pytest.importorskip("ucxx", reason="node processes talk UCX")
    lost, restores, _ = run("local", lambda m, cl: ({}, [kill_in_layer(m, 2, 6,
                                                                       kill(cl, "node0"))]))
    assert lost and not restores
