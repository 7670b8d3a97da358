"""Argument checks shared by the public kernel wrappers.

Shape, dtype and device checks are cheap host-side metadata reads and always run.
Checks on *values* held in device memory (ranges, page ids) need a device-to-host copy:
`values_checkable` says when they may run (never while a CUDA graph is being captured).
"""

from __future__ import annotations

import contextlib

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32,)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
    shape: tuple[int | None, ...] | None = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; move it to {device}")
    if shape is not None:
        for i, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}; dimension {i} must be {want}"
                )
    return t


def check_inner_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (call .contiguous())")


def values_checkable(t: torch.Tensor) -> bool:
    """True when reading t's values on the host is allowed (not during graph capture)."""
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return not torch.compiler.is_compiling()


def check_ranges(
    page_table: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    page_size: int,
    num_pages: int,
    start_name: str,
    len_name: str,
) -> None:
    """Ranges must be non-negative, inside the page list, and point at pages of the pool."""
    if not values_checkable(start) or start.numel() == 0:
        return
    start_l = start.long()
    len_l = length.long()
    end = start_l + len_l
    pages_given = page_table.shape[1]
    capacity = pages_given * page_size
    cols = torch.arange(pages_given, device=page_table.device)
    touched = (cols[None, :] < ((end + page_size - 1) // page_size)[:, None]) & (
        cols[None, :] >= (start_l // page_size)[:, None]
    ) & (len_l > 0)[:, None]
    bad_ids = touched & ((page_table < 0) | (page_table >= num_pages))
    # One device-to-host copy for all value checks.
    lo_start, lo_len, room, n_bad = torch.stack(
        [start_l.min(), len_l.min(), capacity - end.max(), bad_ids.sum()]
    ).tolist()
    if lo_start < 0:
        raise ValueError(f"{start_name} must be >= 0; got {start.cpu().tolist()}")
    if lo_len < 0:
        raise ValueError(f"{len_name} must be >= 0; got {length.cpu().tolist()}")
    if room < 0:
        bad = (end > capacity).nonzero().flatten().cpu().tolist()
        raise ValueError(
            f"range [{start_name}, {start_name} + {len_name}) of request(s) {bad} goes beyond the "
            f"{pages_given} pages x {page_size} tokens given in page_table"
        )
    if n_bad:
        raise ValueError(f"page_table holds page ids outside [0, {num_pages}) for the ranges given")


def on_device(t: torch.Tensor):
    """Make `t`'s CUDA device current for a launch (Triton launches on the current device:
    a tensor on another GPU would be refused as inaccessible)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
