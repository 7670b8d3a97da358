"""Shared memory between the processes of one host: the files behind mailboxes.

`_Shared` maps a file under /dev/shm (created, or opened by name), optionally registered
with CUDA as mapped host memory so that kernels read and write it; its file and
registration are released whatever happens (closed, or collected unclosed). Files of
creators that died are swept away. `SharedWords`: int32 words any process of this host
can map by name (a GraphSignal's post flags). `host_id()` names this host and its boot.
"""

from __future__ import annotations

import functools
import mmap
import os
import platform
import secrets
import socket
import sys
import tempfile
import weakref

import torch

__all__ = ["SharedWords", "host_id", "supported"]


@functools.cache
def host_id() -> str:
    """Names this host (and its boot): equal for two processes iff they share memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class _Shared:
    """A shared memory file mapped into this process (created, or opened by name)."""

    def __init__(self, nbytes: int, name: str | None = None) -> None:
        self.owner = name is None
        self.name = name or f"kflume-{os.getpid()}-{secrets.token_hex(6)}"
        if "/" in self.name or not self.name.startswith("kflume-"):
            raise ValueError(f"not a kflume mailbox name: {self.name!r}")
        self.path = os.path.join(_shm_dir(), self.name)
        if self.owner:
            _sweep()
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if self.owner else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if self.owner:  # allocated now: a full /dev/shm fails here, not on a write
                os.posix_fallocate(fd, 0, nbytes)
            elif os.fstat(fd).st_size < nbytes:
                raise ValueError(f"shared memory {self.name} holds {os.fstat(fd).st_size} "
                                 f"bytes; {nbytes} expected")
            self.map = mmap.mmap(fd, nbytes)
        except BaseException:
            if self.owner:
                _unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.nbytes = nbytes
        self.tensor = torch.frombuffer(self.map, dtype=torch.uint8)
        self._pinned: list[int] = []  # the address registered with CUDA, if it is
        # Whatever happens (close, or collected unclosed): unregistered before unmapped
        # (a registration outliving its mapping refuses the next mapping at that address
        # with error 712, and points the GPU at the old pages), the file unlinked if ours.
        self._release = weakref.finalize(self, _release, self.map, self._pinned,
                                         self.path if self.owner else None)

    def pin(self, what: str) -> None:
        """Register the whole mapping with CUDA as mapped host memory (portable), so that
        kernels of any device read and write it. Raises ValueError naming `what`."""
        ptr = self.tensor.data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(ptr, self.nbytes, 3)  # portable | mapped
        if int(err) != 0:
            raise ValueError(f"cudaHostRegister of {what} failed (error {int(err)})")
        self._pinned.append(ptr)

    def close(self) -> None:
        self.tensor = None
        self._release()


def _release(mapping: mmap.mmap, pinned: list[int], path: str | None) -> None:
    while pinned:
        torch.cuda.cudart().cudaHostUnregister(pinned.pop())
    try:
        mapping.close()
    except BufferError:  # views still alive: the map goes with them
        pass
    if path is not None:
        _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _sweep() -> None:
    """Remove the files of mailboxes whose creator is dead (killed before its exit
    handlers ran): their names carry the creator's pid."""
    d = _shm_dir()
    for name in os.listdir(d):
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != "kflume" or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            _unlink(os.path.join(d, name))
        except PermissionError:  # alive, another user's
            pass


def supported(device: str | torch.device) -> bool:
    """Whether mailboxes work for `device` here: on Linux (shared memory under /dev/shm),
    CUDA memory, or host memory on x86, whose cores see each other's stores in order
    (the CPU delivery has no fences)."""
    device = torch.device(device)
    if not sys.platform.startswith("linux"):
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64",
                                                                      "i386", "i686")


class SharedWords:
    """`count` int32 words in shared memory that any process of this host can map by
    `name`; with `cuda`, also registered as mapped host memory, so that this process's
    kernels write them (a `GraphSignal`'s post flags, which a node then reads)."""

    def __init__(self, count: int, cuda: bool = False) -> None:
        if not supported("cuda" if cuda else "cpu"):
            raise ValueError(f"shared words need Linux (and x86 without CUDA); this is "
                             f"{sys.platform} on {platform.machine()}")
        self.count = count
        self._shm = _Shared(-(-count * 4 // mmap.PAGESIZE) * mmap.PAGESIZE)  # whole pages
        self.name, self.path = self._shm.name, self._shm.path
        self.tensor = self._shm.tensor[:count * 4].view(torch.int32)
        self.tensor.zero_()
        if cuda:
            try:
                self._shm.pin("shared words")
            except ValueError as e:
                self.close()
                raise RuntimeError(str(e)) from None

    def close(self) -> None:
        self.tensor = None
        self._shm.close()
