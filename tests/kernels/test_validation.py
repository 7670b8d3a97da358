"""Bad input to split_kv_attention raises an error that names the argument.

Shape, dtype, device and layout checks run on every call; checks of range values run
behind the debug switch (`debug_checks=True` or KFLUME_DEBUG_CHECKS=1).
"""

from __future__ import annotations

import pytest
import torch

from kflume.kernels import _validate, split_kv_attention
from kflume.testing import random_paged_kv


@pytest.fixture
def args():
    pool = random_paged_kv(2, 40, 2, 64, 16)
    q = torch.randn(2, 8, 64)
    start = torch.tensor([0, 5], dtype=torch.int32)
    length = torch.tensor([40, 30], dtype=torch.int32)
    return dict(q=q, k_cache=pool.k_cache, v_cache=pool.v_cache, page_table=pool.page_table,
                kv_start=start, kv_len=length)


def call(args, debug_checks=True, **changes):
    a = {**args, **changes}
    return split_kv_attention(a["q"], a["k_cache"], a["v_cache"], a["page_table"],
                              a["kv_start"], a["kv_len"], out=a.get("out"), lse=a.get("lse"),
                              debug_checks=debug_checks)


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
    (dict(kv_len="len_strided"), ValueError, "kv_len must be contiguous"),
    (dict(page_table="pt_strided"), ValueError, "page_table must be contiguous"),
    (dict(lse="lse_strided"), ValueError, "lse must be contiguous"),
    (dict(out="out_4d"), ValueError, "out must have 3 dimensions"),
    (dict(out="out_bf16"), TypeError, "out must have dtype float32"),
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
        "len_strided": torch.tensor([[40, 0], [30, 0]], dtype=torch.int32)[:, 0],
        "pt_strided": args["page_table"].t().contiguous().t(),
        "lse_strided": torch.empty(8, 2).t(),
        "out_4d": torch.empty(2, 8, 64, 1),
        "out_bf16": torch.empty(2, 8, 64, dtype=torch.bfloat16),
    }[what]


@pytest.mark.parametrize("change,exc,match", CASES, ids=[next(iter(c[0].values())) for c in CASES])
def test_bad_input_names_the_argument(args, change, exc, match):
    name, what = next(iter(change.items()))
    with pytest.raises(exc, match=match):
        call(args, **{name: make(args, what)})


def test_good_input_passes(args):
    out, lse = call(args)
    assert out.shape == (2, 8, 64) and lse.shape == (2, 8) and torch.isfinite(lse).all()


def test_good_input_takes_the_fast_check(args):
    """The one-expression check accepts good input (else every call pays the detailed
    checks); bad input is caught by the detailed checks in the cases above."""
    a = args
    base = (a["q"], a["k_cache"], a["v_cache"], a["page_table"], a["kv_start"], a["kv_len"])
    out, lse = torch.empty(2, 8, 64), torch.empty(2, 8)
    assert _validate.split_kv_args_ok(*base, None, None)
    assert _validate.split_kv_args_ok(*base, out, lse)
    wire = torch.empty(2, 8 * 64 + 8)  # out and lse of a row side by side, as on the wire
    assert _validate.split_kv_args_ok(*base, wire[:, :512].view(2, 8, 64), wire[:, 512:])
    k = torch.randn(2, 40, 2, 64)  # a contiguous cache [B, L, Hkv, D]
    assert _validate.split_kv_args_ok(a["q"], k, k, None, a["kv_start"], a["kv_len"], None, None)
    assert not _validate.split_kv_args_ok(*base, out.bfloat16(), lse)


def test_value_checks_are_a_debug_switch(args, monkeypatch):
    """Range values are checked with debug_checks=True or the process default
    (KFLUME_DEBUG_CHECKS=1 at import), not by default: they cost a host sync on CUDA."""
    monkeypatch.setattr(_validate, "DEBUG_CHECKS", False)
    neg = torch.tensor([-3, 30], dtype=torch.int32)
    out, lse = call(args, debug_checks=None, kv_len=neg)  # unchecked: an empty range
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()
    with pytest.raises(ValueError, match="kv_len must be >= 0"):
        call(args, debug_checks=True, kv_len=neg)
    monkeypatch.setattr(_validate, "DEBUG_CHECKS", True)
    with pytest.raises(ValueError, match="kv_len must be >= 0"):
        call(args, debug_checks=None, kv_len=neg)
    call(args, debug_checks=False, kv_len=neg)


@pytest.mark.parametrize("value,on", [("1", True), ("yes", True), ("", False), ("0", False),
                                      ("off", False), (None, False)])
def test_debug_switch_from_environment(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv(_validate.DEBUG_ENV, raising=False)
    else:
        monkeypatch.setenv(_validate.DEBUG_ENV, value)
    assert _validate.debug_checks_from_env() is on


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
