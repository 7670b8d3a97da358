"""UCX transport on ucxx's blocking API: shared memory or cuda_ipc on one host, TCP across.

Connecting: a plain TCP socket, bound where the node was told to listen (127.0.0.1 by
default), carries the handshake (kflume/comm/handshake.py; on the listening side driven
without blocking from the serving loop, kflume/comm/ucx_accept.py): the cluster token is
checked before any UCX endpoint exists, and the two sides swap UCX worker addresses,
each checked before UCX sees it (kflume/comm/ucx_address.py). Both then create one UCX
endpoint from the other's worker address, once, and reuse it. The socket stays open: it
is how a dead peer is noticed at once (UCX endpoints made from worker addresses are not
told). Messages and parts: kflume/comm/ucx_conn.py.

Progress: `"poll"` spins on `worker.progress()` (a weight node waiting for replies, a
GPU node); `"blocking"` arms the worker and sleeps in `poll(2)` on its event fd and the
sockets (a CPU node, whose cores the computation needs). benchmarks/transport.py
measures them.
"""

from __future__ import annotations

import os
import secrets
import select
import socket
import time
from collections import deque

import numpy as np
import torch

from . import handshake, ucx_address
from .base import DeadlineExceeded, Listener, Transport, TransportError
from .handshake import Refused, parse_address
from .ucx_accept import HANDSHAKE_TIMEOUT, UcxListener
from .ucx_conn import INLINE_BYTES, UcxConnection, as_array
from .wire import WireError

__all__ = ["SERVER_INLINE_BYTES", "UcxTransport", "parse_address"]

SERVER_INLINE_BYTES = 16 << 10  # what a node inlines: its peers pre-post the rest


def _ucxx():
    """Import ucxx's blocking API lazily, with the UCX settings kflume relies on."""
    # Error handling on endpoints would otherwise move same-host traffic from shared
    # memory to TCP (shared/notes/ucx.md); the unused-variable warning is noise.
    os.environ.setdefault("UCX_MM_ERROR_HANDLING", "y")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        from ucxx._lib import libucxx
        from ucxx._lib.arr import Array
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "the UCX transport needs ucxx: pip install 'kflume[ucx]' (ucxx-cu13 or ucxx-cu12, "
            "matching your CUDA major version)"
        ) from e
    return libucxx, Array


