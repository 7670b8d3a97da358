"""Merging partial attention states by their log-sum-exp.

`merge_attention_states` reduces N partials; `merge_state_` folds one partial into
another in place; `merge_new_token` is a decode step's whole merge in one kernel: each
row's partials from the nodes that hold its history, found through an index into their
reply buffers, and the new token's own partial, computed from q, k, v on the way (the
weight node's hot path inside the captured step: no scatter, no separate partial).
Formula and the empty-row rule: docs/conventions.md.

Attention sinks (GPT-OSS `sinks`, one learned logit per query head) enter a merge as
one more partial state per row, `out = 0, lse = sinks[h]` (`reference.sink_state`):
they add `exp(sink)` to the softmax denominator and no value. Pass them to the *final*
merge of a row only (`sinks=`), since each merge that gets them counts them once more.
"""

from __future__ import annotations

import torch

from ._launcher import cached_launch, check_grid
from ._validate import (
    FLOAT_DTYPES,
    check_inner_contiguous,
    check_tensor,
    on_device,
    positive_or_none,
)
from .reference import merge_attention_states_ref, merge_new_token_ref

__all__ = ["merge_attention_states", "merge_new_token", "merge_state_"]


def _block_d(d: int) -> int:
    return max(16, 1 << max(0, (d - 1).bit_length()))


def _check_sinks(sinks, heads: int, dev: torch.device) -> None:
    if sinks is not None:
        check_tensor("sinks", sinks, ndim=1, dtypes=FLOAT_DTYPES, device=dev, shape=(heads,))
        check_inner_contiguous("sinks", sinks)


