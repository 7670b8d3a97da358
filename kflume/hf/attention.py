"""The attention and mask functions kflume registers with transformers.

- the mask function ("kflume" in `AttentionMaskInterface`) hands the attention function
  the 2D padding mask (True = a real token); causality is applied by position;
- the attention function ("kflume" in `AttentionInterface`) gets q after RoPE and, from
  a KflumeCache, the new k, v only: a prompt is attended locally and its KV scattered
  to the nodes; a decode step's attention runs on the nodes (`RemoteAttention`); a lost
  span being recomputed attends over the history before it (`RemoteAttention.extend`).
  With another cache (or none) it attends locally over what it was given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import PENDING

__all__ = ["kflume_attention", "kflume_padding_mask"]


def kflume_padding_mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
                        attention_mask=None, **kwargs):
    """2D bool `[B, kv_length]` (True = real token), or None when nothing is padding."""
    if attention_mask is None:
        return None
    m = attention_mask.bool()
    if m.shape[-1] < kv_offset + kv_length:
        m = F.pad(m, (0, kv_offset + kv_length - m.shape[-1]), value=False)
    m = m[:, kv_offset : kv_offset + kv_length]
    return None if bool(m.all()) else m


def _causal_local(query, key, value, valid, scaling, window):
    """Attention of S queries over S keys, causal in position among real tokens; `valid`
    [B, S] or None. Returns [B, S, Hq, D]."""
    b, hq, s, _ = query.shape
    pos = torch.arange(s, device=query.device)
    allowed = pos[None, :] <= pos[:, None]  # [S, S]
    if window is not None:
        allowed = allowed & (pos[None, :] > pos[:, None] - window)
    allowed = allowed[None, None].expand(b, 1, s, s)
    if valid is not None:  # left padding: real tokens are contiguous, slots == positions
        allowed = allowed & valid[:, None, None, :]
        allowed = allowed | torch.eye(s, dtype=torch.bool, device=query.device)  # pads: self
    g = hq // key.shape[1]
    out = F.scaled_dot_product_attention(query, key.repeat_interleave(g, 1),
                                         value.repeat_interleave(g, 1), attn_mask=allowed,
                                         scale=scaling)
    return out.transpose(1, 2).contiguous()


def kflume_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     **kwargs):
    """The attention function registered as "kflume" (transformers' interface).

    query `[B, Hq, S, D]` after RoPE; key, value `[B, Hkv, S, D]`, the new tokens only when
    they come from a KflumeCache. Returns `(out [B, S, Hq, D], None)`.
    """
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("kflume expects the 2D padding mask of kflume_padding_mask; this model "
                         "builds another mask")
    window = kwargs.get("sliding_window")
    pending = PENDING.get()
    if pending is None or pending[2] is not key or pending[1] != module.layer_idx:
        # k, v came from another cache (or none): attend locally over what was given.
        valid = attention_mask
        s, t = query.shape[2], key.shape[2]
        if s != t:
            return _local_with_history(query, key, value, valid, scaling, window), None
        return _causal_local(query, key, value, valid, scaling, window), None
    PENDING.set(None)
    cache, layer, _ = pending
    session = cache.session
    b, hq, s, d = query.shape
    valid = None if attention_mask is None else attention_mask[:, -s:]
    history = cache.layers[layer].length - s
    if window is not None and history + s > window:
        raise NotImplementedError(f"kflume: sliding-window layer {layer} past its window of "
                                  f"{window} tokens is not supported")
    remote = session.cluster.attention(num_q_heads=hq, scale=scaling, device=query.device)
    if scaling is not None and abs(remote.scale - scaling) > 1e-12:
        raise ValueError(f"kflume: layer {layer} uses scale {scaling}, the cluster {remote.scale}")
    if cache.restore is not None:  # a lost span, recomputed over the history before it
        rid, start = cache.restore
        out = remote.extend(layer, rid, query[0].transpose(0, 1), key[0].transpose(0, 1),
                            value[0].transpose(0, 1), start)
        return out.unsqueeze(0), None
    if layer == 0:  # the kind of this forward, for every layer
        session.kind = ("prefill" if not session.requests else "decode"
                        if s == 1 and (valid is None or bool(valid.all())) else "extend")
    if session.kind == "prefill":  # the first forward: attend locally, scatter its KV
        if layer == 0:
            session.prefill([s] * b if valid is None else valid.sum(1).tolist())
        out = _causal_local(query, key, value, valid, scaling, window)
        for i, rid in enumerate(session.requests):
            idx = slice(None) if valid is None else valid[i].nonzero().squeeze(-1)
            remote.prefill(layer, rid, key[i][:, idx].transpose(0, 1).contiguous(),
                           value[i][:, idx].transpose(0, 1).contiguous())
        return out, None
    if session.kind == "extend":
        return _extend(session, remote, layer, query, key, value, valid), None
    if layer == 0:
        session.decode_step()
    out = remote(layer, query[:, :, 0], key[:, :, 0].contiguous(), value[:, :, 0].contiguous())
    return out.unsqueeze(1), None


def _extend(session, remote, layer, query, key, value, valid):
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
                                            session.spans[rid])
    return out


def _local_with_history(query, key, value, valid, scaling, window):
    """Fallback for a local cache: S queries over T >= S keys (the last S are the queries')."""
    s, t = query.shape[2], key.shape[2]
    qpos = torch.arange(t - s, t, device=query.device)
    kpos = torch.arange(t, device=query.device)
    allowed = kpos[None, :] <= qpos[:, None]
    if window is not None:
        allowed = allowed & (kpos[None, :] > qpos[:, None] - window)
    allowed = allowed[None, None]
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    g = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(query, key.repeat_interleave(g, 1),
                                         value.repeat_interleave(g, 1), attn_mask=allowed,
                                         scale=scaling)
    return out.transpose(1, 2).contiguous()
