"""Pure-torch references of the kflume kernels.

They are the CPU path (CPU tensors run these) and the yardstick of the tests. They
compute in float32, or in float64 when given float64, and follow docs/conventions.md.
No argument checking here: the public wrappers in this package check first.
"""

from __future__ import annotations

import torch

__all__ = ["split_kv_attention_ref", "merge_attention_states_ref", "merge_new_token_ref",
           "append_kv_ref", "gather_kv", "sink_state", "softcap_scores"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def softcap_scores(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma2's logit softcapping of already scaled scores: `softcap * tanh(s / softcap)`."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def sink_state(
    sinks: torch.Tensor, batch: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial state of GPT-OSS attention sinks (`sinks [H]`, one logit per head):
    `out = 0 [B, H, D]` in `dtype`, `lse = sinks [B, H]` (float64 for float64, else
    float32). Merged with a row's partials it adds `exp(sink)` to the softmax
    denominator and nothing to the value."""
    acc = _acc_dtype(dtype)
    h = sinks.shape[0]
    lse = sinks.to(acc)[None, :].expand(batch, h)
    return torch.zeros(batch, h, head_dim, dtype=dtype, device=sinks.device), lse


def gather_kv(
    cache: torch.Tensor, page_table: torch.Tensor, kv_start: torch.Tensor, kv_len: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather each request's range out of a paged pool, heads first.

    Returns `kv [B, Hkv, Lmax, D]` (padding positions hold page 0's data) and the mask of
    valid tokens `[B, Lmax]`.
    """
    page_size, hkv = cache.shape[1], cache.shape[2]
    bsz = kv_start.shape[0]
    lmax = int(kv_len.max()) if bsz else 0
    idx = torch.arange(lmax, device=cache.device)
    valid = idx[None, :] < kv_len[:, None].long()  # [B, Lmax]
    tok = torch.where(valid, kv_start[:, None].long() + idx[None, :], 0)  # [B, Lmax]
    page = page_table.long().gather(1, tok // page_size) if lmax else tok
    heads = torch.arange(hkv, device=cache.device)[None, :, None]  # [1, Hkv, 1]
    return cache[page[:, None, :], (tok % page_size)[:, None, :], heads], valid


def split_kv_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    scale: float,
    *,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `q [B, Hq, D]` over each request's range of a paged KV pool; scores
    `scale * q.k`, then softcapped when `softcap` is given (LSE of the capped scores).

    Returns `(out [B, Hq, D] in q's dtype, lse [B, Hq] float32 natural log)`.
    """
    bsz, hq, d = q.shape
    hkv = k_cache.shape[2]
    acc = _acc_dtype(q.dtype)
    k, valid = gather_kv(k_cache, page_table, kv_start, kv_len)  # [B, Hkv, L, D]
    v, _ = gather_kv(v_cache, page_table, kv_start, kv_len)
    qg = q.to(acc).view(bsz, hkv, hq // hkv, d)  # [B, Hkv, G, D]
    k, v = k.to(acc), v.to(acc)
    scores = softcap_scores((qg @ k.transpose(-1, -2)) * scale, softcap)  # [B, Hkv, G, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G]; -inf where empty
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = p @ v  # [B, Hkv, G, D]
    lse_dtype = torch.float64 if acc == torch.float64 else torch.float32
    return out.reshape(bsz, hq, d).to(q.dtype), lse.reshape(bsz, hq).to(lse_dtype)


def merge_attention_states_ref(
    outs: torch.Tensor, lses: torch.Tensor, *, sinks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge N partial states `outs [N, B, H, D]`, `lses [N, B, H]` into `(out, lse)`;
    with `sinks [H]`, their state (`sink_state`) is one more partial."""
    if sinks is not None:
        so, sl = sink_state(sinks, outs.shape[1], outs.shape[3], outs.dtype)
        outs, lses = torch.cat([outs, so[None]]), torch.cat([lses.to(sl.dtype), sl[None]])
    acc = _acc_dtype(outs.dtype)
    lses = lses.to(acc)
    m = lses.amax(dim=0)  # [B, H]
    m_safe = torch.where(torch.isinf(m), 0.0, m)
    w = torch.exp(lses - m_safe)  # [N, B, H]; 0 for empty partials
    total = w.sum(dim=0)
    out = (w[..., None] * outs.to(acc)).sum(dim=0) / torch.where(total > 0, total, 1.0)[..., None]
    lse = m_safe + torch.log(total)  # log(0) = -inf where every partial is empty
    lse_dtype = torch.float64 if acc == torch.float64 else torch.float32
    return out.to(outs.dtype), lse.to(lse_dtype)


def merge_new_token_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, outs: torch.Tensor, lses: torch.Tensor,
    index: torch.Tensor, scale: float, *, softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each row's new token over its history and itself: the partials of
    `S` sources (`outs [S, R, H, D]`, `lses [S, R, H]`, row `b`'s at `index[s, b]`, -1 for
    none) merged with the new token's own (`q [B, H, D]` against `k, v [B, Hkv, D]`,
    its score softcapped when `softcap` is given), and the sinks' state when given."""
    acc = _acc_dtype(q.dtype)
    g = q.shape[1] // k.shape[1]
    own = (q.to(acc) * k.repeat_interleave(g, 1).to(acc)).sum(-1) * scale  # [B, H]
    own_lse = softcap_scores(own, softcap)
    own_out = v.repeat_interleave(g, 1)
    have = index >= 0  # [S, B]
    pos = index.clamp(min=0).long()
    src = torch.arange(index.shape[0], device=index.device)[:, None]
    part_out = torch.where(have[..., None, None], outs[src, pos], 0).to(q.dtype)
    part_lse = torch.where(have[..., None], lses[src, pos].to(acc), float("-inf"))
    return merge_attention_states_ref(torch.cat([own_out[None], part_out]),
                                      torch.cat([own_lse[None], part_lse]), sinks=sinks)


def append_kv_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    offsets: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Write `k, v [B, T, Hkv, D]` at token offsets `offsets[b] + i` of each page list."""
    page_size = k_cache.shape[1]
    bsz, t = k.shape[:2]
    tok = offsets[:, None].long() + torch.arange(t, device=k.device)[None, :]  # [B, T]
    page = page_table.long().gather(1, tok // page_size)
    slot = tok % page_size
    k_cache[page, slot] = k.to(k_cache.dtype)
    v_cache[page, slot] = v.to(v_cache.dtype)
