"""Which attention a layer asks for, from what transformers passes the attention function.

kflume computes causal softmax attention over a request's tokens, with these variants:

- `sliding_window` (Mistral, Qwen2, Gemma2/3 local layers, GPT-OSS): a token attends over
  the last W tokens, itself included;
- `softcap` (Gemma2): scores become `softcap * tanh(score / softcap)`;
- `s_aux` / `sinks` (GPT-OSS): one learned logit per head, a partial with no value;
- `scaling`: the score scale.

Anything else transformers passes that would change the result (packed sequences,
position biases, sparse indices, non-causal attention, dropout while training, attention
weights requested) is refused with `NotImplementedError` naming the model, the layer and
the feature, at the first call: never silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Variant", "variant"]

# Passed by transformers models but not changing core attention (positions are in q, k
# already; caches and flags are the caller's).
_BENIGN = {"position_ids", "cache_position", "use_cache", "past_key_values", "cache",
           "position_embeddings", "layer_idx", "output_hidden_states", "return_dict",
           "logits_to_keep", "attention_type", "max_length_q", "max_length_k"}


@dataclass(frozen=True, slots=True)
class Variant:
    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None  # [Hq]


def variant(module, kwargs: dict, dropout: float) -> Variant:
    """The layer's attention variant; raises NotImplementedError for any other feature."""
    refuse = lambda what: _refuse(module, what)  # noqa: E731
    if dropout and module.training:
        refuse(f"attention dropout {dropout} in training mode (kflume is for inference)")
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if window is not None and (type(window) is not int or window < 1):
        refuse(f"sliding_window {window!r} (a positive int is supported)")
    if softcap is not None and not float(softcap) > 0:
        refuse(f"softcap {softcap!r}")
    if sinks is not None and (not torch.is_tensor(sinks) or sinks.dim() != 1):
        refuse(f"attention sinks of shape {getattr(sinks, 'shape', None)} (one per head is "
               "supported)")
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        refuse("non-causal (bidirectional) attention")
    if kwargs.get("output_attentions"):
        refuse("output_attentions (attention weights are never formed)")
    for name, value in kwargs.items():
        if name in _BENIGN or name in ("sliding_window", "softcap", "s_aux", "sinks",
                                       "is_causal", "output_attentions"):
            continue
        if value is not None and value is not False:
            refuse(f"the attention argument {name!r}")
    return Variant(window, None if softcap is None else float(softcap), sinks)


def _refuse(module, what: str):
    model = getattr(module, "config", None)
    name = getattr(model, "model_type", None) or type(module).__name__
    layer = getattr(module, "layer_idx", "?")
    raise NotImplementedError(f"kflume: {name} layer {layer} ({type(module).__name__}) uses "
                              f"{what}, which kflume does not implement")
