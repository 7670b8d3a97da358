"""Multi-turn sessions and cache crops with kflume.patch: every call gives what the
unpatched model gives with a DynamicCache used the same way, and between calls the
nodes hold exactly the session's tokens."""

from __future__ import annotations

import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

import kflume  # noqa: E402
from kflume import Cluster  # noqa: E402
from kflume.weight.parking import Expired  # noqa: E402

from .test_patch import MODELS, TINY  # noqa: E402


def model_of(name: str, seed: int = 0):
    cfg_cls, model_cls, kw = MODELS[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**TINY, **kw)
    return getattr(transformers, model_cls)(cfg).eval()


def held(cluster) -> int:
    return sum(n.stats()["tokens_held"] for n, _ in cluster.provider.nodes.values())


def conversation(batch: int, seed: int = 1):
    """A first prompt with left padding, then three turns of new tokens; in the second,
    rows have different lengths (padding in the middle of the sequence)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, 9), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, batch):
        mask[i, : 2 * i] = 0
    ids = ids * mask
    turns = []
    for n in (6, 4, 1):
        t = torch.randint(3, 128, (batch, n), generator=g)
        m = torch.ones_like(t)
        if n == 4:
            m[1:, :2] = 0  # rows past the first have 2 new tokens only
        turns.append((t * m, m))
    return ids, mask, turns


def run_turns(model, cache, ids, mask, turns, after_turn=None, **gen):
    outs, out, m = [], None, mask
    for turn in [None, *turns]:
        if turn is not None:
            t, tm = turn
            gap = torch.ones(m.shape[0], out.shape[1] - m.shape[1], dtype=m.dtype)
            ids, m = torch.cat([out, t], 1), torch.cat([m, gap, tm], 1)
        out = model.generate(input_ids=ids, attention_mask=m, past_key_values=cache, **gen)
        outs.append(out)
        if after_turn is not None:
            after_turn(out, m)
    return outs


@pytest.mark.parametrize("name", ["llama-gqa", "qwen3", "mistral"])
def test_turns_match_a_dynamic_cache(name):
    model = model_of(name)
    ids, mask, turns = conversation(3)
    gen = dict(max_new_tokens=7, do_sample=False)
    want = run_turns(model, DynamicCache(config=model.config), ids, mask, turns, **gen)
    with Cluster.for_model(3, model, kind="in_process", capacity_tokens=512,
                           range_tokens=5) as cluster:
        kflume.patch(model, cluster)
        cache = kflume.KflumeCache(cluster, model.config)

        def between(out, m):
            # every real token fed so far, once, on the nodes; none on the weight node
            real = int(m.sum()) + out.shape[0] * (out.shape[1] - m.shape[1] - 1)
            assert held(cluster) == real
            assert all(getattr(layer, "keys", None) is None for layer in cache.layers)
            assert cluster.router.last_plan.requests == ()  # parked: no part in steps

        got = run_turns(model, cache, ids, mask, turns, after_turn=between, **gen)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"{name}: turn {i} differs from the DynamicCache's"
        cache.close()
        assert held(cluster) == 0 and cluster.router.requests() == ()
        with pytest.raises(RuntimeError, match="closed"):
            model.generate(input_ids=got[-1], past_key_values=cache, max_new_tokens=2)


def test_sessions_share_a_cluster_between_their_calls():
    model = model_of("qwen3")
    a_ids, a_mask, a_turns = conversation(2, seed=3)
    b_ids, b_mask, b_turns = conversation(1, seed=4)
    gen = dict(max_new_tokens=5, do_sample=False)
    want_a = run_turns(model, DynamicCache(config=model.config), a_ids, a_mask, a_turns[:1],
                       **gen)
    want_b = run_turns(model, DynamicCache(config=model.config), b_ids, b_mask, b_turns[:1],
                       **gen)
    with Cluster.for_model(2, model, kind="in_process", capacity_tokens=512,
                           range_tokens=6) as cluster:
        kflume.patch(model, cluster)
        a = kflume.KflumeCache(cluster, model.config)
        b = kflume.KflumeCache(cluster, model.config)
        out_a = model.generate(input_ids=a_ids, attention_mask=a_mask, past_key_values=a, **gen)
        out_b = model.generate(input_ids=b_ids, attention_mask=b_mask, past_key_values=b, **gen)
        assert torch.equal(out_a, want_a[0]) and torch.equal(out_b, want_b[0])
        both = held(cluster)
        (ta, ma), (tb, mb) = a_turns[0], b_turns[0]
        ma = torch.cat([a_mask, torch.ones(2, out_a.shape[1] - a_mask.shape[1],
                                           dtype=ma.dtype), ma], 1)
        out_a = model.generate(input_ids=torch.cat([out_a, ta], 1), attention_mask=ma,
                               past_key_values=a, **gen)
        assert torch.equal(out_a, want_a[1])
        a.close()
        assert 0 < held(cluster) < both
        mb = torch.ones(1, out_b.shape[1] + tb.shape[1], dtype=torch.long)
        out_b = model.generate(input_ids=torch.cat([out_b, tb], 1), attention_mask=mb,
                               past_key_values=b, **gen)
        assert torch.equal(out_b, want_b[1])


def test_an_idle_session_expires_and_a_later_call_says_so():
    model = model_of("llama-gqa")
    ids, mask, _ = conversation(2)
    with Cluster.for_model(2, model, kind="in_process", capacity_tokens=256) as cluster:
        kflume.patch(model, cluster)
        cache = kflume.KflumeCache(cluster, model.config, ttl=0.05)
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                             max_new_tokens=3, do_sample=False)
        assert held(cluster) > 0
        time.sleep(0.1)
        m = torch.cat([mask, torch.ones(2, out.shape[1] - mask.shape[1] + 1,
                                        dtype=mask.dtype)], 1)
        with pytest.raises(Expired, match="KflumeCache's session was idle .* time to live"):
            model.generate(input_ids=torch.cat([out, out[:, -1:]], 1), attention_mask=m,
                           past_key_values=cache, max_new_tokens=3, do_sample=False)
        assert held(cluster) == 0 and cluster.router.requests() == ()


def test_prompt_lookup_and_assisted_decoding_crop_the_cache():
    model, assistant = model_of("llama-gqa"), model_of("llama-gqa", seed=5)
    g = torch.Generator().manual_seed(2)
    base = torch.randint(3, 128, (1, 6), generator=g)
    ids = torch.cat([base, base, base], 1)  # repeated n-grams: the lookup finds candidates
    gen = dict(max_new_tokens=20, do_sample=False)
    want_lookup = model.generate(input_ids=ids, prompt_lookup_num_tokens=3, **gen)
    want_assisted = model.generate(input_ids=ids, assistant_model=assistant, **gen)
    with Cluster.for_model(2, model, kind="in_process", capacity_tokens=512,
                           range_tokens=7) as cluster:
        kflume.patch(model, cluster)
        cache = kflume.KflumeCache(cluster, model.config)
        out = model.generate(input_ids=ids, prompt_lookup_num_tokens=3, past_key_values=cache,
                             **gen)
        assert torch.equal(out, want_lookup)
        assert held(cluster) == out.shape[1] - 1  # rejected candidates were truncated
        cache.close()
        out = model.generate(input_ids=ids, assistant_model=assistant, **gen)
        assert torch.equal(out, want_assisted)
        assert held(cluster) == 0


def test_a_call_that_raises_closes_its_cache():
    model = model_of("llama-gqa")
    ids, mask, _ = conversation(1)
    with Cluster.for_model(1, model, kind="in_process", capacity_tokens=64) as cluster:
        kflume.patch(model, cluster)
        cache = kflume.KflumeCache(cluster, model.config)
        with pytest.raises(Exception, match="room|capacity"):  # noqa: B017 - the node is full
            model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                           max_new_tokens=80, do_sample=False)
        assert held(cluster) == 0 and cluster.router.requests() == ()
        with pytest.raises(RuntimeError, match="closed"):
            model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=2)
