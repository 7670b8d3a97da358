"""The UCX transport's listener: handshakes that never block serving.

A node's serving loop calls `accept()` every millisecond; it must never wait on a
peer. So every handshake is a small state machine driven from there: new sockets are
accepted without blocking, each one's hello is read as its bytes arrive
(`FrameReader`), checked (token, version, fields, the UCX worker address:
kflume/comm/ucx_address.py) and answered, and only then does a UCX endpoint exist,
made on the serving thread (the worker is single-threaded). A handshake that does not
finish within `timeout` seconds is dropped, and at most `max_pending` wait at once
(past that, the oldest is dropped: a peer that means to connect finishes in
milliseconds). What is refused, and why, is kept in `refused` for the server's log.
"""

from __future__ import annotations

import select
import socket
import time
from collections import deque
from dataclasses import dataclass, field

from . import handshake
from .base import Connection, Listener
from .handshake import FrameReader, Refused, parse_address

__all__ = ["HANDSHAKE_TIMEOUT", "MAX_PENDING", "UcxListener"]

HANDSHAKE_TIMEOUT = 5.0  # seconds a peer has to complete its handshake
MAX_PENDING = 64  # handshakes waiting at once


@dataclass(slots=True)
class _Pending:
    """A handshake under way: its socket, whom, until when, its hello so far, and the
    answer still to write (with the connection it makes, once written)."""

    sock: socket.socket
    peer: str
    deadline: float
    reader: FrameReader = field(default_factory=FrameReader)
    out: bytes = b""
    conn: Connection | None = None


class UcxListener(Listener):
    def __init__(self, transport, address: str, timeout: float = HANDSHAKE_TIMEOUT,
                 max_pending: int = MAX_PENDING) -> None:
        self.transport, self.timeout, self.max_pending = transport, timeout, max_pending
        host, port = parse_address(address)
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.sock.setblocking(False)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        transport._poller.register(self.sock.fileno(), select.POLLIN)
        self.pending: deque[_Pending] = deque()
        self.ready: deque[Connection] = deque()
        self.refused: deque[str] = deque(maxlen=256)  # handshakes refused, for logs

    def accept(self) -> Connection | None:
        """A newly connected peer, or None; never blocks."""
        if not self.ready:
            self._take_new()
            self._advance()
        return self.ready.popleft() if self.ready else None

    def _take_new(self) -> None:
        for _ in range(self.max_pending):  # (a flood of connections: a bounded look each time)
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. out of file descriptors: try again later
                self.refused.append(f"accept failed: {e}")
                return
            sock.setblocking(False)
            if len(self.pending) >= self.max_pending:
                self._drop(self.pending.popleft(), f"more than {self.max_pending} handshakes "
                                                   "pending; the oldest dropped")
            self.pending.append(_Pending(sock, f"{addr[0]}:{addr[1]}",
                                         time.monotonic() + self.timeout))
            self.transport._poller.register(sock.fileno(), select.POLLIN)

    def _advance(self) -> None:
        now = time.monotonic()
        for p in list(self.pending):
            if now > p.deadline:
                self._drop(p, f"no handshake within {self.timeout:.3g} s")
                continue
            try:
                if p.conn is None and not p.out:
                    got = p.reader.feed(p.sock)
                    if got is not None:
                        p.conn, answer = self._answer(p, got)
                        p.out = handshake.encode_frame(answer)
                if p.out:
                    p.out = p.out[p.sock.send(p.out):]
                    if not p.out:
                        self._done(p)
            except Refused as e:
                self._refuse(p, str(e))
            except (BlockingIOError, InterruptedError):
                pass
            except Exception as e:  # noqa: BLE001 - a bad peer must not stop the server
                self._drop(p, f"{type(e).__name__}: {e}")

    def _answer(self, p: _Pending, got: dict):
        """Check the hello; make the connection (the endpoint) and its answer."""
        handshake.check_hello(got, self.transport.token)
        try:
            return self.transport._accept_hello(p.sock, p.peer, got)
        except Refused:
            raise
        except Exception as e:  # noqa: BLE001 - UCX could not reach the peer's worker
            raise Refused(f"no UCX endpoint to its worker: {e}") from None

    def _done(self, p: _Pending) -> None:
        self._forget(p)
        self.transport._adopt(p.conn)
        self.ready.append(p.conn)

    def _refuse(self, p: _Pending, why: str) -> None:
        try:  # one try: a peer that does not read its refusal is not waited for
            p.sock.send(handshake.encode_frame({"ok": False, "err": why}))
        except OSError:
            pass
        self._drop(p, why)

    def _drop(self, p: _Pending, why: str) -> None:
        self._forget(p)
        self.refused.append(f"{p.peer}: {why}")
        if p.conn is not None:
            p.conn.close()
        try:
            p.sock.close()
        except OSError:
            pass

    def _forget(self, p: _Pending) -> None:
        if p in self.pending:
            self.pending.remove(p)
        try:
            self.transport._poller.unregister(p.sock.fileno())
        except (KeyError, ValueError):
            pass

    def close(self) -> None:
        for p in list(self.pending):
            self._drop(p, "the listener closed")
        for conn in self.ready:
            conn.close()
        self.ready.clear()
        try:
            self.transport._poller.unregister(self.sock.fileno())
        except (KeyError, ValueError):
            pass
        self.sock.close()
