"""A peer that speaks a node's protocol by hand: handshake frames and tagged UCX messages
built byte by byte, so that tests can send what no `NodeClient` would (garbage, short
frames, bad addresses). Plain sockets, msgpack and ucxx's blocking API; every wait has a
deadline."""

from __future__ import annotations

import os
import secrets
import socket
import struct
import time

import msgpack
import numpy as np

from kflume.comm.handshake import parse_address
from kflume.comm.wire import decode

VERSION = 1  # the handshake's
_FRAME = struct.Struct("<I")


def tag(channel: int, seq: int, part: int) -> int:
    """The tag layout of kflume/comm/ucx_conn.py."""
    return (channel << 32) | ((seq & 0xFFFFFF) << 8) | part


def _ucx():
    os.environ.setdefault("UCX_MM_ERROR_HANDLING", "y")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    from ucxx._lib import libucxx
    from ucxx._lib.arr import Array

    return libucxx, Array


class Worker:
    """One UCX worker for raw peers (one per test: workers are not cheap)."""

    def __init__(self) -> None:
        self.L, self.Array = _ucx()
        self.ctx = self.L.UCXContext({}, (self.L.Feature.TAG, self.L.Feature.WAKEUP))
        self.worker = self.L.UCXWorker(self.ctx)
        self.address = self.worker.address.tobytes()


def frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return _FRAME.pack(len(body)) + body


def read_frame(sock: socket.socket, timeout: float) -> dict | None:
    """The peer's answer frame, or None if it closed the socket first."""
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        if len(buf) >= 4:
            (n,) = _FRAME.unpack_from(buf)
            if len(buf) >= 4 + n:
                return msgpack.unpackb(buf[4 : 4 + n], raw=False)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no handshake answer within {timeout} s")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk


def hello(address: str, fields: dict, timeout: float = 10.0) -> tuple[socket.socket, dict | None]:
    """Send one handshake frame made of `fields`; the socket and the answer."""
    sock = socket.create_connection(parse_address(address), timeout=timeout)
    sock.sendall(frame(fields))
    return sock, read_frame(sock, timeout)


class RawPeer:
    """A connected peer (token handshake done, endpoint to the node made) that sends raw
    bytes on the node's tags and reads the node's answers."""

    def __init__(self, w: Worker, address: str, token: str, timeout: float = 10.0) -> None:
        self.w, self.timeout = w, timeout
        self.rx = secrets.randbits(31) | 1
        self.sock, reply = hello(address, {"v": VERSION, "token": token, "chan": self.rx,
                                           "addr": w.address, "info": {}, "inline": 0},
                                 timeout)
        if not reply or not reply.get("ok"):
            raise ConnectionError(f"handshake refused: {reply}")
        self.tx = int(reply["chan"])
        L = w.L
        addr = L.UCXAddress.create_from_buffer(np.frombuffer(reply["addr"], dtype=np.uint8))
        self.ep = L.UCXEndpoint.create_from_worker_address(w.worker, addr, True)
        self._keep: list = []

    def send(self, seq: int, data: bytes, part: int = 0) -> None:
        """`data` as message `seq` (part `part`): header bytes, or a part's bytes."""
        buf = np.frombuffer(bytearray(data) or bytearray(1), dtype=np.uint8)[: len(data)]
        req = self.ep.tag_send(self.w.Array(buf), self.w.L.UCXXTag(tag(self.tx, seq, part)))
        self._keep.append((req, buf))
        self.progress()

    def progress(self) -> None:
        self.w.worker.progress()
        self._keep = [(r, b) for r, b in self._keep if not r.completed]

    def recv(self, seq: int, timeout: float | None = None, part: int = 0):
        """The node's answer to message `seq`: its decoded header (tensors dropped), or
        TimeoutError."""
        L = self.w.L
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            self.progress()
            probe = self.w.worker.tag_probe(L.UCXXTag(tag(self.rx, seq, part)), remove=True)
            if probe.matched:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer to message {seq} within the deadline")
            time.sleep(0.0005)
        buf = np.zeros(max(probe.length, 1), dtype=np.uint8)
        req = self.w.worker.tag_recv_with_handle(self.w.Array(buf), probe)
        while not req.completed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"answer to message {seq} did not complete")
            self.w.worker.progress()
        req.check_error()
        return decode(buf[: probe.length]) if part == 0 else buf[: probe.length]

    def drain(self, seqs, timeout: float | None = None) -> list:
        return [self.recv(s, timeout) for s in seqs]

    def close(self) -> None:
        self.sock.close()
