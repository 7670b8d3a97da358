"""Mailbox: replies written straight into the receiver's memory, on one host.

Between processes of one host, an attention node can put an attend stream's replies
where the weight node reads them, without a message: the weight node owns a `Mailbox`
(a reply buffer and a row of doorbell words), registers it with the node once
(`NodeClient.register_mailbox`), and from then on the node's GPU copies each layer's
reply into the buffer and raises the layer's doorbell word; the weight node's host sees
the word and releases its graph. That takes the node's completion polling, its send
and the reply's rendezvous off every layer's critical path (docs/benchmarks.md).

- The buffer is the weight node's memory: CUDA memory shared by CUDA IPC (the node maps
  it into its own GPU's address space: NVLink or PCIe peer writes), or on CPU a shared
  memory file.
- The doorbells are 64-bit words in a shared memory file, registered with CUDA on the
  node (mapped host memory its kernels can write). A layer's word is set to a value the
  weight node chose for that stream (`Mailbox.next_value`: never one used before, so a
  late delivery never reads as an answer) after the reply's bytes:
  each program of the delivering kernel stores its part and counts itself done with a
  system-scope release, and the last one raises the word with a system-scope release,
  so a host that sees the value sees the bytes.
- A node that cannot map the mailbox (another host, a GPU it cannot reach, different
  device types) refuses the registration, and the weight node keeps receiving that
  node's replies as messages.

`MailboxView` is the node's side: `deliver(src, offset, word, value)` enqueues the copy
and the doorbell on the current stream (one Triton kernel on CUDA; a copy and a store on
CPU). Linux only (shared memory under /dev/shm).
"""

from __future__ import annotations

import platform
import secrets
import sys

import numpy as np
import torch

from .shm import SharedWords, _Shared, host_id, supported

# (SharedWords, host_id and supported live in kflume/comm/shm.py)
__all__ = ["Mailbox", "MailboxView", "SharedWords", "host_id", "supported"]

_WORD = 8  # bytes of a doorbell word (int64)


def _share(t: torch.Tensor, shm: _Shared | None) -> dict:
    """How another process of this host maps `t` (a storage of its own on CUDA, or the
    shared memory file `shm` holding it)."""
    if t.is_cuda:
        storage = t.untyped_storage()
        if t.storage_offset() != 0 or storage.nbytes() != t.nbytes:
            raise RuntimeError("a shared mailbox buffer must be a storage of its own")
        (_, handle, size, offset, ref_handle, ref_offset, event_handle,
         event_sync) = storage._share_cuda_()
        return {"cuda": [handle, int(size), int(offset), ref_handle, int(ref_offset),
                         event_handle, bool(event_sync)],
                "uuid": str(torch.cuda.get_device_properties(t.device).uuid)}
    return {"shm": shm.name}


class Mailbox:
    """The weight node's side: a reply buffer `[rows, row_bytes]` (uint8) on `device`
    and `words` doorbell words, reachable by the processes of this host; optionally a
    query buffer `[rows, query_row_bytes]` the node reads queries from, and the post
    flags (`SharedWords`) that say when a query is there.

    `describe()` is what a node needs to map it (sent once, by `register_mailbox`);
    `ready(word, value)` tells whether the node has raised `word` to `value`; `clear`
    lowers words before they are reused (a stream opened on them); `next_value()` is
    the value for the next stream's doorbells, never one used before (a delivery that
    comes late, from a failed step or a node that left, never reads as an answer).
    """

    def __init__(self, rows: int, row_bytes: int, words: int,
                 device: str | torch.device = "cpu", query_row_bytes: int = 0,
                 flags: SharedWords | None = None) -> None:
        if rows < 1 or row_bytes < 1 or words < 1 or query_row_bytes < 0:
            raise ValueError("a mailbox needs rows, row_bytes and words >= 1")
        if not supported(device):
            raise ValueError(f"mailboxes in {device} memory need Linux, and for host memory "
                             f"an x86 host (its cores see each other's stores in order); this "
                             f"is {sys.platform} on {platform.machine()}")
        self.device = torch.device(device)
        self._value = secrets.randbits(40) << 16  # unlike any other mailbox's values
        self.rows, self.row_bytes, self.words = rows, row_bytes, words
        self.query_row_bytes, self.flags = query_row_bytes, flags
        self._bell = _Shared(words * _WORD)
        self.bells = self._bell.tensor.view(torch.int64)
        self.bells.zero_()
        self._bells_np = np.frombuffer(self._bell.map, dtype=np.int64, count=words)
        self._shm: list[_Shared | None] = []
        self.buffer = self._alloc(rows * row_bytes).view(rows, row_bytes)
        self.queries = (self._alloc(rows * query_row_bytes).view(rows, query_row_bytes)
                        if query_row_bytes else None)

    def _alloc(self, nbytes: int) -> torch.Tensor:
        if self.device.type == "cuda":
            from .wire import transfer_empty  # written outside stream order, like a receive

            self._shm.append(None)
            return transfer_empty((nbytes,), torch.uint8, self.device).zero_()
        shm = _Shared(nbytes)
        self._shm.append(shm)
        return shm.tensor

    def describe(self) -> dict:
        """Everything a node of this host needs to map the mailbox (msgpack-able)."""
        d = {"host": host_id(), "rows": self.rows, "row_bytes": self.row_bytes,
             "words": self.words, "bells": self._bell.name}
        d.update(_share(self.buffer, self._shm[0]))
        if self.queries is not None:
            d["queries"] = {"row_bytes": self.query_row_bytes,
                            **_share(self.queries, self._shm[1])}
        if self.flags is not None:
            d["flags"] = [self.flags.name, self.flags.count]
        return d

    def next_value(self) -> int:
        self._value += 1
        return self._value

    def ready(self, word: int, value: int) -> bool:
        return int(self._bells_np[word]) == value

    def clear(self, start: int, stop: int) -> None:
        self._bells_np[start:stop] = 0

    def close(self) -> None:
        self._bells_np = None
        self.bells = None
        self._bell.close()
        self.buffer = self.queries = None
        for shm in self._shm:
            if shm is not None:
                shm.close()
        self._shm = []


