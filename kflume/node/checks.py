"""The checks an AttentionNode makes before it touches its pools.

Each raises ValueError / TypeError / UnknownRequestError naming what is wrong, so that a
refused call leaves the node unchanged and the peer learns why.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..comm.wire import DTYPES, Header, state_row_bytes
from ..config import NodeConfig
from .pages import NodeCapacityError

MAX_Q_HEADS = 512  # query heads of a message or a stream
MAX_STREAM_BYTES = 4 << 30  # a stream's query and reply buffers


def message(node, h: Header) -> None:
    """A received header's tensor descriptors, checked against this node before any
    buffer is allocated for them (the op's handler checks the rest)."""
    c = node.config
    want = {"attend": 1, "append": 2, "import": 2}.get(h.op, 0)
    if len(h.tensors) != want:
        raise ValueError(f"{h.op} carries {len(h.tensors)} tensors; it needs {want}")
    if not want:
        return
    names = ("q",) if h.op == "attend" else ("k", "v")
    for name, (dtype, _) in zip(names, h.tensors):
        if DTYPES[dtype] != node.dtype:
            raise TypeError(f"{name} has dtype {DTYPES[dtype]}; this node holds {c.dtype} KV")
    b, cap, kv = len(h.requests), c.num_pages * c.page_size, (c.kv_heads, c.head_dim)
    if h.op == "attend":
        q = h.tensors[0][1]
        if len(q) != 3 or q[0] != b or q[2] != c.head_dim or not 0 < q[1] <= MAX_Q_HEADS:
            raise ValueError(f"q must be [{b}, Hq <= {MAX_Q_HEADS}, {c.head_dim}]; got {list(q)}")
        return
    k, v = (shape for _, shape in h.tensors)
    if h.op == "append":
        if k != v or len(k) not in (4, 5) or k[0] != b or k[-2:] != kv or (
                len(k) == 5 and not 0 < k[1] <= c.layers):
            raise ValueError(f"append: k, v must be [{b}, T, {kv[0]}, {kv[1]}] or [{b}, L <= "
                             f"{c.layers}, T, {kv[0]}, {kv[1]}]; got {list(k)}, {list(v)}")
        tokens = k[-3]
    else:
        if k != v or len(k) != 4 or k[0] != c.layers or k[2:] != kv:
            raise ValueError(f"import: k, v must be [{c.layers}, n, {kv[0]}, {kv[1]}]; got "
                             f"{list(k)}, {list(v)}")
        tokens = k[1]
    if tokens > cap:
        raise NodeCapacityError(f"{h.op}: {tokens} tokens exceed this node's capacity of {cap}")


def layer(config: NodeConfig, index: int) -> None:
    if not 0 <= index < config.layers:
        raise ValueError(f"layer {index} out of range: this node holds {config.layers} layers")


def layer_range(config: NodeConfig, layers: range) -> None:
    if not isinstance(layers, range) or layers.step != 1 or not layers:
        raise ValueError(f"layers must be a non-empty range of consecutive layers; got "
                         f"{layers!r}")
    layer(config, layers.start)
    layer(config, layers.stop - 1)


def on_device(node, t: torch.Tensor) -> bool:
    d = node.device
    return t.device.type == d.type and d.index in (None, t.device.index)


def kv(node, name: str, t: torch.Tensor, rows: int, tokens: int | None) -> None:
    c = node.config
    want = (rows, tokens, c.kv_heads, c.head_dim) if tokens is not None else None
    if t.dim() != 4 or (want and tuple(t.shape) != want) or tuple(t.shape[2:]) != (
            c.kv_heads, c.head_dim) or t.shape[0] != rows:
        raise ValueError(f"{name} must be [{rows}, T, {c.kv_heads}, {c.head_dim}]; got "
                         f"{list(t.shape)}")
    if t.dtype != node.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}; this node holds {c.dtype} KV")


def append_layers(node, layers: range, requests: Sequence, offsets: Sequence[int],
                  positions: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
    c = node.config
    layer_range(c, layers)
    b, n = len(requests), len(layers)
    if not (len(offsets) == len(positions) == b):
        raise ValueError("append: requests, offsets and positions differ in length")
    if len(set(requests)) != b:
        raise ValueError("append: a request appears twice")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 5 or tuple(t.shape[:2]) != (b, n) or tuple(t.shape[3:]) != (
                c.kv_heads, c.head_dim) or t.shape[2] != k.shape[2]:
            raise ValueError(f"{name} must be [{b}, {n}, T, {c.kv_heads}, {c.head_dim}]; got "
                             f"{list(t.shape)}")
        if t.dtype != node.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}; this node holds {c.dtype} KV")
    a, z = layers.start, layers.stop
    for rid, off in zip(requests, offsets):  # (per request, not per layer: host time)
        held = node.requests[rid].lengths[a:z] if rid in node.requests else [0] * n
        if not 0 <= off <= min(held):
            i = next(i for i, h in enumerate(held) if not 0 <= off <= h)
            raise ValueError(f"append offset {off} for request {rid!r} leaves a gap in layer "
                             f"{a + i}: the node holds {held[i]} of its tokens")
    for i, pos in enumerate(positions):
        if not 0 <= pos < 2**40:
            raise ValueError(f"append position {pos} of request {requests[i]!r} out of range")


