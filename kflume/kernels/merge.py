"""Merging partial attention states by their log-sum-exp.

`merge_attention_states` reduces N partials; `merge_state_` folds one partial into
another in place (the weight node's hot path: remote history + local new token).
Formula and the empty-row rule: docs/conventions.md.
"""

from __future__ import annotations

import torch

from ._validate import FLOAT_DTYPES, check_inner_contiguous, check_tensor, on_device
from .reference import merge_attention_states_ref

__all__ = ["merge_attention_states", "merge_state_"]


def _block_d(d: int) -> int:
    return max(16, 1 << max(0, (d - 1).bit_length()))


def merge_attention_states(
    outs: torch.Tensor,
    lses: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge N partial states of disjoint ranges into one.

    Args:
        outs: `[N, B, H, D]` partial outputs, bf16/fp16/fp32.
        lses: `[N, B, H]` float32 natural-log LSE of each partial (-inf = empty).
        out, lse: optional preallocated results (`[B, H, D]` outs' dtype, `[B, H]` fp32).

    Returns:
        `(out [B, H, D], lse [B, H] float32)`; rows where every partial is empty give
        `(0, -inf)`.
    """
    check_tensor("outs", outs, ndim=4, dtypes=FLOAT_DTYPES)
    n, bsz, h, d = outs.shape
    dev = outs.device
    check_tensor("lses", lses, ndim=3, dtypes=(torch.float32,), device=dev, shape=(n, bsz, h))
    check_inner_contiguous("outs", outs)
    if out is None:
        out = torch.empty(bsz, h, d, device=dev, dtype=outs.dtype)
    check_tensor("out", out, dtypes=(outs.dtype,), device=dev, shape=(bsz, h, d))
    check_inner_contiguous("out", out)
    if lse is None:
        lse = torch.empty(bsz, h, device=dev, dtype=torch.float32)
    check_tensor("lse", lse, ndim=2, dtypes=(torch.float32,), device=dev, shape=(bsz, h))
    if torch.compiler.is_compiling():
        torch.ops.kflume.merge_attention_states_(outs, lses, out, lse)
    else:
        _merge_impl(outs, lses, out, lse)
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
    check_inner_contiguous("out", out)
    check_inner_contiguous("other_out", other_out)
    if torch.compiler.is_compiling():
        torch.ops.kflume.merge_state_(out, lse, other_out, other_lse)
    else:
        _merge_two_impl(out, lse, other_out, other_lse)
    return out, lse


def _merge_impl(outs, lses, out, lse) -> None:
    if outs.is_cuda:
        launch_merge(outs, lses, out, lse)
    else:
        o, s = merge_attention_states_ref(outs, lses)
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


def launch_merge(outs, lses, out, lse) -> None:
    """Launch the N-way merge kernel (CUDA, or CPU under TRITON_INTERPRET=1). No checks."""
    from . import _merge_triton as mt

    n, bsz, h, d = outs.shape
    if bsz * h == 0:
        return
    with on_device(out):
        mt.merge_kernel[(bsz * h,)](
            outs, lses, out, lse,
            n, h,
            outs.stride(0), outs.stride(1), outs.stride(2),
            lses.stride(0), lses.stride(1),
            out.stride(0), out.stride(1),
            lse.stride(0),
            HEAD_DIM=d,
            BLOCK_D=_block_d(d),
            num_warps=1,
        )


def launch_merge_two(out, lse, other_out, other_lse) -> None:
    """Launch the in-place two-state merge kernel. No checks."""
    from . import _merge_triton as mt

    bsz, h, d = out.shape
    if bsz * h == 0:
        return
    with on_device(out):
        mt.merge_two_kernel[(bsz * h,)](
            out, lse, other_out, other_lse,
            h,
            out.stride(0), out.stride(1),
            lse.stride(0),
            other_out.stride(0), other_out.stride(1),
            other_lse.stride(0),
            HEAD_DIM=d,
            BLOCK_D=_block_d(d),
            num_warps=1,
        )


@torch.library.custom_op("kflume::merge_attention_states_", mutates_args=("out", "lse"))
def _merge_op(outs: torch.Tensor, lses: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    _merge_impl(outs, lses, out, lse)


@_merge_op.register_fake
def _(outs, lses, out, lse) -> None:
    return None


@torch.library.custom_op("kflume::merge_state_", mutates_args=("out", "lse"))
def _merge_two_op(
    out: torch.Tensor, lse: torch.Tensor, other_out: torch.Tensor, other_lse: torch.Tensor
) -> None:
    _merge_two_impl(out, lse, other_out, other_lse)


@_merge_two_op.register_fake
def _(out, lse, other_out, other_lse) -> None:
    return None
