"""What the fuzzer sends a node: hypothesis strategies for handshake payloads and message
frames (garbage, truncated, random msgpack maps with plausible fields, random tensor
descriptors), and the code that sends a drawn batch to a live node (tests/remote/rawpeer.py)."""

from __future__ import annotations

import math
import socket
import struct

import msgpack
from hypothesis import strategies as st

from kflume.comm.handshake import parse_address
from kflume.comm.wire import DTYPES, OPS, Header, WireError, decode, encode

from ..remote.rawpeer import VERSION, RawPeer, Worker, frame

# "shutdown" is a real request a token holder may make: it stops the node, as meant
NODE_OPS = sorted(OPS - {"shutdown"})
INFO_KEYS = ["scale", "layers", "heads", "head_dim", "dtype", "rows", "mailbox", "pull",
             "trace", "reset_timings", "stream", "mailboxes"]
INT_NAMES = ["kv_len", "offsets", "positions", "tokens", "start", "end"]

ints = st.one_of(st.integers(-3, 70), st.integers(-(2**63), 2**63 - 1),
                 st.sampled_from([0, 1, 2, 63, 64, 4096, 65536, 2**31, 2**40, 2**64 - 1]))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=True),
                    st.text(max_size=12), st.binary(max_size=12))
values = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)),
    max_leaves=12)
request_ids = st.lists(st.one_of(st.integers(-2, 5), st.sampled_from(["a", "b", "x" * 300]),
                                 st.text(max_size=4)), max_size=6)
shapes = st.lists(st.one_of(st.integers(0, 9), st.sampled_from([64, 2, 8, 4096, 2**20, 2**41,
                                                                -1])), max_size=6)
descriptors = st.lists(st.tuples(st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=8)),
                                 shapes).map(list), max_size=4)
infos = st.dictionaries(st.one_of(st.sampled_from(INFO_KEYS), st.text(max_size=5)),
                        st.one_of(values, st.floats(0.01, 2.0), st.integers(0, 300),
                                  st.sampled_from(sorted(DTYPES))), max_size=5)


@st.composite
def header_maps(draw, seq: int) -> dict:
    """A msgpack map a node may take for a header: plausible keys, values of any type."""
    m = {"v": draw(st.one_of(st.just(1), st.just(1), values)),
         "op": draw(st.one_of(st.sampled_from(NODE_OPS), values)),
         "seq": draw(st.one_of(st.just(seq), st.just(seq), ints, values))}
    for key, strat in (("layer", st.one_of(st.integers(-2, 3), ints, values)),
                       ("epoch", ints), ("req", st.one_of(request_ids, values)),
                       ("ints", st.one_of(st.dictionaries(st.sampled_from(INT_NAMES),
                                                          st.lists(ints, max_size=6),
                                                          max_size=3), values)),
                       ("t", st.one_of(descriptors, values)), ("info", st.one_of(infos, values)),
                       ("err", st.one_of(st.text(max_size=8), values)),
                       ("inl", st.one_of(st.lists(st.integers(-1, 4), max_size=3), values))):
        if draw(st.booleans()):
            m[key] = draw(strat)
    return m


def _packed(m: dict) -> bytes:
    body = msgpack.packb(m, use_bin_type=True)
    return struct.pack("<I", len(body)) + body


@st.composite
def message_frames(draw, seq: int) -> tuple[str, bytes]:
    """(kind, bytes) of one message from a connected peer, as its message `seq`."""
    kind = draw(st.sampled_from(["garbage", "map", "map", "map", "truncated", "header",
                                 "header", "prefix"]))
    if kind == "garbage":
        return kind, draw(st.binary(max_size=200))
    if kind == "map":
        return kind, _packed(draw(header_maps(seq)))
    h = Header(draw(st.sampled_from(NODE_OPS)), seq=seq, layer=draw(st.integers(-1, 3)),
               requests=draw(st.lists(st.sampled_from(["a", "b", 1, 2]), max_size=4)),
               ints={k: draw(st.lists(st.integers(-2, 70), max_size=4))
                     for k in draw(st.lists(st.sampled_from(INT_NAMES), max_size=3))},
               info=draw(infos))
    h.tensors = [(dt, tuple(abs(s) % 70 for s in shape))
                 for dt, shape in draw(descriptors) if dt in DTYPES]
    try:
        data = encode(h)
    except (WireError, ValueError, OverflowError, TypeError):
        return "garbage", b"\x00"
    if kind == "truncated":
        return kind, data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if kind == "prefix":  # a length prefix that does not match the body
        return kind, struct.pack("<I", draw(st.integers(0, 1 << 17))) + data[4:]
    return kind, data


