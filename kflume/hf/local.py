"""Attention computed on the weight node: a prompt's first forward (before its KV is
scattered), and forwards whose KV comes from a cache other than a KflumeCache.

`local_attention` is causal in position among real tokens (left padding: a row's real
tokens are its last ones), with the layer's sliding window, softcap and sinks
(kflume/hf/variant.py). Plain SDPA when the layer has neither softcap nor sinks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .variant import Variant

__all__ = ["local_attention"]


def local_attention(query, key, value, valid, scaling, v: Variant) -> torch.Tensor:
    """S queries `[B, Hq, S, D]` over T >= S keys `[B, Hkv, T, D]`, the queries being the
    last S of them; `valid [B, T]` (True = a real token) or None. Returns `[B, S, Hq, D]`."""
    b, hq, s, d = query.shape
    t = key.shape[2]
    qpos = torch.arange(t - s, t, device=query.device)
    kpos = torch.arange(t, device=query.device)
    allowed = kpos[None, :] <= qpos[:, None]  # [S, T]
    if v.window is not None:
        allowed = allowed & (kpos[None, :] > qpos[:, None] - v.window)
    allowed = allowed[None, None].expand(b, 1, s, t)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
        allowed = allowed | (kpos[None, :] == qpos[:, None])  # a padding query: itself
    g = hq // key.shape[1]
    k, val = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    scale = d**-0.5 if scaling is None else scaling
    if v.softcap is None and v.sinks is None:
        out = F.scaled_dot_product_attention(query, k, val, attn_mask=allowed, scale=scale)
        return out.transpose(1, 2).contiguous()
    scores = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scale  # [B, Hq, S, T]
    if v.softcap is not None:
        scores = v.softcap * torch.tanh(scores / v.softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if v.sinks is not None:  # one more logit per head, whose value is nothing
        sink = v.sinks.float().view(1, hq, 1, 1).expand(b, hq, s, 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    else:
        probs = torch.softmax(scores, -1)
    out = torch.matmul(probs, val.float()).to(query.dtype)
    return out.transpose(1, 2).contiguous()
