"""The wire format: a versioned msgpack header, then the tensors it describes.

A message is one header (op, sequence number, layer, epoch, request ids, integer
fields, tensor descriptors) followed by one raw buffer per tensor descriptor. Headers
are decoded with msgpack into plain types and checked field by field: nothing from the
network is ever unpickled or evaluated. Tensor bytes are sent as they lie in memory
(contiguous, native byte order).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import msgpack
import torch

__all__ = ["VERSION", "OPS", "Header", "WireError", "encode", "decode", "DTYPES", "MAX_HEADER",
           "MAX_REQUESTS", "MAX_TENSORS", "pack_states", "unpack_states", "state_row_bytes"]

VERSION = 1
MAX_HEADER = 1 << 16  # bytes (64 KiB); a header beyond this is refused
MAX_TENSOR_BYTES = 1 << 36  # 64 GiB: refuse descriptors that would allocate absurd buffers
MAX_TENSORS = 254  # tensors of one message (parts 1..254; part 0 is the header)
MAX_DIMS = 8
MAX_REQUESTS = 1 << 16  # request ids in one message
MAX_ID = 256  # characters of a string request id
_I64 = (-(2**63), 2**63 - 1)
OPS = frozenset(
    {"open", "append", "attend", "stream", "mailbox", "cancel", "free", "truncate", "export",
     "import",
     "capture", "stats", "shutdown", "ok", "result", "error"}
)
DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_LEN = struct.Struct("<I")


class WireError(ValueError):
    """A header that does not decode or does not follow the format."""


@dataclass(slots=True)
class Header:
    """What a message says; the tensors follow it in `tensors` order.

    op: one of OPS. seq: the sender's sequence number (a reply carries the request's).
    layer / epoch: -1 when not relevant. requests: request ids (int or str).
    ints: named integer lists (e.g. kv_len, offsets, positions), one entry per request
    unless stated otherwise. tensors: (dtype name, shape) of each tensor that follows.
    info: small scalars (stats, errors); error: the message of an "error" reply.
    """

    op: str
    seq: int = 0
    layer: int = -1
    epoch: int = -1
    requests: list = field(default_factory=list)
    ints: dict[str, list[int]] = field(default_factory=dict)
    tensors: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    error: str = ""
    inline: list[int] = field(default_factory=list)  # tensors carried in the header message

    def describe(self, tensors) -> Header:
        """Fill `tensors` descriptors from actual tensors; returns self."""
        self.tensors = [(dtype_name(t.dtype), tuple(t.shape)) for t in tensors]
        return self


# ---- an attend reply: (out, lse) as one tensor ------------------------------------------
# One uint8 tensor [b, row]: row i holds out[i] ([Hq, D] in q's dtype), then lse[i] ([Hq]
# float32). The first a rows of a buffer in this layout are again one contiguous tensor,
# so a reply for any subset of a batch is one message, received straight into place.
def state_row_bytes(hq: int, d: int, dtype: torch.dtype) -> int:
    out_bytes = hq * d * torch.empty(0, dtype=dtype).element_size()
    if out_bytes % 4:
        raise ValueError(f"Hq * D * itemsize must be a multiple of 4 (lse is float32); got "
                         f"{hq} * {d} in {dtype}")
    return out_bytes + 4 * hq


def pack_states(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """`out [b, Hq, D]`, `lse [b, Hq]` float32 -> the reply layout (one copy)."""
    b = out.shape[0]
    return torch.cat([out.reshape(b, -1).view(torch.uint8),
                      lse.float().contiguous().view(torch.uint8)], 1)


def unpack_states(packed: torch.Tensor, hq: int, d: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The reply layout -> `(out [b, Hq, D], lse [b, Hq])`, strided views of `packed`
    (writing them writes `packed`: kernels take them as outputs)."""
    row = state_row_bytes(hq, d, dtype)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != row:
        raise ValueError(f"packed states must be uint8 [b, {row}]; got {packed.dtype} "
                         f"{list(packed.shape)}")
    n = row - 4 * hq
    return (packed[:, :n].view(dtype).unflatten(1, (hq, d)),
            packed[:, n:].view(torch.float32))


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} cannot be sent; use one of {sorted(DTYPES)}") from None


def encode(h: Header) -> bytes:
    """Header -> bytes: a 4-byte little-endian length, then the msgpack map."""
    body = msgpack.packb(
        {"v": VERSION, "op": h.op, "seq": h.seq, "layer": h.layer, "epoch": h.epoch,
         "req": list(h.requests), "ints": h.ints,
         "t": [[d, list(s)] for d, s in h.tensors], "info": h.info, "err": h.error,
         "inl": h.inline},
        use_bin_type=True,
    )
    if len(body) > MAX_HEADER:
        raise WireError(f"header of {len(body)} bytes exceeds the {MAX_HEADER}-byte limit")
    return _LEN.pack(len(body)) + body