def batch(node, layers: range, requests: Sequence, kv_len: Sequence[int],
          q_heads: int, kv_start: Sequence[int] | None = None) -> None:
    c = node.config
    layer_range(c, layers)
    if q_heads <= 0 or q_heads % c.kv_heads:
        raise ValueError(f"q must be [b, Hq, D] with Hq a multiple of the {c.kv_heads} KV "
                         f"heads; got Hq={q_heads}")
    if len(kv_len) != len(requests):
        raise ValueError("attend: requests and kv_len differ in length")
    for rid, n in zip(requests, kv_len):
        have = min(node.pages.get(rid).lengths[layers.start : layers.stop])
        if not 0 <= n <= have:
            raise ValueError(f"kv_len {n} for request {rid!r}: the node holds {have} tokens")
    if kv_start is not None:
        if len(kv_start) != len(requests):
            raise ValueError("attend: requests and kv_start differ in length")
        for rid, a, n in zip(requests, kv_start, kv_len):
            if not 0 <= a <= n:
                raise ValueError(f"kv_start {a} for request {rid!r} is not in [0, kv_len {n}]")


def stream_buffers(node, layers: range, q: torch.Tensor, out: torch.Tensor, b: int) -> None:
    c, n = node.config, len(layers)
    if q.dim() != 4 or tuple(q.shape[::3]) != (n, c.head_dim) or q.shape[1] < max(b, 1):
        raise ValueError(f"q must be [{n}, R >= {max(b, 1)}, Hq, {c.head_dim}]; got "
                         f"{list(q.shape)}")
    if q.dtype != node.dtype or not on_device(node, q):
        raise TypeError(f"q must be {c.dtype} on {node.device}; got {q.dtype} on {q.device}")
    rows = (n, q.shape[1], state_row_bytes(q.shape[2], c.head_dim, q.dtype))
    if tuple(out.shape) != rows or out.dtype != torch.uint8 or not on_device(node, out):
        raise ValueError(f"out must be uint8 {list(rows)} on {node.device}; got "
                         f"{out.dtype} {list(out.shape)} on {out.device}")


def imported(node, k: torch.Tensor, v: torch.Tensor) -> None:
    c = node.config
    if k.dim() != 4 or k.shape[0] != c.layers or tuple(k.shape[2:]) != (c.kv_heads, c.head_dim):
        raise ValueError(f"import: k must be [{c.layers}, n, {c.kv_heads}, {c.head_dim}]; "
                         f"got {list(k.shape)}")
    if v.shape != k.shape:
        raise ValueError("import: v must have k's shape")
    if k.dtype != node.dtype or v.dtype != node.dtype:
        raise TypeError(f"import: k, v must be {c.dtype}")


def stream(node, op: str, spec, first: int) -> None:
    """What bounds an attend stream's buffers (its checked `StreamSpec`, from layer
    `first`), checked before they exist: this node's head size, dtype and layers, the
    query heads, and the buffers' bytes."""
    c = node.config
    if spec.head_dim != c.head_dim or spec.dtype != node.dtype:
        raise ValueError(f"{op}: q is {spec.dtype} with head_dim {spec.head_dim}; this "
                         f"node holds {c.dtype} KV with head_dim {c.head_dim}")
    layer_range(c, range(first, first + spec.layers))
    if spec.heads % c.kv_heads or spec.heads > MAX_Q_HEADS:
        raise ValueError(f"{op}: heads must be a multiple of the {c.kv_heads} KV heads, at "
                         f"most {MAX_Q_HEADS}; got {spec.heads}")
    row = spec.heads * spec.head_dim * spec.dtype.itemsize
    nbytes = spec.layers * spec.rows * (row + state_row_bytes(spec.heads, spec.head_dim,
                                                              spec.dtype))
    if nbytes > MAX_STREAM_BYTES:
        raise ValueError(f"{op}: its buffers would take {nbytes} bytes (at most "
                         f"{MAX_STREAM_BYTES})")
