"""Bad input to split_kv_attention raises an error that names the argument."""

from __future__ import annotations

import pytest
import torch

from kflume.kernels import split_kv_attention
from kflume.testing import random_paged_kv


@pytest.fixture
def args():
    pool = random_paged_kv(2, 40, 2, 64, 16)
    q = torch.randn(2, 8, 64)
    start = torch.tensor([0, 5], dtype=torch.int32)
    length = torch.tensor([40, 30], dtype=torch.int32)
    return dict(q=q, k_cache=pool.k_cache, v_cache=pool.v_cache, page_table=pool.page_table,
                kv_start=start, kv_len=length)


def call(args, **changes):
    a = {**args, **changes}
    return split_kv_attention(a["q"], a["k_cache"], a["v_cache"], a["page_table"],
                              a["kv_start"], a["kv_len"])


CASES = [
    (dict(q="q2d"), ValueError, "q must have 3 dimensions"),
    (dict(q="q64"), TypeError, "q must have dtype"),
    (dict(q="qlist"), TypeError, "q must be a torch.Tensor"),
    (dict(k_cache="k_bf16"), TypeError, "k_cache must have dtype float32"),
    (dict(k_cache="k_3d"), ValueError, "k_cache must have 4 dimensions"),
    (dict(k_cache="k_d32"), ValueError, "k_cache has shape .* dimension 3 must be 64"),
    (dict(v_cache="v_small"), ValueError, "v_cache has shape"),
    (dict(q="q_hq5"), ValueError, "not a multiple of the 2 KV heads"),
    (dict(page_table="pt_long"), TypeError, "page_table must have dtype int32"),
    (dict(page_table="pt_b3"), ValueError, "page_table has shape .* dimension 0 must be 2"),
    (dict(kv_start="start_neg"), ValueError, "kv_start must be >= 0"),
    (dict(kv_len="len_neg"), ValueError, "kv_len must be >= 0"),
    (dict(kv_len="len_beyond"), ValueError, r"request\(s\) \[1\] goes beyond the 3 pages"),
    (dict(kv_len="len_2d"), ValueError, "kv_len must have 1 dimensions"),
    (dict(kv_start="start_i64"), TypeError, "kv_start must have dtype int32"),
    (dict(page_table="pt_bad_id"), ValueError, r"page ids outside \[0, "),
    (dict(k_cache="k_strided"), ValueError, "k_cache must be contiguous in its last dimension"),
]


def make(args, what):
    q, k = args["q"], args["k_cache"]
    return {
        "q2d": q[0],
        "q64": q.double(),
        "qlist": q.tolist(),
        "k_bf16": k.bfloat16(),
        "k_3d": k[0],
        "k_d32": k[..., :32].contiguous(),
        "v_small": args["v_cache"][:-1],
        "q_hq5": q[:, :5],
        "pt_long": args["page_table"].long(),
        "pt_b3": torch.cat([args["page_table"]] * 2)[:3],
        "start_neg": torch.tensor([0, -1], dtype=torch.int32),
        "len_neg": torch.tensor([-3, 1], dtype=torch.int32),
        "len_beyond": torch.tensor([1, 44], dtype=torch.int32),
        "len_2d": args["kv_len"].view(2, 1),
        "start_i64": args["kv_start"].long(),
        "pt_bad_id": args["page_table"].clone().fill_(10_000),
        "k_strided": k.transpose(1, 3).contiguous().transpose(1, 3),
    }[what]


@pytest.mark.parametrize("change,exc,match", CASES, ids=[next(iter(c[0].values())) for c in CASES])
def test_bad_input_names_the_argument(args, change, exc, match):
    name, what = next(iter(change.items()))
    with pytest.raises(exc, match=match):
        call(args, **{name: make(args, what)})


def test_good_input_passes(args):
    out, lse = call(args)
    assert out.shape == (2, 8, 64) and lse.shape == (2, 8) and torch.isfinite(lse).all()


@pytest.mark.cuda
def test_device_mismatch(args):
    with pytest.raises(ValueError, match="k_cache is on cpu but q is on cuda"):
        call(args, q=args["q"].cuda())


def test_unused_page_table_entries_are_not_checked(args):
    """Entries past a request's pages may hold anything (e.g. -1 padding)."""
    pt = args["page_table"].clone()
    pt[0, 2:] = -1  # request 0 uses 0 tokens past page 2
    out, _ = call(args, page_table=pt, kv_len=torch.tensor([32, 30], dtype=torch.int32))
    assert torch.isfinite(out).all()
