"""`kflume node`: an attention node process, an AttentionNode behind a NodeServer on UCX.

It warms its kernels up, listens, prints `kflume node listening on HOST:PORT` as its
first line of output (what `NodeProcess` waits for), and serves until SIGINT. SIGTERM
drains it: its replies tell its clusters it is leaving, they move its ranges off at
their next boundaries, and it exits once it holds nothing and no peer has sent it
anything for 2 s (tokens placed on it before its clusters learned it leaves are on their
way), or after `--drain-deadline` (a second SIGTERM: at once).
Its handshake tells peers when each stage of its start ended (`info["startup"]`: wall
clock seconds of `main` entered, `pools` allocated, `warmup` done, `listen`), so that a
weight node can see where a start's time went (benchmarks/node_start.py).
"""

from __future__ import annotations

import argparse
import logging
import os

from ..config import DTYPES, NodeConfig

__all__ = ["build_parser", "main"]

log = logging.getLogger("kflume.node")


def build_parser() -> argparse.ArgumentParser:
    from ..cli import parser

    p = parser("kflume node", "Start a weightless attention node: it holds token ranges of "
               "KV and attends over them for weight nodes that present the cluster token.")
    p.add_argument("--listen", default="127.0.0.1:0",
                   help="HOST:PORT to listen on; port 0 takes a free port")
    p.add_argument("--device", default="cpu", help="where the KV pools live: cpu, cuda or cuda:N")
    p.add_argument("--capacity-tokens", type=int, required=True,
                   help="tokens of KV (in every layer) this node holds at most")
    p.add_argument("--layers", type=int, required=True, help="the model's decoder layers")
    p.add_argument("--kv-heads", type=int, required=True, help="the model's KV heads")
    p.add_argument("--head-dim", type=int, required=True, help="the model's head size")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="KV dtype")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--q-heads", type=int, default=None,
                   help="the model's query heads, to compile its kernels before listening "
                        "(default: the KV heads)")
    p.add_argument("--token", default=None,
                   help="cluster token peers must present (default: $KFLUME_TOKEN)")
    p.add_argument("--insecure-no-token", action="store_true",
                   help="listen on an address other hosts reach without a token: any peer "
                        "that reaches the port may use the node (refused otherwise)")
    p.add_argument("--handshake-timeout", type=float, default=5.0,
                   help="seconds a connecting peer has to complete its handshake")
    p.add_argument("--progress", default=None, choices=["poll", "blocking"],
                   help="how the UCX worker is driven: poll spins (lowest latency), blocking "
                        "sleeps on its event fd (leaves the cores to the computation); "
                        "default: poll on a GPU, blocking on CPU")
    p.add_argument("--stream-deadline", type=float, default=60.0,
                   help="seconds an attend stream may wait for its queries before the node "
                        "gives it up (and reports it to the peer)")
    p.add_argument("--drain-deadline", type=float,
                   default=float(os.environ.get("KFLUME_DRAIN_DEADLINE", 30.0)),
                   help="seconds a node told to leave (SIGTERM) waits for its clusters to "
                        "move its ranges off before it exits anyway (default: "
                        "$KFLUME_DRAIN_DEADLINE, else 30)")
    p.add_argument("--port-file", default=None,
                   help="also write the address listened on to this file")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="log verbosity")
    return p


def main(argv=None) -> int:
    import gc
    import signal
    import threading
    import time

    startup = {"main": time.time()}
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s kflume-node %(levelname)s %(message)s")
    if min(args.stream_deadline, args.handshake_timeout, args.drain_deadline) <= 0:
        raise SystemExit("kflume node: --stream-deadline, --handshake-timeout and "
                         "--drain-deadline must be positive")
    from ..comm.handshake import is_loopback, parse_address

    token = args.token if args.token is not None else os.environ.get("KFLUME_TOKEN", "")
    try:
        host, _ = parse_address(args.listen)
    except ValueError as e:
        raise SystemExit(f"kflume node: --listen: {e}") from None
    if not token and not is_loopback(host):
        if not args.insecure_no_token:
            raise SystemExit(f"kflume node: refusing to listen on {args.listen} without a "
                             "token: other hosts could use this node. Set KFLUME_TOKEN (or "
                             "--token), listen on 127.0.0.1, or pass --insecure-no-token")
        log.warning("listening on %s without a token (--insecure-no-token): any peer that "
                    "reaches this port may use the node", args.listen)
    try:
        config = NodeConfig(layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim,
                            capacity_tokens=args.capacity_tokens, dtype=args.dtype,
                            device=args.device, page_size=args.page_size, q_heads=args.q_heads)
    except ValueError as e:
        raise SystemExit(f"kflume node: {e}") from None
    # Importing ucxx takes about half a second: it runs while the pools are allocated and
    # the kernels warm up (torch leaves the GIL there); a failure shows at UcxTransport.
    ucx = threading.Thread(target=_import_ucx, name="import-ucxx", daemon=True)
    ucx.start()
    import torch

    from ..comm.mailbox import host_id
    from ..comm.ucx import SERVER_INLINE_BYTES, UcxTransport
    from .node import AttentionNode
    from .process import default_progress
    from .server import NodeServer

    if torch.device(config.device).index is not None:  # cuda:N: streams and events default
        torch.cuda.set_device(torch.device(config.device))  # to that GPU
    node = AttentionNode(config)
    startup["pools"] = time.time()
    node.warmup()
    startup["warmup"] = time.time()
    # What exists now (torch, the pools, compiled kernels) lives as long as the process:
    # out of the collector's way, so that a full collection cannot stall a step.
    gc.collect()
    gc.freeze()
    ucx.join()
    # the host lets a weight node of this host hand it mailboxes (kflume/comm/mailbox.py)
    info = {**node.stats(), "host": host_id(), "startup": startup}
    transport = UcxTransport(token=token, info=info,
                             progress=args.progress or default_progress(args.device),
                             inline_bytes=SERVER_INLINE_BYTES,
                             handshake_timeout=args.handshake_timeout)
    server = NodeServer(node, transport, transport.listen(args.listen),
                        stream_deadline=args.stream_deadline)
    startup["listen"] = time.time()  # (in the handshake's info: the same dict)
    stop: list[bool] = []

    def on_term(*_) -> None:  # drain; a second SIGTERM stops at once
        if server.leaving is not None:
            stop.append(True)
        server.leave(args.drain_deadline)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
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


def _import_ucx() -> None:
    try:
        from ..comm.ucx import _ucxx

        _ucxx()
    except ImportError:  # raised again, with its hint, where the transport is made
        pass
