"""Trace loaders: each format is detected and read; workloads from traces."""

from __future__ import annotations

import json

import pytest

from kflume.sim import build_workload, detect_format, load_trace
from kflume.sim.trace import Call

from .conftest import SAMPLE_FORMATS, SAMPLES, SHARED_FORMATS, shared


@pytest.mark.parametrize("name, fmt", sorted(SAMPLE_FORMATS.items()))
def test_bundled_samples_are_detected(name, fmt):
    path = SAMPLES / name
    assert detect_format(path) == fmt
    trace = load_trace(path)
    assert trace.format == fmt and trace.calls
    assert trace.sessions == (fmt in ("kvcache-csv", "kvcache-json", "tracelab"))


def test_samples_are_small_and_attributed():
    total = sum(p.stat().st_size for p in SAMPLES.iterdir())
    assert total < 500_000
    readme = (SAMPLES / "README.md").read_text()
    for words in ("Apache", "CC BY 4.0", "derived", "Mooncake", "Splitwise", "TraceLab",
                  "kv-cache-tester"):
        assert words in readme
    assert (SAMPLES / "LICENSE-Apache-2.0.txt").exists()


@pytest.mark.parametrize("name, fmt", sorted(SHARED_FORMATS.items()))
def test_full_traces_are_detected(name, fmt):
    assert detect_format(shared(name)) == fmt


def test_full_agentic_trace():
    trace = load_trace(shared("kv_cache_tester_requests.csv"))
    assert len(trace.calls) == 49_334 and trace.groups == 710
    assert sum(c.session != f"{c.group}/main" for c in trace.calls) == 676  # sub-agent calls


def test_native_json_prefixes_match_the_derived_csv():
    native = load_trace(shared("trace_0001.json")).calls
    derived = [c for c in load_trace(shared("kv_cache_tester_requests.csv")).calls
               if c.group == "trace_0001"]
    assert native == tuple(derived)


def test_native_json_with_sub_agents(tmp_path):
    doc = {"id": "s", "block_size": 2, "requests": [
        {"t": 0.0, "in": 4, "out": 1, "hash_ids": [1, 2]},
        {"type": "subagent", "t": 5.0, "agent_id": "a1", "requests": [
            {"t": 1.0, "in": 6, "out": 2, "hash_ids": [1, 2, 3]}]},
        {"t": 10.0, "in": 8, "out": 3, "hash_ids": [1, 2, 3, 4]},
    ]}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    calls = load_trace(path).calls
    assert [(c.session, c.t_s, c.cached_prefix_tokens) for c in calls] == [
        ("s/main", 0.0, 0), ("s/a1", 6.0, 4), ("s/main", 10.0, 6)]
    assert load_trace(tmp_path).calls == calls  # a directory of sessions


def test_unknown_format_and_missing_file(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unknown trace format"):
        load_trace(bad)
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="unknown trace format 'x'"):
        load_trace(SAMPLES / "azure_code_sample.csv", fmt="x")


def test_call_checks_its_fields():
    with pytest.raises(ValueError, match="cached_prefix_tokens"):
        Call("g", "s", 0.0, 10, 1, 11)
    with pytest.raises(ValueError, match="in_tokens >= 1"):
        Call("g", "s", 0.0, 0, 1)


def test_session_arrivals_are_synthesised_and_seeded():
    trace = load_trace(SAMPLES / "kv_cache_tester_sample.csv")
    a = build_workload(trace, session_rate=0.1, seed=1)
    b = build_workload(trace, session_rate=0.1, seed=1)
    c = build_workload(trace, session_rate=0.1, seed=2)
    assert a == b and a.arrival_s != c.arrival_s
    assert len(a) == len(trace.calls) and a.output_tokens == trace.output_tokens
    assert list(a.arrival_s) == sorted(a.arrival_s)
    firsts = {}
    for t, s in zip(a.arrival_s, a.session):
        firsts.setdefault(a.session_names[s].split("/")[0], t)
    assert len(set(firsts.values())) == trace.groups  # each group starts at its own time
    short = build_workload(trace, session_rate=0.1, until_s="last-start", seed=1)
    assert len(short) < len(a) and max(short.arrival_s) <= max(firsts.values()) + 1e-9
    assert len(build_workload(trace, max_groups=3).session_names) >= 3


def test_request_level_rates_rescale_arrivals():
    trace = load_trace(SAMPLES / "azure_code_sample.csv")
    w = build_workload(trace, request_rate=10.0)
    assert len(w) / w.arrival_s[-1] == pytest.approx(10.0)
    assert len(set(w.session)) == len(w)
    with pytest.raises(ValueError, match="request_rate"):
        build_workload(trace, request_rate=0)