def _map(part: dict, nbytes: int, device: torch.device, what: str) -> tuple:
    """Map a buffer another process shared with `_share`: (tensor of `nbytes` uint8,
    its shared memory or None)."""
    if device.type == "cuda":
        if "cuda" not in part:
            raise ValueError(f"mailbox: a CUDA node maps CUDA memory; the {what} is in host "
                             "memory")
        handle, size, offset, ref_handle, ref_offset, event_handle, event_sync = part["cuda"]
        if size < nbytes:
            raise ValueError(f"mailbox: the shared CUDA {what} holds {size} bytes, {nbytes} "
                             "described")
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:  # mapped into this node's GPU (peer access enabled as it is used)
            storage = torch.UntypedStorage._new_shared_cuda(
                index, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync)
        except RuntimeError as e:
            raise ValueError(f"mailbox: cannot map the weight node's CUDA {what} (GPU "
                             f"{part.get('uuid')}) from this node's GPU: {e}") from None
        t = torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (nbytes,), (1,))
        return t, None
    if "shm" not in part:
        raise ValueError(f"mailbox: a CPU node maps host memory; the {what} is in CUDA memory")
    shm = _Shared(nbytes, str(part["shm"]))
    return shm.tensor, shm


class MailboxView:
    """A node's mapping of a weight node's `Mailbox` (from its `describe()`), on the
    node's `device`. Raises ValueError naming why it cannot be mapped."""

    def __init__(self, desc: dict, device: str | torch.device) -> None:
        self.device = torch.device(device)
        try:
            host, rows, row_bytes, words, bells = (desc[k] for k in (
                "host", "rows", "row_bytes", "words", "bells"))
        except (KeyError, TypeError):
            raise ValueError(f"mailbox: a description needs host, rows, row_bytes, words "
                             f"and bells; got {desc!r}") from None
        if host != host_id():
            raise ValueError(f"mailbox of host {host!r}: this node runs on {host_id()!r}")
        if not all(type(x) is int and x > 0 for x in (rows, row_bytes, words)):
            raise ValueError("mailbox: rows, row_bytes and words must be positive ints")
        self.rows, self.row_bytes, self.words = rows, row_bytes, words
        self.nbytes = rows * row_bytes
        self._bell = _Shared(words * _WORD, str(bells))
        self.bells = self._bell.tensor.view(torch.int64)
        self._shm: list[_Shared] = []
        self.queries = self._flags = self._flags_np = None
        try:
            self.buffer = self._map(desc, self.nbytes, "reply buffer")
            q = desc.get("queries")
            if q is not None:
                qrow = q.get("row_bytes") if isinstance(q, dict) else None
                if type(qrow) is not int or qrow <= 0:
                    raise ValueError("mailbox: queries need a positive row_bytes")
                self.query_row_bytes = qrow
                self.queries = self._map(q, rows * qrow, "query buffer")
            f = desc.get("flags")
            if f is not None:
                if not (isinstance(f, list) and len(f) == 2 and type(f[1]) is int
                        and f[1] > 0):
                    raise ValueError("mailbox: flags must be [name, count]")
                self._flags = _Shared(f[1] * 4, str(f[0]))
                self._flags_np = np.frombuffer(self._flags.map, dtype=np.int32, count=f[1])
            if self.device.type == "cuda":
                self._register_bells()
        except BaseException:
            self.close()
            raise

    def _map(self, part: dict, nbytes: int, what: str) -> torch.Tensor:
        t, shm = _map(part, nbytes, self.device, what)
        if shm is not None:
            self._shm.append(shm)
        return t

    def _register_bells(self) -> None:
        self._count = torch.zeros(1, dtype=torch.int32, device=self.device)  # deliver's
        self._bell.pin("the mailbox's doorbells")
        from ._deliver_triton import deliver, fetch  # compiled now, not while serving

        with torch.cuda.device(self.device):  # every variant a stream may launch
            # (16-byte aligned pieces, as the streams' buffers: the same specialisations)
            scratch = torch.zeros(16, dtype=torch.int64, device=self.device)
            mem = scratch.view(torch.uint8)
            deliver(scratch[:2], mem, 16, scratch[4:6], 1, 1 << 40,
                    self._count)  # a 64-bit value, as every stream's
            deliver(scratch[:2], mem, 16, scratch[4:6], 1, scratch[8:9],
                    self._count)  # the value read from memory (in graphs)
            fetch(scratch[:2], mem, 32)
            torch.cuda.synchronize(self.device)

    def check_pull(self, offset: int, nbytes: int, last_flag: int) -> None:
        """Raise ValueError unless query bytes [offset, offset + nbytes) and post flags
        up to `last_flag` exist."""
        if self.queries is None or self._flags_np is None:
            raise ValueError("mailbox: this mailbox has no queries and post flags to pull")
        if not (0 <= offset and offset + nbytes <= self.queries.numel()
                and 0 <= last_flag < len(self._flags_np)):
            raise ValueError(f"mailbox: query bytes [{offset}, {offset + nbytes}) or flag "
                             f"{last_flag} out of its {self.queries.numel()} bytes and "
                             f"{len(self._flags_np)} flags")

    def posted(self, index: int, value: int) -> bool:
        """Whether the weight node's post flag `index` has reached `value` (its query is
        in the query buffer)."""
        return int(self._flags_np[index]) >= value

    def pull(self, dst: torch.Tensor, offset: int) -> None:
        """Copy the query bytes from `offset` into `dst` (contiguous, on the node's
        device), on the current stream (CUDA: a kernel reading the weight node's GPU,
        which a graph can capture) or now (CPU)."""
        n = dst.numel() * dst.element_size()
        if not (0 <= offset and offset + n <= self.queries.numel()):
            raise ValueError(f"mailbox: query bytes [{offset}, {offset + n}) out of its "
                             f"{self.queries.numel()}")
        if self.device.type == "cuda":
            from ._deliver_triton import fetch

            fetch(dst, self.queries, offset)
        else:
            dst.view(-1).view(torch.uint8).copy_(self.queries[offset:offset + n])

    def check(self, offset: int, nbytes: int, word: int, words: int = 1) -> None:
        """Raise ValueError unless bytes [offset, offset + nbytes) and words [word,
        word + words) lie in the mailbox."""
        if not (0 <= offset and offset + nbytes <= self.nbytes and 0 <= word
                and word + words <= self.words):
            raise ValueError(f"mailbox: bytes [{offset}, {offset + nbytes}) or words "
                             f"[{word}, {word + words}) out of its {self.nbytes} bytes and "
                             f"{self.words} words")

    def deliver(self, src: torch.Tensor, offset: int, word: int,
                value: int | torch.Tensor) -> None:
        """Copy `src` (contiguous, on the node's device) to the mailbox's bytes from
        `offset`, then raise doorbell `word` to `value`: enqueued on the current stream
        (CUDA) or done now (CPU). `value` may be a one-element int64 tensor on the
        node's device, read when the delivery runs (what a captured graph needs)."""
        n = src.numel() * src.element_size()
        self.check(offset, n, word)
        if self.device.type == "cuda":
            from ._deliver_triton import deliver

            deliver(src, self.buffer, offset, self.bells, word, value, self._count)
        else:
            self.buffer[offset:offset + n].copy_(src.reshape(-1).view(torch.uint8))
            self.bells[word] = int(value)  # x86 keeps stores in order: the bytes are seen first

    def close(self) -> None:
        self.bells = self.buffer = self.queries = self._flags_np = None
        self._bell.close()
        for shm in self._shm + ([self._flags] if self._flags is not None else []):
            shm.close()
        self._shm, self._flags = [], None