def merge_attention_states(
    outs: torch.Tensor,
    lses: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge N partial states of disjoint ranges into one.

    Args:
        outs: `[N, B, H, D]` partial outputs, bf16/fp16/fp32.
        lses: `[N, B, H]` float32 natural-log LSE of each partial (-inf = empty).
        out, lse: optional preallocated results (`[B, H, D]` outs' dtype, `[B, H]` fp32).
        sinks: optional attention sinks `[H]` (bf16/fp16/fp32, one logit per head): one
            more partial with out 0 and lse `sinks[h]` in every row (GPT-OSS).

    Returns:
        `(out [B, H, D], lse [B, H] float32)`; rows where every partial is empty (and no
        sinks) give `(0, -inf)`. With sinks, lse includes them.
    """
    check_tensor("outs", outs, ndim=4, dtypes=FLOAT_DTYPES)
    n, bsz, h, d = outs.shape
    dev = outs.device
    check_tensor("lses", lses, ndim=3, dtypes=(torch.float32,), device=dev, shape=(n, bsz, h))
    check_inner_contiguous("outs", outs)
    check_inner_contiguous("lses", lses)
    _check_sinks(sinks, h, dev)
    if out is None:
        out = torch.empty(bsz, h, d, device=dev, dtype=outs.dtype)
    check_tensor("out", out, ndim=3, dtypes=(outs.dtype,), device=dev, shape=(bsz, h, d))
    check_inner_contiguous("out", out)
    if lse is None:
        lse = torch.empty(bsz, h, device=dev, dtype=torch.float32)
    check_tensor("lse", lse, ndim=2, dtypes=(torch.float32,), device=dev, shape=(bsz, h))
    check_inner_contiguous("lse", lse)
    if torch.compiler.is_compiling():
        torch.ops.kflume.merge_attention_states_(outs, lses, out, lse, sinks)
    else:
        _merge_impl(outs, lses, out, lse, sinks)
    return out, lse


def merge_state_(
    out: torch.Tensor, lse: torch.Tensor, other_out: torch.Tensor, other_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: `(out, lse) <- merge((out, lse), (other_out, other_lse))`.

    Args:
        out, other_out: `[B, H, D]`, same dtype (bf16/fp16/fp32).
        lse, other_lse: `[B, H]` float32.

    Returns `(out, lse)`, the updated inputs. Capturable: no allocation, no host sync.
    """
    check_tensor("out", out, ndim=3, dtypes=FLOAT_DTYPES)
    bsz, h, d = out.shape
    dev = out.device
    check_tensor("other_out", other_out, dtypes=(out.dtype,), device=dev, shape=tuple(out.shape))
    check_tensor("lse", lse, ndim=2, dtypes=(torch.float32,), device=dev, shape=(bsz, h))
    check_tensor("other_lse", other_lse, ndim=2, dtypes=(torch.float32,), device=dev,
                 shape=(bsz, h))
    for name, t in (("out", out), ("other_out", other_out), ("lse", lse),
                    ("other_lse", other_lse)):
        check_inner_contiguous(name, t)
    if torch.compiler.is_compiling():
        torch.ops.kflume.merge_state_(out, lse, other_out, other_lse)
    else:
        _merge_two_impl(out, lse, other_out, other_lse)
    return out, lse


def merge_new_token(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    outs: torch.Tensor,
    lses: torch.Tensor,
    index: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each row's new token over its history (partials from S sources) and
    over itself.

    Args:
        q: `[B, Hq, D]` the new tokens' queries (bf16/fp16/fp32).
        k, v: `[B, Hkv, D]` the new tokens' keys and values (Hq a multiple of Hkv).
        outs: `[S, R, Hq, D]` partial outputs of S sources (q's dtype; strided views of
            reply buffers are fine: only the last dim must be contiguous).
        lses: `[S, R, Hq]` float32 LSE of those partials (-inf = empty).
        index: `[S, B]` int64: where row b's partial sits among source s's R rows, -1
            where s holds none of row b.
        scale: softmax scale of the new token's own score.
        out, lse: optional preallocated results.
        softcap: Gemma2 softcapping of the new token's own score,
            `softcap * tanh(scale * q.k / softcap)` (the partials come capped from
            `split_kv_attention(softcap=)`); None: none.
        sinks: optional attention sinks `[Hq]` (bf16/fp16/fp32): one more partial with
            out 0 and lse `sinks[h]` (GPT-OSS).

    Returns `(out [B, Hq, D], lse [B, Hq] float32)`. Capturable: no host sync; the index
    values are not checked (they are device data a graph reads).
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    bsz, hq, d = q.shape
    dev = q.device
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=dev)
    hkv = k.shape[1]
    if k.shape[0] != bsz or k.shape[2] != d or hkv == 0 or hq % hkv:
        raise ValueError(f"k must be [{bsz}, Hkv, {d}] with {hq} a multiple of Hkv; got "
                         f"{list(k.shape)}")
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), device=dev, shape=tuple(k.shape))
    check_tensor("outs", outs, ndim=4, dtypes=(q.dtype,), device=dev)
    n_src, rows = outs.shape[:2]
    if tuple(outs.shape[2:]) != (hq, d):
        raise ValueError(f"outs must be [S, R, {hq}, {d}]; got {list(outs.shape)}")
    check_tensor("lses", lses, ndim=3, dtypes=(torch.float32,), device=dev,
                 shape=(n_src, rows, hq))
    check_tensor("index", index, ndim=2, dtypes=(torch.int64,), device=dev, shape=(n_src, bsz))
    for name, t in (("q", q), ("k", k), ("v", v), ("outs", outs)):
        check_inner_contiguous(name, t)
    if lses.stride(2) != 1 or index.stride(1) != 1:
        raise ValueError("lses and index must be contiguous in their last dim")
    _check_sinks(sinks, hq, dev)
    softcap = positive_or_none("softcap", softcap)
    if out is None:
        out = torch.empty_like(q)
    check_tensor("out", out, ndim=3, dtypes=(q.dtype,), device=dev, shape=(bsz, hq, d))
    check_inner_contiguous("out", out)
    if lse is None:
        lse = torch.empty(bsz, hq, device=dev, dtype=torch.float32)
    check_tensor("lse", lse, ndim=2, dtypes=(torch.float32,), device=dev, shape=(bsz, hq))
    if lse.stride(1) != 1:
        raise ValueError("lse must be contiguous in its last dim")
    args = (q, k, v, outs, lses, index, float(scale), out, lse, softcap, sinks)
    if torch.compiler.is_compiling():
        torch.ops.kflume.merge_new_token_(*args)
    else:
        _merge_new_token_impl(*args)
    return out, lse


def _merge_new_token_impl(q, k, v, outs, lses, index, scale, out, lse, softcap=None,
                          sinks=None) -> None:
    if q.is_cuda:
        launch_merge_new_token(q, k, v, outs, lses, index, scale, out, lse, softcap=softcap,
                               sinks=sinks)
    else:
        o, s = merge_new_token_ref(q, k, v, outs, lses, index, scale, softcap=softcap,
                                   sinks=sinks)
        out.copy_(o)
        lse.copy_(s)


