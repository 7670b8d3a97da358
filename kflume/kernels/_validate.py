"""Argument checks shared by the public kernel wrappers.

Shape, dtype, device and layout checks read host-side metadata only; they run unless
a caller passes `check=False`. Checks on *values* (ranges against the page table, page
ids against the pool) need a device-to-host copy and a scan of the page table, so they
are a debug switch: `debug_checks=True` on a call, or `KFLUME_DEBUG_CHECKS=1` in the
environment when kflume.kernels is imported (`DEBUG_CHECKS`, the default of every
call). `values_checkable` says when they may run (never while a CUDA graph is being
captured or a function compiled).
"""

from __future__ import annotations

import contextlib
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32,)
DEBUG_ENV = "KFLUME_DEBUG_CHECKS"


def debug_checks_from_env() -> bool:
    """`KFLUME_DEBUG_CHECKS` set to anything but empty, 0, false, no or off."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


# Read once (an environment lookup per call would cost a microsecond on the hot path).
DEBUG_CHECKS = debug_checks_from_env()


def debug_checks_on(debug_checks: bool | None) -> bool:
    """A call's `debug_checks` argument, or the process default when it is None."""
    return DEBUG_CHECKS if debug_checks is None else bool(debug_checks)


def uses_triton(t: torch.Tensor) -> bool:
    """True when a kernel on `t` runs in Triton (CUDA), False for the torch reference."""
    return t.is_cuda


def capturing(t: torch.Tensor) -> bool:
    """True while the current CUDA stream of a CUDA tensor is being captured."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


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


def positive_or_none(name: str, x) -> float | None:
    """`x` as a float, checked to be positive and finite; None stays None."""
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        f = float("nan")
    if not 0 < f < float("inf"):
        raise ValueError(f"{name} must be a positive finite number or None; got {x!r}")
    return f


def split_kv_args_ok(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse) -> bool:
    """True when the arguments of split-KV attention pass every check of
    `check_split_kv_args`: a fast test of the common case (False means only: run the
    detailed checks, which raise with a message)."""
    tensor = torch.Tensor
    if not (isinstance(q, tensor) and isinstance(k_cache, tensor) and isinstance(v_cache, tensor)
            and isinstance(kv_start, tensor) and isinstance(kv_len, tensor)):
        return False
    qs, ks = q.shape, k_cache.shape
    if len(qs) != 3 or len(ks) != 4 or v_cache.shape != ks:
        return False
    bsz, hq, d = qs
    dt, dev = q.dtype, q.device
    if (dt not in FLOAT_DTYPES or k_cache.dtype != dt or v_cache.dtype != dt or ks[3] != d
            or ks[2] == 0 or hq % ks[2] or k_cache.device != dev or v_cache.device != dev
            or q.stride()[2] != 1 or k_cache.stride()[3] != 1 or v_cache.stride()[3] != 1):
        return False
    if page_table is None:
        if ks[0] != bsz:
            return False
    elif not (isinstance(page_table, tensor) and page_table.dtype == torch.int32
              and page_table.device == dev and len(page_table.shape) == 2
              and page_table.shape[0] == bsz and page_table.stride()[1] == 1):
        return False
    one = (bsz,)
    for t in (kv_start, kv_len):
        if t.shape != one or t.dtype != torch.int32 or t.device != dev or t.stride()[0] != 1:
            return False
    if out is not None and not (isinstance(out, tensor) and out.shape == qs and out.dtype == dt
                                and out.device == dev and out.stride()[2] == 1):
        return False
    if lse is not None and not (isinstance(lse, tensor) and lse.shape == (bsz, hq)
                                and lse.dtype == torch.float32 and lse.device == dev
                                and lse.stride()[1] == 1):
        return False
    return True


def check_split_kv_args(q, k_cache, v_cache, page_table, kv_start, kv_len, out, lse) -> None:
    """Shape, dtype, device and layout checks of split-KV attention; raise naming the
    argument (docs/conventions.md gives the shapes)."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    bsz, hq, d = q.shape
    dev = q.device
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=dev)
    num_pages, page_size, hkv, _ = k_cache.shape
    check_tensor("k_cache", k_cache, shape=(None, None, None, d))
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), device=dev, shape=k_cache.shape)
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"q has {hq} heads, which is not a multiple of the {hkv} KV heads of k_cache (GQA "
            "needs Hq % Hkv == 0)"
        )
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_inner_contiguous(name, t)
    if page_table is None:
        if num_pages != bsz:
            raise ValueError(
                f"with page_table=None, k_cache is a contiguous cache [B, L, Hkv, D] and its "
                f"first dimension must be the batch size {bsz}; got {num_pages}"
            )
    else:
        check_tensor("page_table", page_table, ndim=2, dtypes=INDEX_DTYPES, device=dev,
                     shape=(bsz,))
        check_inner_contiguous("page_table", page_table)
    for name, t in (("kv_start", kv_start), ("kv_len", kv_len)):
        check_tensor(name, t, ndim=1, dtypes=INDEX_DTYPES, device=dev, shape=(bsz,))
        check_inner_contiguous(name, t)
    if out is not None:
        check_tensor("out", out, ndim=3, dtypes=(q.dtype,), device=dev, shape=tuple(q.shape))
        check_inner_contiguous("out", out)
    if lse is not None:
        check_tensor("lse", lse, ndim=2, dtypes=(torch.float32,), device=dev, shape=(bsz, hq))
        check_inner_contiguous("lse", lse)


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
