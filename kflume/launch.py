"""Attention nodes as processes: starting them, never leaving one behind, and the
process itself.

`NodeProcess` runs `python -m kflume node` (a fresh interpreter: never a fork of a
process that may have initialised UCX or CUDA), reads the address it listens on from its
first line of output, and stops it on `stop()`, on exit of the `with` block, at
interpreter exit, and, on Linux, when the parent dies (PR_SET_PDEATHSIG). `main` is that
process: an AttentionNode behind a NodeServer on the UCX transport, until SIGTERM.
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

from .node import DTYPES as NODE_DTYPES
from .node import NodeConfig

__all__ = ["NodeProcess", "main"]

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

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
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
        if not config.graphs:
            cmd.append("--no-graphs")
        if not config.stream_graphs:
            cmd.append("--no-stream-graphs")
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
        """True once the node listens (reads its first line of output without blocking)."""
        while self.address is None:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"attention node exited with {self.proc.returncode} before "
                                   "listening; see its log above")
            if time.monotonic() - self.started > self.timeout:
                self.stop()
                raise RuntimeError(f"attention node did not listen within {self.timeout} s")
            r, _, _ = select.select([self.proc.stdout], [], [], 0)
            if not r:
                return False
            ch = os.read(self.proc.stdout.fileno(), 1)
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
        """SIGTERM (a clean shutdown), then SIGKILL after `timeout`. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        _LIVE.discard(self)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    for p in list(_LIVE):
        p.stop(timeout=5.0)


# ---- the node process itself: `kflume node` -----------------------------------------------
def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="kflume node",
        description="Start a weightless attention node: it holds token ranges of KV and "
        "attends over them for a weight node.")
    p.add_argument("--listen", default="127.0.0.1:0",
                   help="HOST:PORT to listen on (default 127.0.0.1:0, a free port)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--capacity-tokens", type=int, required=True,
                   help="tokens of KV (in every layer) this node holds at most")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--kv-heads", type=int, required=True)
    p.add_argument("--head-dim", type=int, required=True)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(NODE_DTYPES))
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--token", default=None,
                   help="cluster token peers must present (default: $KFLUME_TOKEN)")
    p.add_argument("--progress", default=None, choices=["hybrid", "poll", "blocking"],
                   help="how the UCX worker is progressed (default: poll on a GPU, blocking "
                   "on CPU)")
    p.add_argument("--q-heads", type=int, default=None,
                   help="query heads of the model, to compile its kernels before listening")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, replay the attention as captured graphs (default); "
                        "--no-graphs launches the kernels per message")
    p.add_argument("--stream-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="with graphs, capture each attend stream's layers on its buffers "
                        "(default); --no-stream-graphs keeps one graph per batch shape "
                        "(NodeConfig.stream_graphs)")
    p.add_argument("--stream-deadline", type=float, default=60.0,
                   help="seconds an attend stream may wait for its queries before the node "
                        "gives it up (and reports it to the peer)")
    p.add_argument("--port-file", default=None,
                   help="write the address actually listened on to this file")
    p.add_argument("--log-level", default="info")
    return p


def main(argv=None) -> int:
    import gc
    import signal

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s kflume-node %(levelname)s %(message)s")
    if args.stream_deadline <= 0:
        raise SystemExit("--stream-deadline must be positive")
    config = NodeConfig(layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim,
                        capacity_tokens=args.capacity_tokens, dtype=args.dtype,
                        device=args.device, page_size=args.page_size, q_heads=args.q_heads,
                        graphs=args.graphs, stream_graphs=args.stream_graphs)
    import torch

    from .comm.mailbox import host_id
    from .comm.ucx import SERVER_INLINE_BYTES, UcxTransport
    from .node import AttentionNode
    from .server import NodeServer

    if torch.device(config.device).index is not None:  # cuda:N: streams and events default
        torch.cuda.set_device(torch.device(config.device))  # to that GPU
    node = AttentionNode(config)
    node.warmup()
    # What exists now (torch, the pools, compiled kernels) lives as long as the process:
    # out of the collector's way, so a full collection cannot stall a step.
    gc.collect()
    gc.freeze()
    # the host lets a weight node of this host hand it mailboxes (kflume/comm/mailbox.py)
    transport = UcxTransport(token=args.token, info={**node.stats(), "host": host_id()},
                             progress=args.progress or default_progress(args.device),
                             inline_bytes=SERVER_INLINE_BYTES)
    server = NodeServer(node, transport, transport.listen(args.listen),
                        stream_deadline=args.stream_deadline)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    log.info("listening on %s: %d layers x %d KV heads x %d, %s on %s, %d tokens in %d pages",
             server.address, config.layers, config.kv_heads, config.head_dim, config.dtype,
             node.device, config.num_pages * config.page_size, config.num_pages)
    print(f"kflume node listening on {server.address}", flush=True)
    if args.port_file:
        with open(args.port_file, "w") as f:
            f.write(server.address)
    try:
        server.serve(should_stop=lambda: bool(stop))
    except BaseException:
        log.exception("node at %s failed after %d messages", server.address, server.handled)
        raise
    finally:
        server.close()
        transport.close()
        log.info("stopped")
    return 0
