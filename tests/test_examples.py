"""The examples and the demo run, end to end, on this machine's CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("ucxx", reason="examples start attention nodes over UCX")

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=240):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"{args} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flags", [[], pytest.param(["--ucx"], marks=pytest.mark.slow)],
                         ids=["in-process", "ucx"])
def test_decode_loop(flags):
    out = run("examples/decode_loop.py", *flags)
    assert "identical to the local cache" in out


@pytest.mark.timeout(300)
def test_captured_decode():
    out = run("examples/captured_decode.py")
    assert "same tokens as model.generate without kflume: True" in out


@pytest.mark.timeout(300)
def test_agent_session_replays_a_real_session():
    out = run("examples/agent_session.py", "--calls", "22")
    assert "node node1 added" in out
    assert "every call identical to the unpatched model with a DynamicCache: True" in out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_agent_session_every_call():
    out = run("examples/agent_session.py")
    assert "the context starts over" in out and "node node1 added" in out
    assert "every call identical to the unpatched model with a DynamicCache: True" in out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hf_generate():
    assert "same tokens as the model without kflume: True" in run("examples/hf_generate.py")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_elastic_scale_out():
    out = run("examples/elastic_scale_out.py")
    assert "node node1 joined" in out and "worst relative error" in out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_under_a_minute():
    import time

    t0 = time.monotonic()
    out = run("-m", "kflume", "demo", "--quiet")
    assert time.monotonic() - t0 < 60
    assert "tokens identical (100.0% of tokens agree)" in out
    assert "check: passed" in out
    assert "joined the routing table" in out
    assert "routing table after the prompt" in out and "routing table at the last token" in out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_in_bf16_checks_logits_against_the_fp32_model():
    # The GPU's check (bf16), run on CPU: logits measured against the fp32 model, next to
    # the unpatched model's own bf16 error; greedy partings must be near-ties.
    out = run("-m", "kflume", "demo", "--quiet", "--dtype", "bfloat16", "--new-tokens", "24")
    assert "relative logit error against the fp32 model: kflume" in out
    assert "check: passed" in out and "NOT a near-tie" not in out
