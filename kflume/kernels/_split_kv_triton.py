"""Triton code of the split-KV decode kernel (launched by kflume/kernels/split_kv.py).

One program per (request, KV head, split): it loads the query heads of the GQA group as
one tile (padded to 16 rows so that `tl.dot` runs on tensor cores), walks its chunk of the
request's token range through the page table, and keeps an online softmax in base 2
(`scale * log2(e)` folded into the scores). With one split it writes the final
`(out, lse)`; with several, each split writes a float32 partial that the merge kernel
reduces.

With `SOFTCAP` (Gemma2's attention-logit softcapping) a score becomes
`softcap * tanh(scale * q.k / softcap)`: the caller passes `scale_log2 = scale / softcap`
and `softcap_log2 = softcap * log2(e)`; without it `scale_log2 = scale * log2(e)` and
`softcap_log2` is not read, so the kernel compiled for `SOFTCAP=False` is the plain one.

The grid is `(B * Hkv, splits)`: KV heads vary fastest, then requests (the x dimension
holds up to 2^31 - 1 programs), then splits.

`UPCAST_DOT` casts the operands of `tl.dot` to float32 (after the same rounding of p);
it is set only under TRITON_INTERPRET=1, whose bf16 `tl.dot` returns garbage on CPU
(seen with Triton 3.9).
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tanh(x):
    """tanh from exp2 (portable to the interpreter): odd, exact at 0, +-1 for large |x|."""
    t = tl.exp2(tl.abs(x) * -2.8853900817779268)  # exp(-2|x|) = 2^(-2 log2(e) |x|)
    r = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -r, r)


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i, n0, hi, start, page_size, scale_log2, softcap_log2,
    pt_row, k_head, v_head, stride_kp, stride_ks, stride_vp, stride_vs,
    offs_n, offs_d, d_mask,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr,
    UPCAST_DOT: tl.constexpr, PAGE_SHIFT: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One BLOCK_N tile of the online softmax. MASKED: the tile may run past `hi`."""
    tok = start + n0 + offs_n
    n_mask = (n0 + offs_n) < hi
    if PAGE_SHIFT >= 0:  # power-of-two pages: shifts instead of divisions
        pidx = tok >> PAGE_SHIFT
        slot = tok & ((1 << PAGE_SHIFT) - 1)
    else:
        pidx = tok // page_size
        slot = tok % page_size
    if MASKED:
        page = tl.load(pt_row + pidx, mask=n_mask, other=0).to(tl.int64)
    else:
        page = tl.load(pt_row + pidx).to(tl.int64)
    k_ptr = k_head + page[:, None] * stride_kp + slot[:, None] * stride_ks + offs_d[None, :]
    v_ptr = v_head + page[:, None] * stride_vp + slot[:, None] * stride_vs + offs_d[None, :]
    if MASKED:
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr, mask=kv_mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptr)
    else:
        k = tl.load(k_ptr, mask=d_mask[None, :], other=0.0)
    s = _dot(q, tl.trans(k), IEEE, UPCAST_DOT) * scale_log2
    if SOFTCAP:
        s = _tanh(s) * softcap_log2
    if MASKED:
        s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only masked tokens keeps m = -inf: shift by 0 instead.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptr, mask=kv_mask, other=0.0)
    elif EVEN_D:
        v = tl.load(v_ptr)
    else:
        v = tl.load(v_ptr, mask=d_mask[None, :], other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, UPCAST_DOT)
    return acc, m_new, l_i


# Values that change while a node serves (split count, page-table width, output buffer
# shapes) are not specialised on: a recompile mid-run would stall the step that needs it.
@triton.jit(do_not_specialize=["num_splits", "stride_ptb", "stride_os", "stride_ob", "stride_oh",
                               "stride_ls", "stride_lb"])
def split_kv_kernel(
    Q, K, V, PT, KV_START, KV_LEN, O, LSE,
    scale_log2,
    softcap_log2,
    page_size,
    num_splits,
    stride_qb, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_ptb,
    stride_os, stride_ob, stride_oh,
    stride_ls, stride_lb,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    PAGE_SHIFT: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    # KV heads vary fastest across the grid: the programs that run side by side read
    # neighbouring 256-byte pieces of the same NHD token rows.
    row = tl.program_id(0)
    kvh = row % KV_HEADS
    b = row // KV_HEADS
    split = tl.program_id(1)

    start = tl.load(KV_START + b)
    length = tl.load(KV_LEN + b)
    # Each split takes a whole number of BLOCK_N tiles; trailing splits may be empty.
    chunk = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)
    full = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N  # end of the unmasked tiles

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_h

    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    pt_row = PT + b.to(tl.int64) * stride_ptb
    k_head = K + kvh * stride_kh
    v_head = V + kvh * stride_vh
    for n0 in range(lo, full, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, n0, hi, start, page_size, scale_log2, softcap_log2,
            pt_row, k_head, v_head, stride_kp, stride_ks, stride_vp, stride_vs,
            offs_n, offs_d, d_mask,
            False, HEAD_DIM == BLOCK_D, IEEE, UPCAST_DOT, PAGE_SHIFT, SOFTCAP,
        )
    if full < hi:
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, full, hi, start, page_size, scale_log2, softcap_log2,
            pt_row, k_head, v_head, stride_kp, stride_ks, stride_vp, stride_vs,
            offs_n, offs_d, d_mask,
            True, HEAD_DIM == BLOCK_D, IEEE, UPCAST_DOT, PAGE_SHIFT, SOFTCAP,
        )

    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * LN2, float("-inf"))
    o_ptr = O + split * stride_os + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
    tl.store(LSE + split * stride_ls + b * stride_lb + heads, lse, mask=h_mask)
