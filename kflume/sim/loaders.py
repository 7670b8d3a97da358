"""Trace loaders, one per format, and `load_trace(path)`, which detects the format.

Formats (the traces described in the shared traces README, and subsets of them shipped in
kflume/data/traces/):

- `mooncake`     JSONL `{"timestamp" (ms), "input_length", "output_length", "hash_ids"}`;
                 request-level. Prefix sharing between requests is not used.
- `azure`        CSV `TIMESTAMP,ContextTokens,GeneratedTokens` (Azure LLM inference
                 trace 2023); request-level.
- `kvcache-csv`  CSV, one row per call, `trace_id,agent,...,t_s,...,in_tokens,out_tokens,
                 cached_prefix_tokens,...` (derived from callanjfox/kv-cache-tester); sessions.
- `kvcache-json` one kv-cache-tester session `{id, block_size, requests: [...]}` (or a
                 directory of them); cached prefixes from the requests' `hash_ids`; sessions.
- `tracelab`     JSONL rounds of uw-syfi/TraceLab (`session_id`, `input_tokens_total`,
                 `prefix_tokens`, `output_tokens`, `timing_events`); sessions.

Any of these files may be gzip-compressed (a name ending in `.gz`).
"""

from __future__ import annotations

import csv
import gzip
import json
from datetime import datetime
from pathlib import Path

from .trace import Call, Trace

__all__ = ["FORMATS", "detect_format", "load_trace"]

FORMATS = ("mooncake", "azure", "kvcache-csv", "kvcache-json", "tracelab")


def _open(p: Path, newline: str | None = None):
    """A trace file for reading as text, gunzipped on the fly when its name ends in .gz."""
    if p.suffix == ".gz":
        return gzip.open(p, "rt", encoding="utf-8", newline=newline)
    return open(p, encoding="utf-8", newline=newline)


def _stem(p: Path) -> str:
    return Path(p.stem).stem if p.suffix == ".gz" else p.stem


def detect_format(path: str | Path) -> str:
    """The format of a trace file (or of a directory of kv-cache-tester JSON files)."""
    p = Path(path)
    if p.is_dir():
        if any(p.glob("*.json")) or any(p.glob("*.json.gz")):
            return "kvcache-json"
        raise ValueError(f"{p}: a directory must hold kv-cache-tester *.json session files")
    with _open(p) as f:
        head = f.read(4096)
    first = head.lstrip().splitlines()[0] if head.strip() else ""
    if first.startswith("{"):
        try:
            obj = json.loads(first)
        except json.JSONDecodeError:
            obj = None  # a pretty-printed JSON document, not JSONL
        if isinstance(obj, dict) and "input_length" in obj and "timestamp" in obj:
            return "mooncake"
        if isinstance(obj, dict) and "session_id" in obj and "input_tokens_total" in obj:
            return "tracelab"
        if '"requests"' in head or obj is None:
            return "kvcache-json"
    cols = {c.strip() for c in first.split(",")}
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= cols:
        return "azure"
    if {"trace_id", "agent", "t_s", "in_tokens", "out_tokens"} <= cols:
        return "kvcache-csv"
    raise ValueError(f"{p}: unknown trace format (first line {first[:80]!r}); known: "
                     f"{', '.join(FORMATS)}")