class UcxTransport(Transport):
    """UCX over ucxx. One worker per transport; use it from one thread only.

    token: the cluster token both sides must present (default `$KFLUME_TOKEN`, else
    none). progress: "poll" (default) or "blocking" (module docstring). info: what this
    side tells its peers in the handshake. inline_bytes: how many bytes of host tensors
    may ride in a message's header part (nodes use SERVER_INLINE_BYTES: their replies'
    large tensors land directly in the buffers the weight node posted).
    handshake_timeout: seconds a peer has to complete its handshake with a listener.
    """

    def __init__(self, *, token: str | None = None, progress: str = "poll",
                 info: dict | None = None, inline_bytes: int = INLINE_BYTES,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        if progress not in ("poll", "blocking"):
            raise ValueError(f"progress must be poll or blocking; got {progress!r}")
        self.L, self.Array = _ucxx()
        L = self.L
        self.token = token if token is not None else os.environ.get("KFLUME_TOKEN", "")
        self.mode = progress
        self.info = info or {}
        if not 0 <= inline_bytes <= INLINE_BYTES:
            raise ValueError(f"inline_bytes must be in [0, {INLINE_BYTES}]")
        self.inline_bytes = inline_bytes
        self.handshake_timeout = handshake_timeout
        self.ctx = L.UCXContext({}, (L.Feature.TAG, L.Feature.WAKEUP))
        self.worker = L.UCXWorker(self.ctx)
        self.own_address = ucx_address.check_own(self.worker.address.tobytes())
        self._poller = select.poll()
        if progress == "blocking":
            self.worker.init_blocking_progress_mode()
            self._poller.register(self.worker.epoll_file_descriptor, select.POLLIN)
        self._inflight: list = []
        self._arrays: dict[tuple, tuple] = {}  # Arrays of reused buffers (bounded)
        self._conns: dict[int, UcxConnection] = {}
        self._last_check = self._last_drain = 0.0
        self._drains: deque = deque(maxlen=4096)  # (tag, deadline): messages to discard
        self._scratch = self.Array(np.empty(16, dtype=np.uint8))

    def _array(self, t: torch.Tensor, cached: bool):
        """(Array, keep-alive) for a tensor. Buffers that callers reuse (`into`, static
        parts) keep their Array: making one costs as much as posting the receive."""
        if not cached:
            return as_array(t, self.Array)
        key = (t.data_ptr(), t.numel() * t.element_size(), t.device)
        hit = self._arrays.get(key)
        if hit is None:
            if len(self._arrays) >= 1024:  # (an attend stream keeps one per layer)
                self._arrays.pop(next(iter(self._arrays)))
            hit = self._arrays[key] = as_array(t, self.Array)
        return hit

    # ---- connections ----------------------------------------------------------
    def _new_channel(self) -> int:
        while True:
            c = secrets.randbits(31) | 1
            if c not in self._conns:
                return c

    def _fields(self, rx: int) -> dict:
        """What this side tells a peer in the handshake."""
        return {"chan": rx, "addr": self.worker.address.tobytes(), "info": self.info,
                "inline": self.inline_bytes}

    def connect(self, address: str, *, timeout: float = 30.0) -> UcxConnection:
        host, port = parse_address(address)
        deadline = time.monotonic() + timeout
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"{address}: no connection (connect) within {timeout:.3g} "
                                   "s") from None
        except OSError as e:
            raise TransportError(f"cannot connect to {address}: {e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rx = self._new_channel()
        try:
            reply = handshake.hello(sock, self.token, self._fields(rx), deadline, address)
            chan, addr, inline = self._check_fields(reply, address)
            conn = UcxConnection(self, sock, rx, chan, addr, address, reply, inline)
        except BaseException:
            sock.close()
            raise
        self._adopt(conn)
        return conn

    def _check_fields(self, got: dict, peer: str) -> tuple[int, bytes, int]:
        """A peer's handshake fields, checked: its channel, its worker address (before UCX
        sees it) and how many bytes of tensors it inlines. Raises Refused naming why."""
        chan, addr, inline, info = (got.get(k) for k in ("chan", "addr", "inline", "info"))
        if type(chan) is not int or not 0 < chan < 2**31:
            raise Refused(f"{peer}: bad channel {chan!r} in the handshake")
        if type(inline) is not int or not 0 <= inline <= INLINE_BYTES:
            raise Refused(f"{peer}: bad inline size {inline!r} in the handshake")
        if info is not None and not isinstance(info, dict):
            raise Refused(f"{peer}: the handshake's info must be a map")
        try:
            ucx_address.check(addr, self.own_address)
        except WireError as e:
            raise Refused(f"{peer}: {e}") from None
        return chan, bytes(addr), inline

    def _accept_hello(self, sock: socket.socket, peer: str, got: dict):
        """A checked hello (kflume/comm/ucx_accept.py): the connection, not yet adopted,
        and the answer."""
        chan, addr, inline = self._check_fields(got, peer)
        rx = self._new_channel()
        conn = UcxConnection(self, sock, rx, chan, addr, peer, got, inline)
        return conn, {"ok": True, **self._fields(rx)}

    def _adopt(self, conn: UcxConnection) -> None:
        self._conns[conn.rx_channel] = conn
        self._poller.register(conn.sock.fileno(), select.POLLIN)

    def _forget(self, conn: UcxConnection) -> None:
        self._conns.pop(conn.rx_channel, None)
        try:
            self._poller.unregister(conn.sock.fileno())
        except (KeyError, ValueError):
            pass

    def listen(self, address: str) -> Listener:
        return UcxListener(self, address, timeout=self.handshake_timeout)

    # ---- tagged messages: probed, then received --------------------------------------
    def probe(self, tag: int):
        """The message with `tag` if it has come (taken off UCX's queue: it must then be
        received, `recv_probed`), else None."""
        p = self.worker.tag_probe(self.L.UCXXTag(tag), remove=True)
        return p if p.matched else None

    def recv_probed(self, array, probe):
        return self.worker.tag_recv_with_handle(array, probe)

    def discard(self, tags, seconds: float = 30.0) -> None:
        """Messages that may still come for `tags` and nobody will read: received (into a
        scratch buffer, truncated) for `seconds` if they come, so that neither UCX nor
        the sender keeps them."""
        deadline = time.monotonic() + seconds
        self._drains.extend((t, deadline) for t in tags)

    def _drain(self, most: int = 32) -> None:
        """Look for `most` of the messages to discard (a few each progress: a peer that
        has many discarded cannot slow the loop down)."""
        now = time.monotonic()
        for _ in range(min(most, len(self._drains))):
            tag, deadline = self._drains.popleft()
            p = self.probe(tag)
            if p is not None:
                self._inflight.append((self.recv_probed(self._scratch, p), None, None, False))
            elif now < deadline:
                self._drains.append((tag, deadline))

    # ---- progress ---------------------------------------------------------------
    def _reap(self) -> None:
        if not self._inflight:
            return
        keep = []
        for entry in self._inflight:
            req, buf, conn, pooled = entry
            if not req.completed:
                keep.append(entry)
                continue
            try:
                req.check_error()
            except Exception as e:  # noqa: BLE001
                if conn is not None:  # (a discarded message: truncated, as meant)
                    conn.mark_dead(f"send failed: {e}")
            if pooled:
                conn._give_buffer(buf)  # a header buffer, free for the next message
        self._inflight = keep

    def _check_sockets(self, timeout_ms: int) -> None:
        """Wait on the sockets (and the worker's event fd); a readable peer socket is EOF."""
        for fd, _ in self._poller.poll(timeout_ms):
            for conn in list(self._conns.values()):
                if conn.sock.fileno() == fd:
                    try:
                        if conn.sock.recv(1, socket.MSG_PEEK) == b"":
                            conn.mark_dead("peer closed its connection (process gone?)")
                            self._forget(conn)
                    except BlockingIOError:
                        pass
                    except OSError as e:
                        conn.mark_dead(f"socket error: {e}")
                        self._forget(conn)

    def progress(self, timeout: float = 0.0) -> None:
        """Drive UCX; with "blocking" and nothing in flight (`timeout > 0`), sleep up to
        `timeout` seconds on the worker's event fd and the peers' sockets."""
        self.worker.progress()
        self._reap()
        now = time.monotonic()
        if self._drains and now - self._last_drain > 2e-3:  # (off the hot path)
            self._last_drain = now
            self._drain()
        if self.mode == "poll" or timeout <= 0:
            if now - self._last_check > 1e-3:  # liveness of peers, every millisecond
                self._last_check = now
                self._check_sockets(0)
            return
        if self.worker.arm():  # nothing pending: safe to sleep until an event
            self._check_sockets(max(1, int(timeout * 1000)))
        else:
            self._check_sockets(0)

    def close(self) -> None:
        for conn in list(self._conns.values()):
            conn.close()
