"""The messages a node serves, one handler each (kflume/node/server.py dispatches).

A handler gets the server, the peer, the checked header and the message's tensors (on
the node's device), and returns the `Reply` to send, or None for a stream (answered
once its layers are). It raises to refuse: the server answers with an error naming the
problem and the node is unchanged. Request ids are the peer's own (`Peer.scope`): a
handler only ever names the requests of the peer that sent the message.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..comm.wire import Header, WireError
from .peer import Peer

__all__ = ["OPS", "Reply"]

log = logging.getLogger("kflume.node")


@dataclass(slots=True)
class Reply:
    header: Header
    tensors: list[torch.Tensor] = field(default_factory=list)


def _tensors(h: Header, tensors, n: int) -> list[torch.Tensor]:
    if len(tensors) != n:
        raise ValueError(f"{h.op} carries {len(tensors)} tensors; it needs {n}")
    return tensors


def _joined(server, peer: Peer, new: list) -> None:
    if not new:
        return
    peer.requests.update(new)
    s = server.node.stats()
    log.info("%s: requests joined: %s; %d requests, %d of %d pages free", peer.conn.peer,
             new, s["requests"], s["pages_free"], s["pages_total"])


def _new(server, keys: list) -> list:
    """The keys the node does not hold yet."""
    held = server.node.requests
    return [k for k in keys if k not in held]


def attend(server, peer: Peer, h: Header, tensors) -> Reply:
    (q,) = _tensors(h, tensors, 1)
    scale, softcap = h.info.get("scale"), h.info.get("softcap")
    for name, x in (("scale", scale), ("softcap", softcap)):
        if x is not None and not (isinstance(x, float) and math.isfinite(x) and 0 < x < 1e6):
            raise ValueError(f"attend: {name} must be a positive float; got {x!r}")
    keys = peer.scope(h.requests)
    n = len(keys)
    start = server.ints(h, "kv_start", n) if "kv_start" in h.ints else None
    states = server.node.attend(h.layer, keys, server.ints(h, "kv_len", n), q, scale=scale,
                                packed=True, kv_start=start, softcap=softcap)
    return Reply(Header("result", layer=h.layer, epoch=h.epoch), [states])


def append(server, peer: Peer, h: Header, tensors) -> Reply:
    k, v = _tensors(h, tensors, 2)
    keys, layers = peer.scope(h.requests), h.info.get("layers")
    new = _new(server, keys)
    args = (keys, server.ints(h, "offsets", len(keys)), server.ints(h, "positions", len(keys)),
            k, v)
    if layers is None:
        server.node.append(h.layer, *args)
    elif type(layers) is int:
        server.node.append_layers(range(h.layer, h.layer + layers), *args)
    else:
        raise ValueError(f"append: info['layers'] must be an int; got {layers!r}")
    _joined(server, peer, new)
    return Reply(Header("ok"))


def open_(server, peer: Peer, h: Header, tensors) -> Reply:
    keys = peer.scope(h.requests)
    tokens = server.ints(h, "tokens", len(keys))
    if any(n < 0 for n in tokens):
        raise ValueError(f"open: tokens must be >= 0; got {min(tokens)}")
    new = _new(server, keys)
    server.node.open(keys, tokens)
    _joined(server, peer, new)
    return Reply(Header("ok"))


def free(server, peer: Peer, h: Header, tensors) -> Reply:
    keys = peer.scope(h.requests)
    freed = server.node.free(keys)
    peer.requests.difference_update(keys)
    if keys:
        s = server.node.stats()
        log.info("%s: freed %d requests (%d tokens); %d of %d pages free", peer.conn.peer,
                 len(keys), freed, s["pages_free"], s["pages_total"])
    return Reply(Header("ok", info={"freed_tokens": freed}))


def truncate(server, peer: Peer, h: Header, tensors) -> Reply:
    keys = peer.scope(h.requests)
    dropped = server.node.truncate(keys, server.ints(h, "tokens", len(keys)))
    return Reply(Header("ok", info={"dropped_tokens": dropped}))


def export(server, peer: Peer, h: Header, tensors) -> Reply:
    if len(h.requests) != 1:
        raise ValueError("export takes one request")
    start, end = server.ints(h, "start", 1)[0], server.ints(h, "end", 1)[0]
    if not 0 <= start <= end:
        raise ValueError(f"export: start {start} and end {end} must have 0 <= start <= end")
    k, v = server.node.export_range(peer.scope(h.requests)[0], start, end)
    return Reply(Header("result"), [k, v])


def import_(server, peer: Peer, h: Header, tensors) -> Reply:
    if len(h.requests) != 1:
        raise ValueError("import takes one request")
    k, v = _tensors(h, tensors, 2)
    keys = peer.scope(h.requests)
    start = server.ints(h, "start", 1)[0]
    if not 0 <= start < 2**40:
        raise ValueError(f"import: start {start} out of range")
    new = _new(server, keys)
    server.node.import_range(keys[0], start, k, v)
    _joined(server, peer, new)
    return Reply(Header("ok"))


def stream(server, peer: Peer, h: Header, tensors) -> None:
    _tensors(h, tensors, 0)
    server.streams.open(peer, h)
    return None


def capture(server, peer: Peer, h: Header, tensors) -> Reply:
    _tensors(h, tensors, 0)
    return Reply(server.streams.capture(peer, h))


def cancel(server, peer: Peer, h: Header, tensors) -> Reply:
    server.streams.cancel(peer, h)
    return Reply(Header("ok"))


def mailbox(server, peer: Peer, h: Header, tensors) -> Reply:
    server.streams.register_mailboxes(peer, h)
    return Reply(Header("ok"))


def stats(server, peer: Peer, h: Header, tensors) -> Reply:
    """The node's state and serving times; `requests` and `tokens_held` count the
    asking peer's requests (`node_requests`, `node_tokens_held`: everyone's)."""
    n = h.info.get("trace", 0)
    if type(n) is not int or not 0 <= n <= 512:
        raise ValueError("stats: trace must be an int in [0, 512]")
    info = server.stats(trace=n, reset=bool(h.info.get("reset_timings")))
    held = server.node.requests
    info["node_requests"], info["node_tokens_held"] = info["requests"], info["tokens_held"]
    info["requests"] = len(peer.requests)
    info["tokens_held"] = sum(max(held[k].lengths) for k in peer.requests if k in held)
    return Reply(Header("ok", info=info))


def shutdown(server, peer: Peer, h: Header, tensors) -> Reply:
    log.info("shutdown asked by %s", peer.conn.peer)
    server.stopped = True
    return Reply(Header("ok"))


OPS: dict[str, Callable] = {
    "attend": attend, "append": append, "open": open_, "free": free, "truncate": truncate,
    "export": export,
    "import": import_, "stream": stream, "capture": capture, "cancel": cancel,
    "mailbox": mailbox, "stats": stats, "shutdown": shutdown,
}


def handler(op: str) -> Callable:
    try:
        return OPS[op]
    except KeyError:
        raise WireError(f"op {op!r} is not a request a node serves") from None
