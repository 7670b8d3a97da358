"""Triton code of the LSE merge kernels (launched by kflume/kernels/merge.py).

`merge_kernel` reduces N partial states of one (request, head) row; `merge_two_kernel`
folds a second state into the first in place; `merge_new_token_kernel` merges a row's
partials from S sources (found through an index) with its new token's own. Rows where
every partial is empty (lse = -inf) give (0, -inf): the running maximum is replaced by 0
before exponentials (the new-token merge always has one finite partial: the token's own).

`HAS_SINKS` adds GPT-OSS attention sinks: one more partial state per row, out = 0 and
lse = `SINKS[h]` (a learned logit per head), which adds `exp(sink)` to the softmax
denominator and no value. `SOFTCAP` caps the new token's own score as the split-KV
kernel caps every score (`softcap * tanh(scale * q.k / softcap)`). Without them the
`SINKS` pointer and the `softcap` float are not read.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._split_kv_triton import _tanh

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit(do_not_specialize=["num_states", "num_heads", "stride_on", "stride_ob", "stride_ln",
                               "stride_lb", "stride_Ob", "stride_Lb"])
def merge_kernel(
    OUTS, LSES, O, LSE, SINKS,
    num_states,
    num_heads,
    stride_on, stride_ob, stride_oh,
    stride_ln, stride_lb,
    stride_Ob, stride_Oh,
    stride_Lb,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // num_heads
    h = row % num_heads
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    one = tl.arange(0, 1)
    if HAS_SINKS:
        sink = tl.load(SINKS + h + one).to(tl.float32)
        m = sink
    else:
        m = tl.full([1], float("-inf"), dtype=tl.float32)
    for n in range(0, num_states):
        m = tl.maximum(m, tl.load(LSES + n * stride_ln + b * stride_lb + h + one))
    m_safe = tl.where(m == float("-inf"), 0.0, m)

    if HAS_SINKS:
        total = tl.exp2((sink - m_safe) * LOG2E)  # the sink's weight; its value is 0
    else:
        total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n in range(0, num_states):
        lse_n = tl.load(LSES + n * stride_ln + b * stride_lb + h + one)
        w = tl.exp2((lse_n - m_safe) * LOG2E)  # [1]; 0 for an empty partial
        o_n = tl.load(
            OUTS + n * stride_on + b * stride_ob + h * stride_oh + offs_d, mask=d_mask, other=0.0
        )
        total += w
        acc += w * o_n.to(tl.float32)

    nonempty = total > 0.0
    out = acc / tl.where(nonempty, total, 1.0)
    lse = tl.where(nonempty, m_safe + tl.log2(tl.where(nonempty, total, 1.0)) * LN2, float("-inf"))
    tl.store(O + b * stride_Ob + h * stride_Oh + offs_d, out.to(O.dtype.element_ty), mask=d_mask)
    tl.store(LSE + b * stride_Lb + h + one, lse)


@triton.jit(do_not_specialize=["num_heads", "stride_ob", "stride_lb", "stride_o2b", "stride_l2b"])
def merge_two_kernel(
    O, LSE, O2, LSE2,
    num_heads,
    stride_ob, stride_oh,
    stride_lb,
    stride_o2b, stride_o2h,
    stride_l2b,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // num_heads
    h = row % num_heads
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    one = tl.arange(0, 1)

    lse1 = tl.load(LSE + b * stride_lb + h + one)
    lse2 = tl.load(LSE2 + b * stride_l2b + h + one)
    m = tl.maximum(lse1, lse2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w1 = tl.exp2((lse1 - m_safe) * LOG2E)
    w2 = tl.exp2((lse2 - m_safe) * LOG2E)
    total = w1 + w2
    nonempty = total > 0.0
    o1 = tl.load(O + b * stride_ob + h * stride_oh + offs_d, mask=d_mask, other=0.0)
    o2 = tl.load(O2 + b * stride_o2b + h * stride_o2h + offs_d, mask=d_mask, other=0.0)
    out = (w1 * o1.to(tl.float32) + w2 * o2.to(tl.float32)) / tl.where(nonempty, total, 1.0)
    lse = tl.where(nonempty, m_safe + tl.log2(tl.where(nonempty, total, 1.0)) * LN2, float("-inf"))
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=d_mask)
    tl.store(LSE + b * stride_lb + h + one, lse)


@triton.jit(do_not_specialize=["num_sources", "num_heads", "group",
                               "stride_qb", "stride_kb", "stride_vb", "stride_os", "stride_or",
                               "stride_ls", "stride_lr", "stride_is", "stride_Ob", "stride_Lb"])
def merge_new_token_kernel(
    Q, K, V, OUTS, LSES, INDEX, O, LSE, SINKS,
    scale, softcap,
    num_sources, num_heads, group,
    stride_qb, stride_qh,
    stride_kb, stride_kh,
    stride_vb, stride_vh,
    stride_os, stride_or, stride_oh,
    stride_ls, stride_lr,
    stride_is,
    stride_Ob, stride_Oh,
    stride_Lb,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // num_heads
    h = row % num_heads
    hk = h // group
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    one = tl.arange(0, 1)

    # The new token's own partial: lse = its score, out = its value (finite: m never -inf).
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0)
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_d, mask=d_mask, other=0.0)
    # With SOFTCAP the caller passes scale / softcap.
    m = tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=0) * scale + tl.zeros([1], tl.float32)
    if SOFTCAP:
        m = _tanh(m) * softcap
    acc = tl.load(V + b * stride_vb + hk * stride_vh + offs_d, mask=d_mask,
                  other=0.0).to(tl.float32)
    total = tl.full([1], 1.0, dtype=tl.float32)
    for s in range(0, num_sources):
        j = tl.load(INDEX + s * stride_is + b + one)  # [1]; -1: no partial from s
        have = j >= 0
        j = tl.maximum(j, 0)
        lse_s = tl.load(LSES + s * stride_ls + j * stride_lr + h, mask=have,
                        other=float("-inf"))
        o_s = tl.load(OUTS + s * stride_os + j * stride_or + h * stride_oh + offs_d,
                      mask=d_mask & have, other=0.0)
        m_new = tl.maximum(m, lse_s)
        alpha = tl.exp2((m - m_new) * LOG2E)
        w = tl.exp2((lse_s - m_new) * LOG2E)  # 0 for an empty or absent partial
        acc = acc * alpha + w * o_s.to(tl.float32)
        total = total * alpha + w
        m = m_new
    if HAS_SINKS:
        sink = tl.load(SINKS + h + one).to(tl.float32)
        m_new = tl.maximum(m, sink)
        alpha = tl.exp2((m - m_new) * LOG2E)
        acc = acc * alpha
        total = total * alpha + tl.exp2((sink - m_new) * LOG2E)
        m = m_new
    tl.store(O + b * stride_Ob + h * stride_Oh + offs_d, (acc / total).to(O.dtype.element_ty),
             mask=d_mask)
    tl.store(LSE + b * stride_Lb + h + one, m + tl.log2(total) * LN2)
