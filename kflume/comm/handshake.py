"""How two peers meet before any UCX endpoint exists: one TCP socket, one frame each way.

A frame is a 4-byte little-endian length and a msgpack map (at most MAX_HEADER bytes,
decoded into plain types, never unpickled). The client says hello with the cluster
token and its own fields (UCX worker address, channel id, ...); the server checks the
token in constant time and the version before it creates anything, then answers with
its fields or a refusal that names the reason. The socket stays open afterwards: its
end-of-file is how either side learns that the other is gone.

The server reads hellos without blocking (`FrameReader`, driven from its serving loop,
kflume/comm/ucx_accept.py); the client waits for the answer, with a deadline.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
import struct
import time

import msgpack

from .base import DeadlineExceeded, TransportError
from .wire import MAX_HEADER, WireError

__all__ = ["FrameReader", "Refused", "check_hello", "encode_frame", "hello", "is_loopback",
           "parse_address", "recv_frame", "send_frame"]

VERSION = 1
_FRAME = struct.Struct("<I")


class Refused(TransportError):
    """A hello the server refuses; the message is what the client is told."""


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT; got {address!r}")
    return host or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` (an IP address or a name) reaches this machine only."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def encode_frame(obj: dict) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return _FRAME.pack(len(body)) + body


def send_frame(sock: socket.socket, obj: dict) -> None:
    sock.sendall(encode_frame(obj))


def _decode(body: bytes) -> dict:
    try:
        d = msgpack.unpackb(body, raw=False)
    except Exception as e:  # noqa: BLE001 - any malformed body
        raise WireError(f"handshake frame is not valid msgpack: {e}") from None
    if not isinstance(d, dict):
        raise WireError("handshake frame must be a map")
    return d


class FrameReader:
    """One frame read from a non-blocking socket, piece by piece: `feed(sock)` reads
    what has arrived and returns the frame once it is whole (None before). Raises
    WireError for a frame over MAX_HEADER or bytes past it, TransportError when the peer
    closes first."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, sock: socket.socket) -> dict | None:
        while True:
            try:
                chunk = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                raise TransportError("peer closed the connection during the handshake")
            self.buf += chunk
            if len(self.buf) >= 4 and _FRAME.unpack_from(self.buf)[0] > MAX_HEADER:
                raise WireError(f"handshake frame of {_FRAME.unpack_from(self.buf)[0]} bytes "
                                f"is too large (at most {MAX_HEADER})")
        if len(self.buf) < 4:
            return None
        (n,) = _FRAME.unpack_from(self.buf)
        if len(self.buf) < 4 + n:
            return None
        if len(self.buf) > 4 + n:
            raise WireError("peer sent more than its handshake frame")
        return _decode(bytes(self.buf[4:]))


def recv_frame(sock: socket.socket, deadline: float, peer: str = "peer") -> dict:
    """A frame from a blocking socket; DeadlineExceeded past `deadline`, naming `peer`."""

    def read(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"{peer}: the handshake timed out")
            sock.settimeout(left)
            try:
                chunk = sock.recv(n - len(buf))
            except TimeoutError:
                raise DeadlineExceeded(f"{peer}: the handshake timed out") from None
            if not chunk:
                raise TransportError(f"{peer} closed the connection during the handshake")
            buf += chunk
        return buf

    (n,) = _FRAME.unpack(read(4))
    if n > MAX_HEADER:
        raise WireError(f"{peer}: handshake frame of {n} bytes is too large")
    return _decode(read(n))


def hello(sock: socket.socket, token: str, fields: dict, deadline: float, peer: str) -> dict:
    """Client side: present `token` and `fields`; return the server's fields, or raise
    TransportError with the server's reason for refusing (DeadlineExceeded when no
    answer comes by `deadline`)."""
    send_frame(sock, {"v": VERSION, "token": token, **fields})
    t0 = time.monotonic()
    try:
        reply = recv_frame(sock, deadline, peer)
    except DeadlineExceeded:
        raise DeadlineExceeded(f"{peer}: no answer to the handshake (connect) within "
                               f"{max(deadline - t0, 0):.3g} s") from None
    if not reply.get("ok"):
        raise TransportError(f"{peer} refused the connection: {reply.get('err')}")
    return reply


def check_hello(got: dict, token: str) -> None:
    """Server side: raise Refused unless the hello carries the cluster token (compared
    in constant time) and this version."""
    theirs = got.get("token")
    if not isinstance(theirs, str) or not hmac.compare_digest(theirs.encode(), token.encode()):
        raise Refused("wrong cluster token (KFLUME_TOKEN)")
    if got.get("v") != VERSION:
        raise Refused(f"unsupported handshake version {got.get('v')!r} (this node speaks "
                      f"{VERSION})")
