"""The fused start of a captured slot (kflume/_captured_triton.py): q rows gathered for
the nodes, the new k, v rows stacked, then the post, against plain torch; on CPU under
the Triton interpreter and on CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import INTERPRET, triton_available

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not (INTERPRET and triton_available()), reason="needs TRITON_INTERPRET=1 (no GPU)")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hq,hkv,d,n,slots", [(32, 8, 128, 4, 2), (8, 8, 64, 3, 3),
                                               (4, 1, 64, 1, 1)])
def test_dispatch_gathers_stacks_then_posts(device, hq, hkv, d, n, slots):
    from kflume._captured_triton import dispatch

    g = torch.Generator().manual_seed(hq + n)
    # q, k, v as views of one fused projection [n, (hq + 2 hkv) d]: strided rows
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(torch.bfloat16).to(device)
    q = qkv[:, : hq * d].view(n, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(n, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
    gather = torch.randint(0, n, (slots * n,), generator=g).to(device)
    send = torch.zeros(slots * n, hq, d, dtype=torch.bfloat16, device=device)
    kv = torch.zeros(n, 2, hkv, d, dtype=torch.bfloat16, device=device)
    count = torch.zeros(1, dtype=torch.int32, device=device)
    seq = torch.tensor([5, 9], dtype=torch.int32, device=device)
    flag = torch.zeros(2, dtype=torch.int32, device=device)
    for step in range(2):
        dispatch(q, k, v, gather, send, kv, count, (seq, flag, 1))
        assert torch.equal(send, q[gather])
        assert torch.equal(kv, torch.stack((k, v), 1))
        assert count.item() == 0  # set back for the next launch
        assert seq.tolist() == [5, 10 + step] and flag.tolist() == [0, 10 + step]
    with pytest.raises(ValueError, match="rows must be contiguous"):
        dispatch(q.transpose(1, 2), k, v, gather, send, kv, count, (seq, flag, 1))
