"""The wire header: round trips, and refusal of anything malformed (never unpickled)."""

from __future__ import annotations

import msgpack
import pytest
import torch

from kflume.comm.wire import (
    MAX_HEADER,
    Header,
    WireError,
    decode,
    encode,
    pack_states,
    state_row_bytes,
    unpack_states,
)


def test_round_trip():
    t = [torch.zeros(3, 4, dtype=torch.bfloat16), torch.zeros(0, dtype=torch.float32)]
    h = Header("attend", seq=7, layer=3, epoch=11, requests=[1, "r-2"],
               ints={"kv_len": [5, 0]}, info={"scale": 0.125}).describe(t)
    d = decode(encode(h) + b"slack after the header is ignored")
    assert d == h and d.tensors == [("bfloat16", (3, 4)), ("float32", (0,))]


def raw(d: dict) -> bytes:
    body = msgpack.packb(d)
    return len(body).to_bytes(4, "little") + body


GOOD = {"v": 1, "op": "ok", "seq": 0}


@pytest.mark.parametrize("payload,match", [
    (b"\x01\x00", "shorter than its 4-byte length"),
    (b"\xff\xff\x00\x00abc", "does not fit"),
    (b"\x03\x00\x00\x00\xc1\xc1\xc1", "not valid msgpack"),
    (raw([1, 2]), "must be a map"),
    (raw({**GOOD, "v": 2}), "wire version 2 is not supported"),
    (raw({**GOOD, "op": "exec"}), "unknown op 'exec'"),
    (raw({**GOOD, "seq": "1"}), "seq must be an integer"),
    (raw({**GOOD, "req": [1.5]}), "request ids"),
    (raw({**GOOD, "ints": {"kv_len": ["x"]}}), r"ints\[kv_len\]"),
    (raw({**GOOD, "t": [["complex64", [2]]]}), "bad tensor descriptor"),
    (raw({**GOOD, "t": [["float32", [-1]]]}), "shape must be an integer"),
    (raw({**GOOD, "t": [["float32", [2**30, 2**30]]]}), "exceeds"),
    (raw({**GOOD, "err": 5}), "err a string"),
    (raw({**GOOD, "op": ["ok"]}), "unknown op"),
    (raw({**GOOD, "req": ["x" * 257]}), "request ids must be 64-bit integers or strings"),
    (raw({**GOOD, "req": [2**64 - 1]}), "request ids must be 64-bit integers"),
    (raw({**GOOD, "ints": {"kv_len": [2**64 - 1]}}), r"ints\[kv_len\] must be a list of 64"),
    (raw({**GOOD, "ints": {f"k{i}": [] for i in range(33)}}), "at most 32 names"),
    (raw({**GOOD, "t": [["uint8", [1]]] * 255}), "at most 254 tensors"),
    (raw({**GOOD, "t": [["uint8", [1] * 9]]}), "bad tensor descriptor"),
])
def test_malformed_headers_are_refused(payload, match):
    with pytest.raises(WireError, match=match):
        decode(payload)


def test_pickle_is_never_a_header():
    import pickle

    with pytest.raises(WireError):
        decode(len(b := pickle.dumps({"op": "ok"})).to_bytes(4, "little") + b)


def test_header_size_limit():
    with pytest.raises(WireError, match="exceeds"):
        encode(Header("ok", requests=list(range(MAX_HEADER))))
    with pytest.raises(WireError, match="cannot be sent"):
        Header("ok").describe([torch.zeros(2, dtype=torch.complex64)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attend_reply_layout_round_trips_and_its_first_rows_are_one_tensor(dtype):
    out, lse = torch.randn(5, 4, 6).to(dtype), torch.randn(5, 4)
    lse[1] = float("-inf")  # an empty range's lse survives the bytes
    packed = pack_states(out, lse)
    assert packed.dtype == torch.uint8 and packed.shape == (5, state_row_bytes(4, 6, dtype))
    o, s = unpack_states(packed, 4, 6, dtype)
    assert torch.equal(o, out) and torch.equal(s, lse)
    head = packed[:3]  # what a reply for 3 of the 5 rows is received into
    assert head.is_contiguous()
    o3, s3 = unpack_states(head, 4, 6, dtype)
    o3.zero_()  # the views write the buffer (kernels take them as outputs)
    assert (packed[:3, : 4 * 6 * out.element_size()] == 0).all()
    assert torch.equal(s3, lse[:3])


def test_attend_reply_layout_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="multiple of 4"):
        state_row_bytes(3, 3, torch.bfloat16)
    with pytest.raises(ValueError, match=r"packed states must be uint8 \[b, 64\]"):
        unpack_states(torch.zeros(2, 65, dtype=torch.uint8), 4, 6, torch.bfloat16)
