"""The handshake frames over a socket pair: token and version checks, refusals that name
the reason, limits on what a peer may send, and the server's side read without blocking."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from kflume.comm import DeadlineExceeded, TransportError
from kflume.comm.handshake import (
    FrameReader,
    Refused,
    check_hello,
    encode_frame,
    hello,
    is_loopback,
    parse_address,
    recv_frame,
)
from kflume.comm.wire import MAX_HEADER, WireError


def _serve(sock: socket.socket, token: str, fields: dict) -> dict:
    """A server's side of one handshake, as kflume/comm/ucx_accept.py drives it: the
    hello read without blocking, checked, answered."""
    sock.setblocking(False)
    reader, deadline = FrameReader(), time.monotonic() + 5
    while (got := reader.feed(sock)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    try:
        check_hello(got, token)
        if not isinstance(got.get("addr"), bytes):
            raise Refused("unsupported handshake")
    except Refused as e:
        sock.sendall(encode_frame({"ok": False, "err": str(e)}))
        raise
    sock.sendall(encode_frame({"ok": True, **fields}))
    return got


def _pair(server_token: str, client_token: str, client_fields: dict):
    a, b = socket.socketpair()
    got: dict = {}

    def serve():
        try:
            got["hello"] = _serve(b, server_token, {"chan": 7, "addr": b"srv"})
        except Exception as e:  # noqa: BLE001 - checked by the test
            got["error"] = e

    t = threading.Thread(target=serve)
    t.start()
    try:
        return hello(a, client_token, client_fields, time.monotonic() + 5, "peer"), got
    finally:
        t.join(5)
        a.close()
        b.close()


def test_matching_tokens_swap_fields():
    reply, got = _pair("tok", "tok", {"chan": 3, "addr": b"cli"})
    assert reply["chan"] == 7 and reply["addr"] == b"srv"
    assert got["hello"]["chan"] == 3 and got["hello"]["addr"] == b"cli"


@pytest.mark.parametrize(("token", "fields", "reason"), [
    ("wrong", {"addr": b"cli"}, "wrong cluster token"),
    ("tok", {"addr": "not bytes"}, "unsupported handshake"),
])
def test_refusals_name_the_reason(token, fields, reason):
    with pytest.raises(TransportError, match=f"peer refused the connection: {reason}"):
        _pair("tok", token, fields)


def test_frames_have_limits_and_deadlines():
    a, b = socket.socketpair()
    a.sendall(struct.pack("<I", MAX_HEADER + 1))
    with pytest.raises(WireError, match="too large"):
        recv_frame(b, time.monotonic() + 1)
    a.sendall(struct.pack("<I", 3) + b"\x92\x01\x02")  # a msgpack list, not a map
    with pytest.raises(WireError, match="must be a map"):
        recv_frame(b, time.monotonic() + 1)
    with pytest.raises(DeadlineExceeded, match="node-x: the handshake timed out"):
        recv_frame(b, time.monotonic() + 0.05, "node-x")
    a.close()
    with pytest.raises(TransportError, match="closed the connection"):
        recv_frame(b, time.monotonic() + 1)
    b.close()


def test_a_hello_is_read_as_it_comes_without_blocking():
    a, b = socket.socketpair()
    b.setblocking(False)
    frame = encode_frame({"v": 1, "token": "t", "addr": b"x"})
    r = FrameReader()
    for i in range(len(frame) - 1):  # a byte at a time: never whole, never waiting
        a.sendall(frame[i : i + 1])
        time.sleep(0.001)
        assert r.feed(b) is None
    a.sendall(frame[-1:])
    time.sleep(0.01)
    assert r.feed(b)["token"] == "t"
    a.sendall(b"more")  # past the frame
    time.sleep(0.01)
    with pytest.raises(WireError, match="more than its handshake"):
        r.feed(b)
    r = FrameReader()
    a.sendall(struct.pack("<I", MAX_HEADER + 1))
    time.sleep(0.01)
    with pytest.raises(WireError, match="too large"):
        r.feed(b)
    r = FrameReader()
    a.close()
    with pytest.raises(TransportError, match="closed the connection"):
        r.feed(b)
    b.close()
    with pytest.raises(Refused, match="unsupported handshake version 9"):
        check_hello({"v": 9, "token": "t"}, "t")


def test_loopback_hosts():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("") and not is_loopback("::")


def test_parse_address():
    assert parse_address("10.0.0.1:7000") == ("10.0.0.1", 7000)
    assert parse_address(":7000") == ("127.0.0.1", 7000)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("nohost")
