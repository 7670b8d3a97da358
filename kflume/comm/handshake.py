"""How two peers meet before any UCX endpoint exists: one TCP socket, one frame each way.

A frame is a 4-byte little-endian length and a msgpack map (at most MAX_HEADER bytes,
decoded into plain types, never unpickled). The client says hello with the cluster
token and its own fields (UCX worker address, channel id, ...); the server checks the
token in constant time and the version before it creates anything, then answers with
its fields or a refusal that names the reason. The socket stays open afterwards: its
end-of-file is how either side learns that the other is gone.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
import struct
import time

import msgpack

from .base import TransportError
from .wire import MAX_HEADER, WireError

__all__ = ["answer", "hello", "is_loopback", "parse_address"]

VERSION = 1
_FRAME = struct.Struct("<I")


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


def send_frame(sock: socket.socket, obj: dict) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    sock.sendall(_FRAME.pack(len(body)) + body)


def recv_frame(sock: socket.socket, deadline: float) -> dict:
    def read(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("handshake timed out")
            sock.settimeout(left)
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise TransportError("peer closed the connection during the handshake")
            buf += chunk
        return buf

    (n,) = _FRAME.unpack(read(4))
    if n > MAX_HEADER:
        raise WireError(f"handshake frame of {n} bytes is too large")
    d = msgpack.unpackb(read(n), raw=False)
    if not isinstance(d, dict):
        raise WireError("handshake frame must be a map")
    return d


def hello(sock: socket.socket, token: str, fields: dict, deadline: float, peer: str) -> dict:
    """Client side: present `token` and `fields`; return the server's fields, or raise
    TransportError with the server's reason for refusing."""
    send_frame(sock, {"v": VERSION, "token": token, **fields})
    reply = recv_frame(sock, deadline)
    if not reply.get("ok"):
        raise TransportError(f"{peer} refused the connection: {reply.get('err')}")
    return reply


def answer(sock: socket.socket, token: str, fields: dict, timeout: float = 5.0) -> dict:
    """Server side: check the client's token and version; answer with `fields` and
    return the client's, or send the refusal and raise TransportError."""
    got = recv_frame(sock, time.monotonic() + timeout)
    theirs = got.get("token")
    if not isinstance(theirs, str) or not hmac.compare_digest(theirs.encode(), token.encode()):
        send_frame(sock, {"ok": False, "err": "wrong cluster token (KFLUME_TOKEN)"})
        raise TransportError("wrong cluster token")
    if got.get("v") != VERSION or not isinstance(got.get("addr"), bytes):
        send_frame(sock, {"ok": False, "err": "unsupported handshake"})
        raise TransportError("unsupported handshake")
    send_frame(sock, {"ok": True, **fields})
    return got