def _int(name, x, lo=-(2**63), hi=2**63 - 1) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi:
        raise WireError(f"header field {name} must be an integer in [{lo}, {hi}]; got {x!r}")
    return x


def decode(buf) -> Header:
    """bytes (length-prefixed, possibly followed by slack) -> Header, checked."""
    return decode_with_end(buf)[0]


def decode_with_end(buf) -> tuple[Header, int]:
    """As `decode`, and the offset where the header ends (inline tensors follow it)."""
    mv = memoryview(buf).cast("B")
    if len(mv) < 4:
        raise WireError("message shorter than its 4-byte length prefix")
    (n,) = _LEN.unpack_from(mv, 0)
    if n > MAX_HEADER or n + 4 > len(mv):
        raise WireError(f"header length {n} does not fit the {len(mv) - 4} bytes received")
    try:
        d = msgpack.unpackb(bytes(mv[4 : 4 + n]), raw=False, strict_map_key=True)
    except Exception as e:
        raise WireError(f"header is not valid msgpack: {e}") from None
    if not isinstance(d, dict):
        raise WireError("header must be a map")
    if d.get("v") != VERSION:
        raise WireError(f"wire version {str(d.get('v'))[:20]} is not supported (this side speaks "
                        f"{VERSION})")
    op = d.get("op")
    if type(op) is not str or op not in OPS:
        raise WireError(f"unknown op {str(op)[:40]!r}")
    reqs = d.get("req", [])
    if type(reqs) is not list or len(reqs) > MAX_REQUESTS:
        raise WireError(f"request ids must be a list of at most {MAX_REQUESTS}")
    for r in reqs:
        if not ((type(r) is int and _I64[0] <= r <= _I64[1])
                or (type(r) is str and len(r) <= MAX_ID)):
            raise WireError(f"request ids must be 64-bit integers or strings of at most "
                            f"{MAX_ID} characters; got {str(r)[:40]!r}")
    ints = d.get("ints", {})
    if type(ints) is not dict or len(ints) > 32:
        raise WireError("ints must map at most 32 names to lists of integers")
    for k, v in ints.items():
        if type(k) is not str or type(v) is not list or len(v) > MAX_REQUESTS or not all(
                type(x) is int and _I64[0] <= x <= _I64[1] for x in v):
            raise WireError(f"ints[{str(k)[:40]}] must be a list of 64-bit integers")
    descs = d.get("t", [])
    if type(descs) is not list or len(descs) > MAX_TENSORS:
        raise WireError(f"a message carries at most {MAX_TENSORS} tensors")
    tensors = []
    for t in descs:
        if not (isinstance(t, list) and len(t) == 2 and isinstance(t[0], str)
                and t[0] in DTYPES and isinstance(t[1], list) and len(t[1]) <= MAX_DIMS):
            raise WireError(f"bad tensor descriptor {str(t)[:80]}")
        shape = tuple(_int("shape", s, 0, 2**40) for s in t[1])
        nbytes = DTYPES[t[0]].itemsize
        for s in shape:
            nbytes *= s
        if nbytes > MAX_TENSOR_BYTES:
            raise WireError(f"tensor of {nbytes} bytes exceeds the {MAX_TENSOR_BYTES} limit")
        tensors.append((t[0], shape))
    info = d.get("info", {})
    err = d.get("err", "")
    if not isinstance(info, dict) or not isinstance(err, str):
        raise WireError("info must be a map and err a string")
    inline = d.get("inl", [])
    if type(inline) is not list or not all(
        type(i) is int and 0 <= i < len(tensors) for i in inline
    ):
        raise WireError("inl must list indices of the tensors")
    h = Header(op, _int("seq", d.get("seq", 0)), _int("layer", d.get("layer", -1)),
               _int("epoch", d.get("epoch", -1)), reqs, ints, tensors, info, err, inline)
    return h, 4 + n


def empty_like_descriptor(desc: tuple[str, tuple[int, ...]], device) -> torch.Tensor:
    return transfer_empty(desc[1], DTYPES[desc[0]], device)


_TRANSFER_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def transfer_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An empty tensor for a transport to receive into.

    A transport writes CUDA memory outside stream order. The caching allocator hands a
    freed block only to allocations on the stream it was freed from, and would hand a
    block that a temporary freed while its kernel had not yet run: the message would
    then overwrite that kernel's input (seen: a node reading page ids from a message,
    "illegal memory access"). So CUDA receive buffers come from a stream that runs
    nothing. Whoever frees one after kernels read it must make the allocator wait for
    them (`record_stream`, or keep it until an event says they are done).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.empty(shape, dtype=dtype, device=device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _TRANSFER_STREAMS.get(device)
    if stream is None:
        stream = _TRANSFER_STREAMS[device] = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        return torch.empty(shape, dtype=dtype, device=device)
