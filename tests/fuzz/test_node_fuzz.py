"""A live `kflume node` process (spawned, loopback, real UCX) fuzzed: malformed and random
handshake payloads on fresh connections, and malformed and random message frames from
a connected peer (garbage, truncated frames, random msgpack maps with plausible ops and
fields of any type, random tensor descriptors with parts of the right or wrong size).
Afterwards the process must be alive and serve exact attention to a well-behaved
client. Reproducible: hypothesis draws derandomized (a fixed seed), no example database.

The full run sends over 10,000 frames (`-m slow`); the default run a smaller one."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("ucxx", reason="the UCX transport needs the ucx extra")

from kflume.comm.ucx import UcxTransport  # noqa: E402
from kflume.node import NodeConfig, NodeProcess  # noqa: E402

from ..remote.test_hardening import serving  # noqa: E402
from .frames import Fuzzer, handshakes, message_frames, mutations, variants  # noqa: E402

TOKEN = "fuzz-token"
CONFIG = NodeConfig(layers=2, kv_heads=2, head_dim=64, capacity_tokens=4096, dtype="float32")


def fuzz(examples: int, batch: int, handshake_every: int) -> tuple[int, float]:
    """Run `examples` hypothesis examples of `batch` drawn message frames, each sent as
    drawn, cut short and with a byte changed (and a handshake payload every
    `handshake_every` draws), against a fresh node; then check it serves. Returns the
    frames sent and the seconds taken."""
    t0 = time.monotonic()
    with NodeProcess(CONFIG, token=TOKEN, log_level="error") as node:
        f = Fuzzer(node.address, TOKEN)

        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def one_batch(data):
            for i in range(batch):
                _, frame = data.draw(message_frames(f.seq), label="frame")
                wrong = data.draw(st.booleans(), label="parts of the wrong size")
                for v in variants(frame, *data.draw(mutations(), label="mutation")):
                    f.message(v, wrong_sizes=wrong)
                if i % handshake_every == 0:
                    f.handshake(data.draw(handshakes(TOKEN, f.w.address), label="handshake"))
            f.sync()  # every frame handled, the node answering
            assert node.running

        one_batch()
        f.sync()
        f.close()
        t = UcxTransport(token=TOKEN)
        serving(node, t)  # alive, exact attention for a well-behaved client
        t.close()
        return f.frames, time.monotonic() - t0


@pytest.mark.timeout(120)
def test_fuzzed_node_keeps_serving_exactly():
    frames, seconds = fuzz(examples=25, batch=16, handshake_every=6)
    assert frames >= 1000, frames


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ten_thousand_fuzzed_frames():
    frames, seconds = fuzz(examples=220, batch=18, handshake_every=6)
    print(f"{frames} frames in {seconds:.1f} s")
    assert frames >= 10_000, frames
