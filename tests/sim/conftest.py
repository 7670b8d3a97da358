"""Paths shared by the simulator's tests: the bundled samples and the full traces
(../shared/traces beside the repository; tests that need them skip without them)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "kflume" / "data" / "traces"
SHARED = ROOT.parent / "shared" / "traces"

SAMPLE_FORMATS = {
    "kv_cache_tester_sample.csv": "kvcache-csv",
    "kv_cache_tester_trace_0001.json.gz": "kvcache-json",
    "mooncake_conversation_sample.jsonl": "mooncake",
    "azure_code_sample.csv": "azure",
    "tracelab_round_trace.jsonl": "tracelab",
}
SHARED_FORMATS = {
    "kv_cache_tester_requests.csv": "kvcache-csv",
    "trace_0001.json": "kvcache-json",
    "conversation_trace.jsonl": "mooncake",
    "synthetic_trace.jsonl": "mooncake",
    "AzureLLMInferenceTrace_code.csv": "azure",
    "round_trace.jsonl": "tracelab",
}


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} not here (the full traces live in ../shared/traces)")
    return path