@st.composite
def handshakes(draw, token: str, address: bytes) -> bytes:
    """What a stranger, or a peer with the token, sends to a node's port."""
    kind = draw(st.sampled_from(["garbage", "map", "fields", "fields", "address"]))
    if kind == "garbage":
        return draw(st.binary(max_size=120))
    if kind == "map":
        return frame(draw(header_maps(0)))
    fields = {"v": draw(st.one_of(st.just(VERSION), values)),
              "token": draw(st.one_of(st.just(token), st.just(token), values)),
              "chan": draw(st.one_of(st.integers(-1, 2**33), values)),
              "addr": draw(st.one_of(st.binary(max_size=80), values)),
              "info": draw(st.one_of(infos, values)),
              "inline": draw(st.one_of(st.integers(-1, 1 << 21), values))}
    if kind == "address":  # the right token, a real address cut or with bytes changed
        a = bytearray(address)
        for _ in range(draw(st.integers(0, 3))):
            i = draw(st.one_of(st.integers(0, 12), st.integers(0, len(a) - 1)))
            a[i] = draw(st.one_of(st.sampled_from([0, 1, 0x20, 0x40, 0x7F, 0x80, 0xFF]),
                                  st.integers(0, 255)))
        cut = draw(st.one_of(st.just(len(a)), st.integers(0, len(a) + 4)))
        fields.update(token=token, v=VERSION, chan=5, inline=0, addr=bytes(a[:cut]))
    return frame(fields)


@st.composite
def mutations(draw) -> tuple[int, int, int]:
    """How to derive two more frames from a drawn one: where to cut it, and which byte
    to set to what (positions taken modulo its length)."""
    return draw(st.integers(0, 1 << 16)), draw(st.integers(0, 1 << 16)), draw(
        st.integers(0, 255))


def variants(data: bytes, cut: int, pos: int, value: int) -> list[bytes]:
    """The frame, cut short, and with one byte changed."""
    out = [data, data[: cut % (len(data) + 1)]]
    if data:
        b = bytearray(data)
        b[pos % len(b)] = value
        out.append(bytes(b))
    return out


def parts_of(data: bytes) -> list[int]:
    """Byte counts of the parts a node would wait for after header `data` (its
    non-inline tensors), capped: a big one is sent 1 byte long (refused, not waited on)."""
    try:
        h = decode(data)
    except (WireError, ValueError, OverflowError, TypeError, struct.error):
        return []
    if h.op == "stream":  # its queries, one a layer, if it opened
        layers = h.info.get("layers")
        return [1] * layers if type(layers) is int and 0 < layers <= 8 else []
    out = []
    for i, (dt, shape) in enumerate(h.tensors):
        if i not in h.inline:
            n = DTYPES[dt].itemsize * math.prod(shape)
            out.append(n if n <= 1 << 16 else 1)
    return out


class Fuzzer:
    """Sends drawn frames to a live node: message frames on one connected raw peer, in
    order, and handshake payloads on fresh TCP connections."""

    def __init__(self, address: str, token: str) -> None:
        self.address, self.token = address, token
        self.w = Worker()
        self.peer = RawPeer(self.w, address, token)
        self.seq = self.synced = 0
        self.frames = 0

    def message(self, data: bytes, wrong_sizes: bool) -> None:
        seq, self.seq = self.seq, self.seq + 1
        self.peer.send(seq, data)
        for i, n in enumerate(parts_of(data)):
            self.peer.send(seq, b"\x01" * (n + (1 if wrong_sizes else 0)), part=i + 1)
        self.frames += 1

    def handshake(self, payload: bytes) -> None:
        s = socket.create_connection(parse_address(self.address), timeout=5)
        try:
            s.sendall(payload)
        except OSError:
            pass
        s.close()
        self.frames += 1

    def sync(self, timeout: float = 10.0) -> None:
        """Check that the node answered every message sent since the last sync, each
        once and under its own sequence number, then a stats call."""
        seq, self.seq = self.seq, self.seq + 1
        self.peer.send(seq, encode(Header("stats", seq=seq)))
        for s in range(self.synced, seq):
            h = self.peer.recv(s, timeout)
            assert h.seq == s, f"message {s} answered as {h.seq}: {h}"
        assert self.peer.recv(seq, timeout).op == "ok"
        self.synced = self.seq

    def close(self) -> None:
        self.peer.close()