def launch_merge_new_token(q, k, v, outs, lses, index, scale, out, lse, *,
                           softcap: float | None = None, sinks: torch.Tensor | None = None
                           ) -> None:
    """Launch the fused new-token merge (CUDA, or CPU under TRITON_INTERPRET=1). No checks."""
    from . import _merge_triton as mt

    bsz, hq, d = q.shape
    if bsz * hq == 0:
        return
    launch = cached_launch(mt.merge_new_token_kernel, out.device,
                           (q.dtype, None if sinks is None else sinks.dtype), num_warps=1,
                           HEAD_DIM=d, BLOCK_D=_block_d(d), SOFTCAP=softcap is not None,
                           HAS_SINKS=sinks is not None)
    floats = ((float(scale), 1.0) if softcap is None
              else (float(scale) / softcap, float(softcap)))  # Python floats: fp32 args
    with on_device(out):
        launch(check_grid((bsz * hq,), "merge_new_token"),
               (q, k, v, outs, lses, index, out, lse, lse if sinks is None else sinks), floats,
               (outs.shape[0], hq, hq // k.shape[1],
                q.stride(0), q.stride(1),
                k.stride(0), k.stride(1),
                v.stride(0), v.stride(1),
                outs.stride(0), outs.stride(1), outs.stride(2),
                lses.stride(0), lses.stride(1),
                index.stride(0),
                out.stride(0), out.stride(1),
                lse.stride(0)))


def _merge_impl(outs, lses, out, lse, sinks=None) -> None:
    if outs.is_cuda:
        launch_merge(outs, lses, out, lse, sinks=sinks)
    else:
        o, s = merge_attention_states_ref(outs, lses, sinks=sinks)
        out.copy_(o)
        lse.copy_(s)


def _merge_two_impl(out, lse, other_out, other_lse) -> None:
    if out.is_cuda:
        launch_merge_two(out, lse, other_out, other_lse)
    else:
        o, s = merge_attention_states_ref(
            torch.stack([out, other_out]), torch.stack([lse, other_lse])
        )
        out.copy_(o)
        lse.copy_(s)


def launch_merge(outs, lses, out, lse, *, sinks: torch.Tensor | None = None) -> None:
    """Launch the N-way merge kernel (CUDA, or CPU under TRITON_INTERPRET=1). No checks."""
    from . import _merge_triton as mt

    n, bsz, h, d = outs.shape
    if bsz * h == 0:
        return
    launch = cached_launch(mt.merge_kernel, out.device,
                           (outs.dtype, None if sinks is None else sinks.dtype), num_warps=1,
                           HEAD_DIM=d, BLOCK_D=_block_d(d), HAS_SINKS=sinks is not None)
    with on_device(out):
        launch(check_grid((bsz * h,), "merge_attention_states"),
               (outs, lses, out, lse, lse if sinks is None else sinks), (),
               (n, h,
                outs.stride(0), outs.stride(1), outs.stride(2),
                lses.stride(0), lses.stride(1),
                out.stride(0), out.stride(1),
                lse.stride(0)))


def launch_merge_two(out, lse, other_out, other_lse) -> None:
    """Launch the in-place two-state merge kernel. No checks."""
    from . import _merge_triton as mt

    bsz, h, d = out.shape
    if bsz * h == 0:
        return
    launch = cached_launch(mt.merge_two_kernel, out.device, (out.dtype,), num_warps=1, HEAD_DIM=d,
                           BLOCK_D=_block_d(d))
    with on_device(out):
        launch(check_grid((bsz * h,), "merge_state_"), (out, lse, other_out, other_lse), (),
               (h,
                out.stride(0), out.stride(1),
                lse.stride(0),
                other_out.stride(0), other_out.stride(1),
                other_lse.stride(0)))


@torch.library.custom_op("kflume::merge_attention_states_", mutates_args=("out", "lse"))
def _merge_op(outs: torch.Tensor, lses: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
              sinks: torch.Tensor | None = None) -> None:
    _merge_impl(outs, lses, out, lse, sinks)


@_merge_op.register_fake
def _(outs, lses, out, lse, sinks=None) -> None:
    return None


@torch.library.custom_op("kflume::merge_state_", mutates_args=("out", "lse"))
def _merge_two_op(
    out: torch.Tensor, lse: torch.Tensor, other_out: torch.Tensor, other_lse: torch.Tensor
) -> None:
    _merge_two_impl(out, lse, other_out, other_lse)


@_merge_two_op.register_fake
def _(out, lse, other_out, other_lse) -> None:
    return None


@torch.library.custom_op("kflume::merge_new_token_", mutates_args=("out", "lse"))
def _merge_new_token_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, outs: torch.Tensor,
                        lses: torch.Tensor, index: torch.Tensor, scale: float,
                        out: torch.Tensor, lse: torch.Tensor, softcap: float | None = None,
                        sinks: torch.Tensor | None = None) -> None:
    _merge_new_token_impl(q, k, v, outs, lses, index, scale, out, lse, softcap, sinks)


@_merge_new_token_op.register_fake
def _(q, k, v, outs, lses, index, scale, out, lse, softcap=None, sinks=None) -> None:
    return None
