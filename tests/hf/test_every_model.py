"""The rule for every model: each causal LM class of the installed transformers, built
tiny and patched, either generates the unpatched model's tokens or is refused with an
error naming the model and what kflume does not implement. Never silently wrong.

Composite models (vision, audio: a config with sub-configs) are not walked; nor are
models whose tiny build or unpatched generation fails on its own (not kflume's doing).
"""

from __future__ import annotations

import logging
import signal
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig  # noqa: E402
from transformers.models.auto.modeling_auto import (  # noqa: E402
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
)

import kflume  # noqa: E402
from kflume import Cluster  # noqa: E402

pytestmark = pytest.mark.slow

SIZES = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=96, num_hidden_layers=2, vocab_size=128,
             max_position_embeddings=128, n_embd=64, n_head=4, n_layer=2, num_layers=2,
             d_model=64, n_positions=128, ffn_hidden_size=96, moe_intermediate_size=32,
             num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=None, tie_word_embeddings=False)
SECONDS = 30  # a model slower than this to build and run tiny is not walked


class _Slow(Exception):
    pass


def _alarm(*_):
    raise _Slow


def tiny(model_type: str):
    cfg = AutoConfig.for_model(model_type)
    if getattr(cfg, "sub_configs", None):
        pytest.skip("a composite model (its text model is walked under its own type)")
    for k, v in {**SIZES, **TOKENS}.items():
        if hasattr(cfg, k) or k in TOKENS:
            try:
                setattr(cfg, k, v)
            except (AttributeError, TypeError, ValueError):
                pass
    types = getattr(cfg, "layer_types", None)
    if types is not None and len(types) > 2:
        cfg.layer_types = list(types[:2])
    return cfg


@pytest.mark.parametrize("model_type", sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
def test_generates_the_same_tokens_or_is_refused(model_type):
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], None)
    if cls is None:
        pytest.skip("not importable here")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS)
    try:
        try:
            torch.manual_seed(0)
            model = cls(tiny(model_type)).eval().float()
            ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
            mask = torch.ones_like(ids)
            mask[1, :2] = 0
            ids = ids * mask
            gen = dict(max_new_tokens=5, do_sample=False)
            want = model.generate(input_ids=ids, attention_mask=mask, **gen)
        except _Slow:
            pytest.skip(f"tiny build and generation take over {SECONDS} s")
        except Exception as e:  # noqa: BLE001 - the model itself fails: not walked
            pytest.skip(f"the unpatched tiny model fails: {type(e).__name__}")
        refused = None
        try:
            with Cluster.for_model(2, model, kind="in_process", capacity_tokens=256,
                                   range_tokens=4) as cluster:
                kflume.patch(model, cluster)
                got = model.generate(input_ids=ids, attention_mask=mask, **gen)
        except (NotImplementedError, ValueError) as e:
            refused = str(e)
        if refused is None:
            assert torch.equal(got, want), f"{model_type}: silently wrong tokens"
            return
        name = (model_type.replace("-", "").replace("_", ""),
                cls.__name__.lower().replace("_", ""))
        said = refused.lower().replace("-", "").replace("_", "")
        assert any(n in said for n in name), f"the refusal does not name the model: {refused}"
        assert "kflume" in said or "attention" in said, refused
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
