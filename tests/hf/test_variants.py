"""Attention variants through kflume.patch: sliding windows (Mistral, Qwen2, Gemma2/3
local layers, GPT-OSS), Gemma2's softcapping and GPT-OSS's sinks give the unpatched
model's tokens and logits, in one call and across turns, with prompts past the window."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

import kflume  # noqa: E402
from kflume import Cluster  # noqa: E402
from kflume.testing import rel_err  # noqa: E402

from .test_patch import TINY  # noqa: E402

WINDOW = 6
VARIANTS = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    sliding_window=WINDOW, attn_logit_softcapping=5.0,
                    final_logit_softcapping=None, query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])),
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                     sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)),
}


def model_of(name: str, **override):
    cfg_cls, model_cls, kw = VARIANTS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**TINY, **{
        **kw, **override})).eval()
    if name == "gpt-oss":  # sinks far from their zero init, so that they matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0, 2)
    return model


def prompt(batch=2, n=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, n), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, :3] = 0  # left padding
    return ids * mask, mask


def logits_per_step(model, cache, ids, mask, steps=10):
    """Greedy decoding by hand: every forward's last logits."""
    out, x, m = [], ids, mask
    with torch.no_grad():
        for _ in range(steps):
            r = model(input_ids=x, attention_mask=m, past_key_values=cache, use_cache=True)
            out.append(r.logits[:, -1].float())
            x = r.logits[:, -1].argmax(-1, keepdim=True)
            m = torch.cat([m, torch.ones_like(x)], 1)
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tokens_and_logits_match_unpatched(name):
    model = model_of(name)
    ids, mask = prompt()
    gen = dict(max_new_tokens=14, do_sample=False)
    want = model.generate(input_ids=ids, attention_mask=mask, **gen)
    want_logits = logits_per_step(model, DynamicCache(config=model.config), ids, mask)
    with Cluster.for_model(3, model, kind="in_process", capacity_tokens=512,
                           range_tokens=4) as cluster:
        kflume.patch(model, cluster)
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **gen), want)
        cache = kflume.KflumeCache(cluster, model.config)
        got = logits_per_step(model, cache, ids, mask)
        for step, (a, b) in enumerate(zip(got, want_logits)):
            assert rel_err(a, b) < 1e-5, f"{name}: logits of step {step}"
        cache.close()


@pytest.mark.parametrize("name", ["gemma2", "gpt-oss", "qwen2"])
def test_turns_past_the_window_match_a_dynamic_cache(name):
    model = model_of(name)
    ids, mask = prompt(seed=2)
    new = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    gen = dict(max_new_tokens=8, do_sample=False)

    def turns(cache):
        out1 = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **gen)
        m = torch.cat([mask, torch.ones(2, out1.shape[1] - mask.shape[1] + new.shape[1],
                                        dtype=mask.dtype)], 1)
        out2 = model.generate(input_ids=torch.cat([out1, new], 1), attention_mask=m,
                              past_key_values=cache, **gen)
        return out1, out2

    want = turns(DynamicCache(config=model.config))
    with Cluster.for_model(2, model, kind="in_process", capacity_tokens=512,
                           range_tokens=5) as cluster:
        kflume.patch(model, cluster)
        got = turns(kflume.KflumeCache(cluster, model.config))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_the_variants_change_the_result():
    """What the tests above check is not the plain attention's result."""
    ids, mask = prompt()
    for name, plain in (("gemma2", dict(attn_logit_softcapping=None)),
                        ("mistral", dict(sliding_window=None))):
        a = logits_per_step(model_of(name), DynamicCache(config=model_of(name).config), ids,
                            mask, steps=8)
        b = logits_per_step(model_of(name, **plain), None, ids, mask, steps=8)
        assert rel_err(a[-1], b[-1]) > 1e-3, name
    model = model_of("gpt-oss")
    a = logits_per_step(model, None, ids, mask, steps=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-1e4)
    assert rel_err(a[-1], logits_per_step(model, None, ids, mask, steps=2)[-1]) > 1e-3


def test_where_every_layer_slides_tokens_out_of_the_window_are_freed():
    model = model_of("mistral")
    ids, mask = prompt(batch=1)
    gen = dict(max_new_tokens=30, do_sample=False)
    want = model.generate(input_ids=ids, **gen)
    with Cluster.for_model(6, model, kind="in_process", capacity_tokens=256,
                           range_tokens=4) as cluster:
        kflume.patch(model, cluster)
        cache = kflume.KflumeCache(cluster, model.config)
        out = model.generate(input_ids=ids, past_key_values=cache, **gen)
        assert torch.equal(out, want)
        rid = cache.session.requests[0]
        first = cluster.router.ranges(rid)[0].start
        held = sum(n.stats()["tokens_held"] for n, _ in cluster.provider.nodes.values())
        assert first > 0 and held == out.shape[1] - 1 - first
        assert first <= out.shape[1] - 1 - WINDOW  # the window itself is kept
