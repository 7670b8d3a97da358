"""UCX worker addresses checked before UCX sees them: real ones parse, malformed ones are
refused naming the problem, and none that passes the check crashes UCX (tried in a
child process, which a crash would kill)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ucxx", reason="UCX addresses need the ucx extra")

from kflume.comm.ucx import UcxTransport  # noqa: E402
from kflume.comm.ucx_address import check, check_own  # noqa: E402
from kflume.comm.wire import WireError  # noqa: E402


@pytest.fixture(scope="module")
def own():
    t = UcxTransport(token="x")
    yield t.worker.address.tobytes(), t.own_address
    t.close()


def test_real_addresses_parse(own):
    raw, parsed = own
    assert parsed.interfaces and parsed.devices >= 1
    other = UcxTransport(token="x")
    assert check(other.worker.address.tobytes(), parsed).interfaces  # another worker's
    other.close()


def _at(a: bytes, what: str) -> int:
    """Where a v1 address keeps its first device's length byte ("device") and its first
    interface's length byte ("interface"): after the header and the 8-byte worker id,
    the first device's memory domain byte, its length byte, its address, then the first
    interface's transport checksum (2 bytes) and attributes (16)."""
    if a[0] & 0x0F != 0:
        pytest.skip("this UCX packs version 2 addresses")
    extra = bool(a[10] & 0x40) + bool(a[10] & 0x20)
    return 10 if what == "device" else 11 + extra + (a[10] & 0x1F) + 2 + 16


def _set(a: bytes, what: str, f) -> bytes:
    i = _at(a, what)
    return a[:i] + bytes([f(a[i])]) + a[i + 1 :]


@pytest.mark.parametrize("change,match", [
    (lambda a: b"", "of 0 bytes"),
    (lambda a: bytes([0x0F]) + a[1:], "version 15 is not supported"),
    (lambda a: bytes([a[0] | 0x40]) + a[1:], "UCX worker address"),  # a client id, unsaid
    (lambda a: a[:-1], "ends inside|ends at byte"),
    (lambda a: a + b"\x00", "ends at byte"),
    (lambda a: _set(a, "device", lambda b: b | 0x20), "system device|ends|transport|attrib"),
    (lambda a: _set(a, "interface", lambda b: b ^ 0x10), "UCX worker address"),
    (lambda a: _set(a, "interface", lambda b: b | 0x40), "endpoint addresses"),
    (lambda a: a[:9] + bytes([0x7F]) + a[10:], "memory domain|ends"),
    (lambda a: a[:9] + b"\xff" + a[10:], "no transports"),
    (lambda a: a[: _at(a, "device") + 3] + b"\x00\x00\xc0\x7f" + a[_at(a, "device") + 7 :],
     "attributes"),  # a NaN overhead (the first interface's attributes, after its checksum)
    (lambda a: a * 30, "bytes \\(4 to 4096\\)"),
])
def test_malformed_addresses_are_refused(own, change, match):
    raw, parsed = own
    with pytest.raises(WireError, match=match):
        check(change(raw), parsed)


def test_an_address_format_this_module_does_not_know_is_found_at_start():
    with pytest.raises(RuntimeError, match="cannot check UCX worker addresses"):
        check_own(b"\x0f" * 20)


CHILD = textwrap.dedent("""
    import os, random, sys
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    import numpy as np
    from kflume.comm.ucx import UcxTransport
    from kflume.comm.ucx_address import check
    from kflume.comm.wire import WireError
    server, client = UcxTransport(token="x"), UcxTransport(token="x")
    L = server.L
    base = client.worker.address.tobytes()
    rnd = random.Random(int(sys.argv[1]))
    tried = 0
    for k in range(int(sys.argv[2])):
        b = bytearray(base)
        for _ in range(rnd.randrange(1, 5)):
            i = rnd.randrange(len(b)) if rnd.random() < 0.5 else rnd.randrange(min(len(b), 40))
            b[i] = rnd.choice([0, 1, 0x20, 0x40, 0x7F, 0x80, 0xFF, rnd.randrange(256)])
        if rnd.random() < 0.2:
            b = b[: rnd.randrange(len(b))]
        try:
            check(bytes(b), server.own_address)
        except WireError:
            continue
        tried += 1
        addr = L.UCXAddress.create_from_buffer(np.frombuffer(bytes(b), dtype=np.uint8))
        try:
            ep = L.UCXEndpoint.create_from_worker_address(server.worker, addr, True)
            for _ in range(3):
                server.worker.progress()
                client.worker.progress()
            ep.close_blocking(1000, 10)
        except Exception:
            pass
    print("tried", tried)
""")


def _mutants_reach_ucx_safely(seed: int, count: int) -> None:
    r = subprocess.run([sys.executable, "-c", CHILD, str(seed), str(count)],
                       capture_output=True, text=True, errors="replace", timeout=600)
    assert r.returncode == 0, f"UCX crashed ({r.returncode}) on an address that passed the " \
                              f"check:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert int(r.stdout.split()[-1]) > count // 10


@pytest.mark.timeout(120)
def test_addresses_that_pass_the_check_do_not_crash_ucx():
    _mutants_reach_ucx_safely(seed=1, count=3000)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_many_addresses_that_pass_the_check_do_not_crash_ucx(seed):
    _mutants_reach_ucx_safely(seed, count=40_000)
