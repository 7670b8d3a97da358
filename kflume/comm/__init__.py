"""Transports: how tensors move between the weight node and attention nodes.

`InProcTransport` keeps everything in one process (tests, one-process runs);
`UcxTransport` (kflume.comm.ucx, needs the `ucx` extra) moves host and CUDA tensors over
UCX. Both implement `kflume.comm.base.Transport`; the wire format is kflume.comm.wire.
`Mailbox` / `MailboxView` (kflume.comm.mailbox): on one host, a node's GPU puts stream
replies straight into the weight node's memory and raises a doorbell word.
"""

from .base import (
    Connection,
    DeadlineExceeded,
    Listener,
    Message,
    Recv,
    RemoteError,
    Transport,
    TransportError,
)
from .inproc import InProcHub, InProcTransport
from .mailbox import Mailbox, MailboxView
from .wire import Header, WireError


def UcxTransport(*args, **kwargs):  # noqa: N802 - a lazy constructor keeps ucxx optional
    """`kflume.comm.ucx.UcxTransport`, imported on first use (needs ucxx)."""
    from .ucx import UcxTransport as _Ucx

    return _Ucx(*args, **kwargs)


__all__ = [
    "Connection",
    "DeadlineExceeded",
    "Header",
    "InProcHub",
    "InProcTransport",
    "Listener",
    "Mailbox",
    "MailboxView",
    "Message",
    "Recv",
    "RemoteError",
    "Transport",
    "TransportError",
    "UcxTransport",
    "WireError",
]
