"""Kernels on a GPU that is not the current device (an attention node on cuda:1 of a
process whose current device is cuda:0). GPU machine with two GPUs."""

from __future__ import annotations

import pytest
import torch

from kflume.kernels import append_kv, merge_attention_states, split_kv_attention
from kflume.kernels.reference import split_kv_attention_ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs two GPUs"),
]


def test_kernels_run_on_the_tensors_gpu_not_the_current_one():
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    g = torch.Generator(device=dev).manual_seed(0)
    b, hq, hkv, d, page, pages = 3, 8, 2, 64, 16, 12
    q = torch.randn(b, hq, d, device=dev, generator=g)
    kc = torch.zeros(pages, page, hkv, d, device=dev)
    vc = torch.zeros_like(kc)
    pt = torch.arange(pages, device=dev, dtype=torch.int32).view(b, pages // b)
    lens = torch.tensor([5, 33, 0], device=dev, dtype=torch.int32)
    k = torch.randn(b, 33, hkv, d, device=dev, generator=g)
    v = torch.randn(b, 33, hkv, d, device=dev, generator=g)
    append_kv(kc, vc, pt, torch.zeros(b, device=dev, dtype=torch.int32), k, v)
    start = torch.zeros(b, device=dev, dtype=torch.int32)
    out, lse = split_kv_attention(q, kc, vc, pt, start, lens, num_splits=2)
    ref_out, ref_lse = split_kv_attention_ref(q.double(), kc.double(), vc.double(), pt, start,
                                              lens, d**-0.5)
    assert out.device == dev and torch.cuda.current_device() == 0
    torch.testing.assert_close(out[:2].double(), ref_out[:2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse[:2].double(), ref_lse[:2], rtol=1e-4, atol=1e-4)
    m_out, m_lse = merge_attention_states(torch.stack([out, out]), torch.stack([lse, lse]))
    torch.testing.assert_close(m_out[:2], out[:2])
