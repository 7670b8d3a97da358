"""A node no peer can stall, crash or cross: each failure class against a `kflume node`
process over UCX on loopback, with peers that misbehave on purpose (tests/remote/rawpeer.py),
and the node checked to serve well-behaved clients exactly afterwards."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("ucxx", reason="the UCX transport needs the ucx extra")


# ---- no token, no public address ----------------------------------------------------------
def _start(args: list[str], timeout: float = 90.0):
    """`kflume node ARGS` without a token: (process, its first line or None if it exited)."""
    import os
    import select
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "KFLUME_TOKEN"}
    cmd = [sys.executable, "-m", "kflume", "node", "--capacity-tokens", "64", "--layers", "1",
           "--kv-heads", "1", "--head-dim", "8", "--dtype", "float32", *args]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([p.stdout], [], [], 0.2)[0]:
            return p, p.stdout.readline().decode() or None  # ("": it exited)
        if p.poll() is not None:
            return p, None
    p.kill()
    raise AssertionError(f"kflume node {args} neither listened nor exited in {timeout} s")


@pytest.mark.timeout(240)
def test_no_token_on_a_public_address_needs_an_explicit_flag():
    p, line = _start(["--listen", "0.0.0.0:0"])
    try:
        assert line is None and p.wait(30) != 0, f"listened without a token: {line}"
        assert "--insecure-no-token" in p.stderr.read().decode()
    finally:
        p.kill()
    p, line = _start(["--listen", "0.0.0.0:0", "--insecure-no-token"])
    try:
        assert line and line.startswith("kflume node listening on 0.0.0.0:")
    finally:
        p.terminate()
        _, err = p.communicate(timeout=30)
    assert "without a token" in err.decode()
    p, line = _start(["--listen", "127.0.0.1:0"])  # loopback: no token needed
    p.terminate()
    p.communicate(timeout=30)
    assert line and line.startswith("kflume node listening on 127.0.0.1:")
