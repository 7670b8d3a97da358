"""NodeProcess: an attention node in a process of its own, never left behind.

`NodeProcess` runs `python -m kflume node` (kflume/node/main.py; a fresh interpreter,
never a fork of a process that may have initialised UCX or CUDA), reads the address it
listens on from its first line of output, and stops it on `stop()`, on exit of the
`with` block, at interpreter exit, and, on Linux, when the parent dies
(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import signal
import subprocess
import sys
import time
import weakref

from ..config import NodeConfig

__all__ = ["NodeProcess", "default_progress"]

log = logging.getLogger("kflume.node")

_LIVE: weakref.WeakSet = weakref.WeakSet()


def default_progress(device: str) -> str:
    """GPU nodes poll (a dedicated server; cuda_ipc copies complete without waking an fd);
    CPU nodes sleep on the worker's event fd (their cores compute: on a 2-core machine
    spinning after each message made the end-to-end CPU run slower)."""
    return "poll" if str(device).startswith("cuda") else "blocking"


def _die_with_parent() -> None:  # runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort off Linux
        pass


class NodeProcess:
    """One attention node in its own process.

    Args:
        config: the node's geometry, capacity, dtype and device.
        listen: HOST:PORT (port 0: any free port).
        token: cluster token, passed through the environment (default $KFLUME_TOKEN).
        env: extra environment variables (e.g. CUDA_VISIBLE_DEVICES, UCX_TLS).
        timeout: seconds to wait for the node to listen.
    """

    def __init__(self, config: NodeConfig, *, listen: str = "127.0.0.1:0",
                 token: str | None = None, env: dict | None = None, timeout: float = 60.0,
                 log_level: str = "warning", progress: str | None = None,
                 wait: bool = True) -> None:
        self.config = config
        cmd = [sys.executable, "-m", "kflume", "node", "--listen", listen,
               "--device", config.device, "--capacity-tokens", str(config.capacity_tokens),
               "--layers", str(config.layers), "--kv-heads", str(config.kv_heads),
               "--head-dim", str(config.head_dim), "--dtype", config.dtype,
               "--page-size", str(config.page_size), "--log-level", log_level,
               "--progress", progress or default_progress(config.device)]
        if config.q_heads:
            cmd += ["--q-heads", str(config.q_heads)]
        full_env = dict(os.environ)
        full_env.update(env or {})
        if token is not None:
            full_env["KFLUME_TOKEN"] = token
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=full_env,
                                     preexec_fn=_die_with_parent if os.name == "posix" else None)
        _LIVE.add(self)
        self.timeout = timeout
        self.started = time.monotonic()
        self.address: str | None = None
        self._line = b""
        if wait:
            self.wait_ready()

    def ready(self) -> bool:
        """True once the node listens (reads its first line of output without blocking).
        Output already written counts however late it is read (a node kept started in a
        `WarmPool` may be asked long after it listened)."""
        while self.address is None:
            r, _, _ = select.select([self.proc.stdout], [], [], 0)
            ch = os.read(self.proc.stdout.fileno(), 1) if r else None
            if not ch:  # nothing to read yet (None), or end of output (b"")
                if ch == b"" or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"attention node exited with {self.proc.returncode} "
                                       "before listening; see its log above")
                if time.monotonic() - self.started > self.timeout:
                    self.stop()
                    raise RuntimeError(f"attention node did not listen within {self.timeout} s")
                return False
            if ch == b"\n":
                text = self._line.decode().strip()
                prefix = "kflume node listening on "
                if not text.startswith(prefix):
                    self.stop()
                    raise RuntimeError(f"unexpected first line from the node: {text!r}")
                self.address = text[len(prefix):]
            else:
                self._line += ch
        return True

    def wait_ready(self) -> str:
        """Block until the node listens (at most `timeout` from its start); its address."""
        while not self.ready():
            select.select([self.proc.stdout], [], [], 0.2)
        return self.address

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGINT (a clean shutdown, now), then SIGKILL after `timeout`. Returns the exit
        code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        _LIVE.discard(self)
        return self.proc.returncode

    def leave(self) -> None:
        """SIGTERM: the node drains (its clusters move its ranges off) and exits once
        empty and quiet for 2 s (kflume/node/server.py) or after its drain deadline."""
        self.proc.terminate()

    def kill(self) -> None:
        """SIGKILL, as a crash would (or to end a node that hangs)."""
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        _LIVE.discard(self)

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    for p in list(_LIVE):
        p.stop(timeout=5.0)
