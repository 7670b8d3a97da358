"""Triton code of the KV append kernel (launched by kflume/kernels/append.py).

One program per (request, new token), on a one-dimensional grid of `B * T` programs
(CUDA allows 2^31 - 1 along x but only 65,535 along y and z, so a long prefill cannot
take a grid dimension of its own): each finds its token's page and slot through the
page table and copies the token's `[Hkv, D]` key and value rows into the pool.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_tokens", "stride_ptb", "stride_kb", "stride_kt", "stride_vb",
                               "stride_vt"])
def append_kv_kernel(
    KC, VC, PT, OFFSETS, K, V,
    page_size,
    num_tokens,
    stride_kcp, stride_kcs, stride_kch,
    stride_vcp, stride_vcs, stride_vch,
    stride_ptb,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_tokens
    i = pid - b * num_tokens
    tok = tl.load(OFFSETS + b) + i
    page = tl.load(PT + b.to(tl.int64) * stride_ptb + tok // page_size).to(tl.int64)
    slot = tok % page_size
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM)
    row = offs_h[:, None]
    col = offs_d[None, :]
    src_k = b.to(tl.int64) * stride_kb + i.to(tl.int64) * stride_kt
    src_v = b.to(tl.int64) * stride_vb + i.to(tl.int64) * stride_vt
    k = tl.load(K + src_k + row * stride_kh + col, mask=mask)
    v = tl.load(V + src_v + row * stride_vh + col, mask=mask)
    tl.store(KC + page * stride_kcp + slot * stride_kcs + row * stride_kch + col,
             k.to(KC.dtype.element_ty), mask=mask)
    tl.store(VC + page * stride_vcp + slot * stride_vcs + row * stride_vch + col,
             v.to(VC.dtype.element_ty), mask=mask)
