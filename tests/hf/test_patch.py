"""kflume.patch on Hugging Face models: greedy generate() equals the unpatched model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402

import kflume  # noqa: E402
from kflume import Cluster  # noqa: E402

TINY = dict(vocab_size=128, intermediate_size=96, num_hidden_layers=2,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=None,
            tie_word_embeddings=False)
MODELS = {
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM",
                  dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM",
                  dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16)),
}


def build(name: str, tmp_path: Path):
    """A random model from a config, saved as safetensors and loaded back."""
    cfg_cls, model_cls, kw = MODELS[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**TINY, **kw)
    model = getattr(transformers, model_cls)(cfg)
    path = tmp_path / name
    model.save_pretrained(path, safe_serialization=True)
    assert any(p.suffix == ".safetensors" for p in path.iterdir())
    return getattr(transformers, model_cls).from_pretrained(path).eval(), path


def prompts(lengths=(4, 9, 13, 1), vocab=128):
    g = torch.Generator().manual_seed(1)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):  # left padding
        ids[i, t - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, t - n :] = 1
    return ids, mask


class AddNodeAt(StoppingCriteria):
    """Adds an attention node after `step` generated tokens (never stops generation).

    With `ready_at`, the node process is started at `step` without waiting, and the hook
    waits at `ready_at` until it listens, standing in for decode steps that take longer
    than a node's start-up: it joins at the boundary after that.
    """

    def __init__(self, cluster: Cluster, step: int, ready_at: int | None = None):
        self.cluster, self.step, self.ready_at = cluster, step, ready_at
        self.seen, self.added, self.max_load = 0, None, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.seen += 1
        if self.added in self.cluster.router.nodes():
            self.max_load = max(self.max_load, self.cluster.router.node_load(self.added))
        if self.seen == self.step:
            self.added = self.cluster.add_node(wait=self.ready_at is None)
        if self.seen == self.ready_at:
            self.cluster.processes[self.added].wait_ready()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@pytest.mark.parametrize("name", list(MODELS))
def test_generate_matches_unpatched(name, tmp_path):
    model, _ = build(name, tmp_path)
    ids, mask = prompts()
    gen = dict(max_new_tokens=24, do_sample=False)
    ref = model.generate(input_ids=ids, attention_mask=mask, **gen)
    with Cluster.for_model(2, model, kind="in_process", capacity_tokens=512,
                           range_tokens=7) as cluster:
        kflume.patch(model, cluster)
        hook = AddNodeAt(cluster, step=10)
        out = model.generate(input_ids=ids, attention_mask=mask,
                             stopping_criteria=StoppingCriteriaList([hook]), **gen)
        assert torch.equal(out, ref), f"{name}: tokens differ from the unpatched model"
        assert hook.added in cluster.clients and hook.max_load > 0
        nodes = cluster.provider.nodes
        # The node added mid-run took tokens; the cache freed everything at the end.
        assert cluster.router.epoch > 24
        assert all(n.stats()["requests"] == 0 for n, _ in nodes.values())
        kflume.unpatch(model)
    assert model.config._attn_implementation != "kflume" and "generate" not in vars(model)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **gen), ref)


def test_kv_stays_on_nodes_and_cache_can_be_kept(tmp_path):
    model, _ = build("llama-gqa", tmp_path)
    ids, mask = prompts((5, 11))
    with Cluster.for_model(3, model, kind="in_process", capacity_tokens=256,
                           range_tokens=4) as cluster:
        kflume.patch(model, cluster)
        cache = kflume.KflumeCache(cluster, model.config)
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                       max_new_tokens=9, do_sample=False)
        held = sum(n.stats()["tokens_held"] for n, _ in cluster.provider.nodes.values())
        # every real token's KV, once, on some node: prompts + generated (the last token
        # is never fed back), and nothing kept locally.
        assert held == (5 + 11) + 2 * (9 - 1)
        assert all(getattr(layer, "keys", None) is None for layer in cache.layers)
        assert sum(n.stats()["tokens_held"] > 0 for n, _ in cluster.provider.nodes.values()) == 3
        cache.close()
        assert sum(n.stats()["tokens_held"] for n, _ in cluster.provider.nodes.values()) == 0


def test_patch_checks_geometry_and_unsupported_modes(tmp_path):
    model, _ = build("qwen3", tmp_path)
    with Cluster.in_process(1, layers=2, kv_heads=4, head_dim=16, capacity_tokens=64) as cl:
        with pytest.raises(ValueError, match="KV heads 2 but the cluster's nodes hold 4"):
            kflume.patch(model, cl)
    with Cluster.for_model(1, model, kind="in_process", capacity_tokens=256) as cl:
        kflume.patch(model, cl)
        with pytest.raises(ValueError, match="already patched"):
            kflume.patch(model, cl)
        ids, mask = prompts((3, 6))
        with pytest.raises(NotImplementedError, match="beam search"):
            model.generate(input_ids=ids, attention_mask=mask, num_beams=2, max_new_tokens=3)
        kflume.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        kflume.unpatch(model)


@pytest.mark.timeout(300)
def test_over_ucx_nodes_that_never_load_weights(tmp_path):
    """Three `kflume node` processes; one joins mid-generation; weights stay on this side."""
    model, path = build("qwen2", tmp_path)
    ids, mask = prompts((6, 14, 2))
    gen = dict(max_new_tokens=30, do_sample=False)
    ref = model.generate(input_ids=ids, attention_mask=mask, **gen)
    with Cluster.for_model(2, model, capacity_tokens=1024, range_tokens=9) as cluster:
        kflume.patch(model, cluster)
        hook = AddNodeAt(cluster, step=3, ready_at=12)  # steps run on while it starts
        out = model.generate(input_ids=ids, attention_mask=mask,
                             stopping_criteria=StoppingCriteriaList([hook]), **gen)
        assert torch.equal(out, ref)
        assert hook.added in cluster.clients, "the node started mid-run should have joined"
        assert hook.max_load > 0, "the new node should have taken tokens"
        assert cluster.router.node_load(hook.added) == 0  # its KV was freed with the cache
        for proc in cluster.processes.values():
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            fds = [os.readlink(f) for f in Path(f"/proc/{proc.pid}/fd").iterdir()
                   if f.is_symlink()]
            assert str(path) not in maps and not any(str(path) in f for f in fds)
        kflume.unpatch(model)