def load_trace(path: str | Path, fmt: str | None = None) -> Trace:
    """Read a trace; `fmt` (one of FORMATS) skips detection."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"trace {p} does not exist")
    fmt = fmt or detect_format(p)
    loaders = {"mooncake": _mooncake, "azure": _azure, "kvcache-csv": _kvcache_csv,
               "kvcache-json": _kvcache_json, "tracelab": _tracelab}
    if fmt not in loaders:
        raise ValueError(f"unknown trace format {fmt!r}; known: {', '.join(FORMATS)}")
    calls, sessions = loaders[fmt](p)
    return Trace(name=p.name, format=fmt, sessions=sessions, calls=tuple(calls))


def _mooncake(p: Path) -> tuple[list[Call], bool]:
    calls = []
    with _open(p) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            r = json.loads(line)
            key = f"r{i}"
            calls.append(Call(key, key, r["timestamp"] / 1000.0, max(1, int(r["input_length"])),
                              int(r["output_length"])))
    return calls, False


def _azure(p: Path) -> tuple[list[Call], bool]:
    rows = []
    with _open(p, newline="") as f:
        for r in csv.DictReader(f):
            rows.append((_wall_clock_s(r["TIMESTAMP"]), int(r["ContextTokens"]),
                         int(r["GeneratedTokens"])))
    t0 = min(t for t, _, _ in rows)
    return [Call(f"r{i}", f"r{i}", t - t0, max(1, n_in), n_out)
            for i, (t, n_in, n_out) in enumerate(rows)], False


def _wall_clock_s(stamp: str) -> float:
    """'2023-11-16 18:17:03.9799600' (any number of fractional digits) -> epoch seconds."""
    whole, _, frac = stamp.strip().partition(".")
    t = datetime.fromisoformat(whole).timestamp()
    return t + (float("0." + frac) if frac else 0.0)


def _kvcache_csv(p: Path) -> tuple[list[Call], bool]:
    calls = []
    with _open(p, newline="") as f:
        for r in csv.DictReader(f):
            n_in = max(1, int(r["in_tokens"]))
            cached = min(int(r.get("cached_prefix_tokens") or 0), n_in)
            calls.append(Call(r["trace_id"], f"{r['trace_id']}/{r['agent']}", float(r["t_s"]),
                              n_in, int(r["out_tokens"]), cached))
    return calls, True


def _kvcache_json(p: Path) -> tuple[list[Call], bool]:
    files = sorted([*p.glob("*.json"), *p.glob("*.json.gz")]) if p.is_dir() else [p]
    calls: list[Call] = []
    for f in files:
        with _open(f) as fh:
            calls += _kvcache_session(json.load(fh), _stem(f))
    return calls, True


def _kvcache_session(doc: dict, default_id: str) -> list[Call]:
    """One native kv-cache-tester session: requests, with sub-agents flattened."""
    if not isinstance(doc, dict) or "requests" not in doc:
        raise ValueError(f"{default_id}: not a kv-cache-tester session (no 'requests')")
    group = str(doc.get("id", default_id))
    block = int(doc.get("block_size", 64))
    flat = []  # (t, session, request)

    def walk(requests, offset, agent):
        for r in requests:
            if r.get("type") == "subagent":
                walk(r.get("requests", []), offset + float(r.get("t", 0.0)),
                     str(r.get("agent_id", f"sub{len(flat)}")))
            else:
                flat.append((offset + float(r.get("t", 0.0)), agent, r))

    walk(doc["requests"], 0.0, "main")
    flat.sort(key=lambda x: x[0])
    seen: dict = {}  # a trie over hash_ids, in arrival order, across the whole session
    calls = []
    for t, agent, r in flat:
        n_in = max(1, int(r.get("in", 1)))
        hits, node = 0, seen
        for h in r.get("hash_ids", []):
            nxt = node.get(h)
            if nxt is None:
                break
            hits, node = hits + 1, nxt
        node = seen
        for h in r.get("hash_ids", []):
            node = node.setdefault(h, {})
        calls.append(Call(group, f"{group}/{agent}", t, n_in, int(r.get("out", 0)),
                          min(hits * block, n_in)))
    return calls


def _tracelab(p: Path) -> tuple[list[Call], bool]:
    rows = []
    with _open(p) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    starts: dict[str, float] = {}
    timed = []
    for r in rows:
        stamps = [e["timestamp"] for e in r.get("timing_events") or [] if e.get("timestamp")]
        t = min(_iso_s(s) for s in stamps) if stamps else float(r.get("round_index", 0))
        timed.append((t, r))
        sid = r["session_id"]
        starts[sid] = min(starts.get(sid, t), t)
    timed.sort(key=lambda x: (x[1]["session_id"], x[0]))
    calls = []
    for t, r in timed:
        sid = r["session_id"]
        n_in = max(1, int(r.get("input_tokens_total") or 1))
        cached = min(int(r.get("prefix_tokens") or 0), n_in)
        calls.append(Call(sid, sid, t - starts[sid], n_in, int(r.get("output_tokens") or 0),
                          cached))
    return calls, True


def _iso_s(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
