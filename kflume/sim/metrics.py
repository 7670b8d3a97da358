"""What a simulated system records, and the summary the CLI prints and writes as JSON.

Cost is the sum over billed nodes of GPU count × billed seconds × price per GPU-hour /
3600; a node is billed from when it was asked for (its start-up time included) to when
it was released. $/Mtok is that cost per million generated (output) tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .hardware import PriceTable

__all__ = ["NodeRecord", "Recorder", "SystemResult", "summarise"]


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One billed node. role: 'replica', 'weight' or 'attention'."""

    name: str
    role: str
    gpu: str
    gpus: int
    start_s: float
    end_s: float

    def __post_init__(self):
        if self.end_s < self.start_s:
            raise ValueError(f"node {self.name}: billed end {self.end_s} before start "
                             f"{self.start_s}")

    @property
    def gpu_seconds(self) -> float:
        return self.gpus * (self.end_s - self.start_s)


@dataclass(slots=True)
class Recorder:
    """Per-call outcomes (by call index) and per-system counters."""

    n_calls: int
    arrival_s: list = field(default_factory=list)  # when sent (after the session's previous call)
    admitted_s: list = field(default_factory=list)
    first_token_s: list = field(default_factory=list)
    finish_s: list = field(default_factory=list)
    tpot_s: list = field(default_factory=list)
    generated: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    nodes: list = field(default_factory=list)  # NodeRecord
    timeline: list = field(default_factory=list)  # (t, {role: gpus})
    preemptions: int = 0
    evictions: int = 0
    expirations: int = 0
    recomputed_tokens: int = 0
    prefilled_tokens: int = 0
    warm_starts: int = 0
    cold_starts: int = 0

    def __post_init__(self):
        nan = math.nan
        self.arrival_s = [nan] * self.n_calls
        self.admitted_s = [nan] * self.n_calls
        self.first_token_s = [nan] * self.n_calls
        self.finish_s = [nan] * self.n_calls
        self.tpot_s = [nan] * self.n_calls
        self.generated = [0] * self.n_calls
        self.rejected = [False] * self.n_calls


@dataclass(frozen=True, slots=True)
class SystemResult:
    """The summary of one system's run; `to_dict()` is its JSON record."""

    system: str
    dollars: float
    dollars_per_mtok: float
    gpu_hours: dict
    output_tokens: int
    calls: int
    rejected_calls: int
    tpot_p50_ms: float
    tpot_p99_ms: float
    ttft_p50_s: float
    ttft_p99_s: float
    slo_tpot_ms: float
    slo_attainment: float
    queue_delay_mean_s: float
    queue_delay_p99_s: float
    preemptions: int
    evictions: int
    expirations: int
    recomputed_tokens: int
    prefilled_tokens: int
    warm_starts: int
    cold_starts: int
    mean_gpus: float
    peak_gpus: int
    duration_s: float
    config: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _pct(values: np.ndarray, q: float, scale: float = 1.0) -> float:
    return float(np.percentile(values, q)) * scale if values.size else math.nan


def summarise(system: str, rec: Recorder, prices: PriceTable, slo_tpot_ms: float,
              config: dict) -> SystemResult:
    """Cost, latency and SLO figures of one run."""
    dollars = sum(n.gpu_seconds * prices[n.gpu] / 3600.0 for n in rec.nodes)
    gpu_hours: dict[str, float] = {}
    for n in rec.nodes:
        gpu_hours[n.gpu] = gpu_hours.get(n.gpu, 0.0) + n.gpu_seconds / 3600.0
    tokens = sum(rec.generated)
    tpot = np.array([t for t in rec.tpot_s if t == t])
    arrival = np.asarray(rec.arrival_s, dtype=float)
    first = np.asarray(rec.first_token_s, dtype=float)
    admitted = np.asarray(rec.admitted_s, dtype=float)
    ttft = (first - arrival)[~np.isnan(first)]
    queue = (admitted - arrival)[~np.isnan(admitted)]
    start = min((n.start_s for n in rec.nodes), default=0.0)
    end = max((n.end_s for n in rec.nodes), default=0.0)
    duration = end - start
    gpu_seconds = sum(n.gpu_seconds for n in rec.nodes)
    peak = max((sum(g.values()) for _, g in rec.timeline), default=0)
    return SystemResult(
        system=system,
        dollars=dollars,
        dollars_per_mtok=dollars / (tokens / 1e6) if tokens else math.inf,
        gpu_hours=gpu_hours,
        output_tokens=tokens,
        calls=rec.n_calls,
        rejected_calls=sum(rec.rejected),
        tpot_p50_ms=_pct(tpot, 50, 1e3),
        tpot_p99_ms=_pct(tpot, 99, 1e3),
        ttft_p50_s=_pct(ttft, 50),
        ttft_p99_s=_pct(ttft, 99),
        slo_tpot_ms=slo_tpot_ms,
        slo_attainment=float(np.mean(tpot * 1e3 <= slo_tpot_ms)) if tpot.size else math.nan,
        queue_delay_mean_s=float(queue.mean()) if queue.size else math.nan,
        queue_delay_p99_s=_pct(queue, 99),
        preemptions=rec.preemptions,
        evictions=rec.evictions,
        expirations=rec.expirations,
        recomputed_tokens=rec.recomputed_tokens,
        prefilled_tokens=rec.prefilled_tokens,
        warm_starts=rec.warm_starts,
        cold_starts=rec.cold_starts,
        mean_gpus=gpu_seconds / duration if duration > 0 else 0.0,
        peak_gpus=int(peak),
        duration_s=duration,
        config=config,
    )
