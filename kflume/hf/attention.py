"""The attention and mask functions kflume registers with transformers.

- the mask function ("kflume" in `AttentionMaskInterface`) hands the attention function
  the 2D padding mask (True = a real token); causality is applied by position;
- the attention function ("kflume" in `AttentionInterface`) gets q after RoPE and, from
  a KflumeCache, the new k, v only. By the kind of forward (kflume/hf/session.py): a
  prompt is attended locally and its KV scattered to the nodes; a decode step's attention
  runs on the nodes (`RemoteAttention`); new tokens on top of a history (a later turn, a
  speculation checked, a lost span recomputed) attend over it as spans
  (`RemoteAttention.extend`). The layer's variant (window, softcap, sinks) goes along
  (kflume/hf/variant.py). With another cache (or none) it attends locally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import FORWARD, PENDING
from .local import local_attention
from .variant import _refuse, variant

__all__ = ["kflume_attention", "kflume_padding_mask"]


def kflume_padding_mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
                        attention_mask=None, mask_function=None, config=None, **kwargs):
    """2D bool `[B, kv_length]` (True = real token), or None when nothing is padding.
    A mask that is more than causal, sliding and padding is refused (`mask_features`)."""
    mask_features(mask_function, config)
    if attention_mask is None:
        return None
    m = attention_mask.bool()
    if m.shape[-1] < kv_offset + kv_length:
        m = F.pad(m, (0, kv_offset + kv_length - m.shape[-1]), value=False)
    m = m[:, kv_offset : kv_offset + kv_length]
    return None if bool(m.all()) else m


_PLAIN = {"causal_mask_function", "sliding_window_overlay.<locals>.inner_mask",
          "padding_mask_function.<locals>.inner_mask"}
_COMBINED = {"and_masks.<locals>.and_mask", "add_offsets_to_mask_function.<locals>.inner_mask"}
_NAMES = {"bidirectional": "bidirectional attention", "chunked": "chunked attention",
          "packed": "packed sequences", "or_masks": "a mask that allows more than causal "
          "attention", "blockwise": "blockwise attention"}


def mask_features(fn, config) -> None:
    """Refuse a transformers mask function made of more than causal, sliding-window and
    padding parts (it is taken apart through its closures: `and_masks` of known parts)."""
    if fn is None:
        return
    parts: list[str] = []

    def walk(f) -> None:
        name = getattr(f, "__qualname__", type(f).__name__)
        if name not in _COMBINED:
            parts.append(name)
            return
        for cell in f.__closure__ or ():
            v = cell.cell_contents
            for g in v if isinstance(v, tuple) else (v,):
                if callable(g):
                    walk(g)

    walk(fn)
    other = [p for p in parts if p not in _PLAIN]
    if other:
        what = ", ".join(next((v for k, v in _NAMES.items() if k in p), p) for p in other)
        model = getattr(config, "model_type", None) or "the model"
        raise NotImplementedError(f"kflume: {model} masks its attention with {what}, which "
                                  "kflume does not implement")


def kflume_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     **kwargs):
    """The attention function registered as "kflume" (transformers' interface).

    query `[B, Hq, S, D]` after RoPE; key, value `[B, Hkv, S, D]`, the new tokens only when
    they come from a KflumeCache. Returns `(out [B, S, Hq, D], None)`.
    """
    if attention_mask is not None and attention_mask.dim() != 2:
        _refuse(module, "an attention mask of its own (not the 2D padding mask)")
    v = variant(module, kwargs, dropout)
    pending = PENDING.get()
    mine = pending is not None and pending[2] is key and pending[1] == module.layer_idx
    if not mine:
        if any(FORWARD.get()[-1:]):  # a KflumeCache forward, k, v not from its update
            _refuse(module, "key and value that are not the layer's own new tokens (KV "
                    "shared across layers, or a cache bypassed)")
        return local_attention(query, key, value, attention_mask, scaling, v), None
    PENDING.set(None)
    cache, layer, _ = pending
    session = cache.session
    b, hq, s, d = query.shape
    g = session.cluster.geometry
    if (key.shape[1], key.shape[3]) != (g.kv_heads, g.head_dim) or value.shape != key.shape:
        _refuse(module, f"keys {list(key.shape[1::2])} and values {list(value.shape[1::2])} "
                f"([heads, head size]) where the cluster's nodes hold [{g.kv_heads}, "
                f"{g.head_dim}] for both")
    valid = None if attention_mask is None else attention_mask[:, -s:]
    remote = session.cluster.attention(num_q_heads=hq, scale=scaling, device=query.device)
    if scaling is not None and abs(remote.scale - scaling) > 1e-12:
        raise ValueError(f"kflume: layer {layer} uses scale {scaling}, the cluster {remote.scale}")
    variant_kw = dict(window=v.window, softcap=v.softcap, sinks=v.sinks)
    if cache.restore is not None:  # a lost span, recomputed over the history before it
        rid, start = cache.restore
        q, k, val = (t[0].transpose(0, 1) for t in (query, key, value))
        return remote.extend(layer, rid, q, k.contiguous(), val.contiguous(), start,
                             **variant_kw).unsqueeze(0), None
    if layer == 0:  # the kind of this forward, for every layer
        session.kind = ("prefill" if not session.requests else "decode"
                        if s == 1 and (valid is None or bool(valid.all())) else "extend")
    session.windows[layer] = v.window
    if session.kind == "prefill":  # the first forward: attend locally, scatter its KV
        if layer == 0:
            session.prefill([s] * b if valid is None else valid.sum(1).tolist())
        out = local_attention(query, key, value, valid, scaling, v)
        for i, rid in enumerate(session.requests):
            idx = slice(None) if valid is None else valid[i].nonzero().squeeze(-1)
            remote.prefill(layer, rid, key[i][:, idx].transpose(0, 1).contiguous(),
                           value[i][:, idx].transpose(0, 1).contiguous())
        return out, None
    if session.kind == "extend":
        return _extend(session, remote, layer, query, key, value, valid, variant_kw), None
    if layer == 0:
        session.decode_step()
    out = remote(layer, query[:, :, 0], key[:, :, 0].contiguous(), value[:, :, 0].contiguous(),
                 **variant_kw)
    return out.unsqueeze(1), None


def _extend(session, remote, layer, query, key, value, valid, variant_kw):
    """S tokens per row on top of the history (a later turn, a speculation checked): each
    row's real tokens are a span attending over the history on the nodes."""
    b, hq, s, d = query.shape
    real = [torch.arange(s, device=query.device) if valid is None else
            valid[i].nonzero().squeeze(-1) for i in range(b)]
    if layer == 0:
        session.extend([len(r) for r in real])
    out = query.new_zeros(b, s, hq, d)  # padding queries: zeros (no real token reads them)
    for i, rid in enumerate(session.requests):
        if len(real[i]):
            q, k, v = (t[i][:, real[i]].transpose(0, 1) for t in (query, key, value))
            out[i, real[i]] = remote.extend(layer, rid, q, k.contiguous(), v.contiguous(),
                                            session.spans[rid], **variant_kw)
    return out
