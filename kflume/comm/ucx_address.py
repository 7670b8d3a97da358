"""A UCX worker address, checked before UCX sees it.

UCX unpacks a worker address without knowing its length and trusts every byte of it:
a malformed one aborts the process (an assertion) or reads past its end. A node takes
its peers' addresses from the network, so it parses each one first, as UCX's packer
writes it (UCX >= 1.12, address versions 1 and 2, not unified mode), and refuses any
that does not parse exactly: a structure that ends past or before the bytes given,
lengths, counts or indices out of UCX's bounds, interface attributes that are not finite
numbers, endpoint addresses (a worker address has none), or a device or interface
address whose length is not one this process's UCX packs for the same transport (a
transport reads them as structures of those sizes; the addresses of transports this
process does not have are never read). `check_own` parses a worker's own address when a
transport starts, so that a UCX whose format this module does not know is found out at
once, not at the first peer.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from .wire import WireError

__all__ = ["MAX_ADDRESS", "Interface", "WorkerAddress", "check", "check_own"]

MAX_ADDRESS = 4096  # bytes: a host with many devices packs a few hundred
_V1, _V2 = 0, 1  # UCP_OBJECT_VERSION_V1 / _V2
_HDR_DEBUG, _HDR_UUID, _HDR_CLIENT_ID, _HDR_AM_ONLY = 1, 2, 4, 8
_LAST = 0x80  # last device (device length byte), last interface (interface length byte)
_MD_EMPTY_DEV, _MD_MASK = 0x80, 0x7F
_DEV_NUM_PATHS, _DEV_SYS_DEVICE, _DEV_LEN_MASK = 0x40, 0x20, 0x1F
_IFACE_HAS_EP, _IFACE_LEN_MASK = 0x40, 0x3F
_MAX_RESOURCES, _MAX_MDS, _MAX_SYS_DEVICES, _UNKNOWN_SYS_DEVICE = 128, 64, 64, 0xFF
_NULL_RESOURCE = 0xFF
_ATTR_V1 = struct.Struct("<fffI")  # overhead, bandwidth, lat_ovh, prio_cap_flags
_ATTR_V2 = struct.Struct("<BBBBHH")  # fp8 overhead, bandwidth, latency; prio; seg; flags


@dataclass(frozen=True, slots=True)
class Interface:
    """One transport interface of a worker address: its transport's name checksum and
    the lengths of its device and interface addresses."""

    transport: int
    device_bytes: int
    address_bytes: int


@dataclass(frozen=True, slots=True)
class WorkerAddress:
    """A parsed worker address: its version (0: v1, 1: v2), its number of devices and
    its transport interfaces."""

    version: int
    devices: int
    interfaces: tuple[Interface, ...]

    def lengths(self) -> dict[int, tuple[set[int], set[int]]]:
        """By transport: the lengths of its device addresses and of its interface
        addresses."""
        out: dict[int, tuple[set[int], set[int]]] = {}
        for i in self.interfaces:
            dev, iface = out.setdefault(i.transport, (set(), set()))
            dev.add(i.device_bytes)
            iface.add(i.address_bytes)
        return out


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.buf):
            raise WireError(f"UCX worker address ends inside its {what} (byte {self.pos} of "
                            f"{len(self.buf)})")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def extended(self, first: int, mask: int, version: int, what: str) -> int:
        """A length or index packed in the low bits of `first`, continued in the next
        byte when they are all ones (address version 2)."""
        value = first & mask
        if version == _V2 and value == mask:
            value = self.byte(what)
        return value


def check(address: bytes, own: WorkerAddress | None = None) -> WorkerAddress:
    """Parse a UCX worker address; raise WireError naming what is wrong with it. With
    `own` (this process's parsed address), the device and interface addresses of the
    transports it has must have lengths it packs."""
    if not isinstance(address, (bytes, bytearray)):
        raise WireError(f"a UCX worker address must be bytes; got {type(address).__name__}")
    if not 4 <= len(address) <= MAX_ADDRESS:
        raise WireError(f"a UCX worker address of {len(address)} bytes (4 to {MAX_ADDRESS})")
    r = _Reader(bytes(address))
    head = r.byte("header")
    version = head & 0x0F
    if version == _V1:
        flags = head >> 4
    elif version == _V2:
        flags = r.byte("header")
    else:
        raise WireError(f"UCX worker address version {version} is not supported")
    if flags & ~(_HDR_DEBUG | _HDR_UUID | _HDR_CLIENT_ID | _HDR_AM_ONLY):
        raise WireError(f"UCX worker address header flags {flags:#x} are not known")
    if version == _V1 or flags & _HDR_UUID:
        r.take(8, "worker id")
    if flags & _HDR_CLIENT_ID:
        r.take(8, "client id")
    if flags & _HDR_DEBUG:
        r.take(r.byte("worker name"), "worker name")
    if r.pos < len(r.buf) and r.buf[r.pos] == _NULL_RESOURCE:
        raise WireError("UCX worker address lists no transports")
    devices, interfaces = 0, []
    last_dev = False
    while not last_dev:
        devices += 1
        md = r.byte("memory domain")
        empty = bool(md & _MD_EMPTY_DEV)
        md_index = r.extended(md, _MD_MASK, version, "memory domain")
        dev = r.byte("device")
        last_dev = bool(dev & _LAST)
        dev_len = r.extended(dev, _DEV_LEN_MASK, version, "device")
        if dev & _DEV_NUM_PATHS and r.byte("device paths") == 0:
            raise WireError("UCX worker address: a device with 0 paths")
        if dev & _DEV_SYS_DEVICE:
            sys_dev = r.byte("system device")
            if sys_dev >= _MAX_SYS_DEVICES and sys_dev != _UNKNOWN_SYS_DEVICE:
                raise WireError(f"UCX worker address: system device {sys_dev} (at most "
                                f"{_MAX_SYS_DEVICES - 1})")
        if empty and last_dev:
            md_index = 0  # (the packer's release version, in the last, empty device)
        if md_index >= _MAX_MDS and not empty:
            raise WireError(f"UCX worker address: memory domain {md_index} (at most "
                            f"{_MAX_MDS - 1})")
        r.take(dev_len, "device address")
        last_iface = empty
        while not last_iface:
            if len(interfaces) >= _MAX_RESOURCES:
                raise WireError(f"UCX worker address lists over {_MAX_RESOURCES} interfaces")
            (csum,) = struct.unpack("<H", r.take(2, "transport name"))
            _attributes(r, version)
            flag = r.byte("interface")
            last_iface = bool(flag & _LAST)
            if flag & _IFACE_HAS_EP:
                raise WireError("UCX worker address: a worker address has no endpoint "
                                "addresses")
            n = r.extended(flag, _IFACE_LEN_MASK, version, "interface")
            r.take(n, "interface address")
            interfaces.append(Interface(csum, dev_len, n))
    if r.pos != len(r.buf):
        raise WireError(f"UCX worker address ends at byte {r.pos}; {len(r.buf)} bytes given")
    if not interfaces:
        raise WireError("UCX worker address lists no transports")
    known = own.lengths() if own is not None else {}
    for i in interfaces:
        if i.transport not in known:
            continue
        dev, iface = known[i.transport]
        if i.device_bytes not in dev or i.address_bytes not in iface:
            raise WireError(f"UCX worker address: transport {i.transport:#06x} with a "
                            f"{i.device_bytes}-byte device and a {i.address_bytes}-byte "
                            f"interface address; its addresses here have {sorted(dev)} and "
                            f"{sorted(iface)} bytes")
    return WorkerAddress(version, devices, tuple(interfaces))


def _attributes(r: _Reader, version: int) -> None:
    """An interface's attributes: finite, non-negative numbers, a positive bandwidth."""
    if version == _V1:
        overhead, bandwidth, lat, _ = _ATTR_V1.unpack(r.take(_ATTR_V1.size, "interface "
                                                              "attributes"))
        if not all(math.isfinite(x) and 0 <= x < 1e30 for x in (overhead, lat)) or not (
                math.isfinite(bandwidth) and bandwidth != 0 and abs(bandwidth) < 1e30):
            raise WireError("UCX worker address: interface attributes out of range")
    else:
        _, bandwidth, *_ = _ATTR_V2.unpack(r.take(_ATTR_V2.size, "interface attributes"))
        if bandwidth == 0:
            raise WireError("UCX worker address: an interface without bandwidth")


def check_own(address: bytes) -> WorkerAddress:
    """`check` on this process's own worker address: a UCX whose address format this
    module does not know (a newer one, unified mode) cannot check its peers'."""
    try:
        return check(address)
    except WireError as e:
        raise RuntimeError(f"kflume cannot check UCX worker addresses of this UCX ({e}); "
                           "peers' addresses would reach UCX unchecked. Use UCX 1.12 to "
                           "1.21 without UCX_UNIFIED_MODE") from None
