"""GPU profiles, calibration constants and prices, read from kflume/sim/hardware.json.

The H200 is measured (docs/benchmarks.md); the H100's attention read rate is measured
too; every other figure of another GPU is its spec sheet scaled by the H200's measured
efficiency (weight streaming: 8B weights over the measured local compute; attention:
the measured kernel read rate over the spec bandwidth).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

__all__ = ["GPU_NAMES", "Calibration", "GpuProfile", "PriceTable", "calibration", "gpu",
           "hardware_data", "price_table"]

DATA = Path(__file__).with_name("hardware.json")


@lru_cache(maxsize=1)
def hardware_data() -> dict:
    with open(DATA, encoding="utf-8") as f:
        return json.load(f)


GPU_NAMES = tuple(sorted(hardware_data()["gpus"]))


@dataclass(frozen=True, slots=True)
class GpuProfile:
    """One GPU class. Rates in bytes/s and FLOP/s; memory in bytes.

    weight_read_bps      rate a decode step streams the weights (local compute model)
    kflume_read_bps      rate kflume's split-KV kernel reads paged KV
    colocated_read_bps   rate a colocated engine's attention (cuDNN) reads KV
    """

    name: str
    memory_bytes: float
    bandwidth_bps: float
    flops: float
    weight_read_bps: float
    kflume_read_bps: float
    colocated_read_bps: float
    source: str

    def __post_init__(self):
        for f in ("memory_bytes", "bandwidth_bps", "flops", "weight_read_bps",
                  "kflume_read_bps", "colocated_read_bps"):
            if not getattr(self, f) > 0:
                raise ValueError(f"GpuProfile {self.name!r}: {f} must be > 0")


@dataclass(frozen=True, slots=True)
class Calibration:
    """Fixed costs of a step (measured or fitted) and the assumed constants, in seconds,
    bytes and bytes/s; see hardware.json."""

    colocated_step_s: float
    kflume_step_s: float
    kflume_pipelined_step_s: float
    layer_round_trip_s: float
    layer_extra_s: float
    prefill_mfu: float
    tp_allreduce_s: float
    link_bps: float
    memory_utilization: float
    reserve_bytes_per_gpu: float


def calibration(**overrides) -> Calibration:
    d = hardware_data()
    m, f, a = d["measured"], d["measured"]["fitted"], d["assumed"]
    cal = Calibration(
        colocated_step_s=f["colocated_step_ms"] / 1e3,
        kflume_step_s=m["step_boundary_ms"]["serial"] / 1e3,
        kflume_pipelined_step_s=m["step_boundary_ms"]["pipelined"] / 1e3,
        layer_round_trip_s=m["layer_round_trip_us"] / 1e6,
        layer_extra_s=f["layer_extra_us"] / 1e6,
        prefill_mfu=a["prefill_mfu"],
        tp_allreduce_s=a["tp_allreduce_us"] / 1e6,
        link_bps=a["link_gbs"] * 1e9,
        memory_utilization=a["memory_utilization"],
        reserve_bytes_per_gpu=a["reserve_gb_per_gpu"] * 1e9,
    )
    return replace(cal, **overrides)


def _efficiencies(mode: str) -> tuple[float, float, float]:
    """(weight streaming, kflume read, colocated read) as fractions of the H200's spec."""
    from .models import model as model_shape  # models does not import hardware

    d = hardware_data()
    m, h200 = d["measured"], d["gpus"]["h200"]
    spec = h200["bandwidth_tbs"] * 1e12
    weights = model_shape(m["model"]).weight_bytes
    weight_eff = weights / (m["local_compute_ms"][mode][0] / 1e3) / spec
    return weight_eff, m["kflume_read_tbs"] * 1e12 / spec, m["colocated_read_tbs"] * 1e12 / spec


def gpu(name: str, mode: str = "compiled") -> GpuProfile:
    """The profile of GPU class `name` (one of GPU_NAMES). mode: 'compiled' (the
    simulator's default: CUDA graphs and a compiled model, as a serving engine runs) or
    'eager' (the model as written, for calibration)."""
    d = hardware_data()
    key = name.lower()
    if key not in d["gpus"]:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPU_NAMES)}")
    if mode not in ("compiled", "eager"):
        raise ValueError(f"mode must be 'compiled' or 'eager', got {mode!r}")
    g = d["gpus"][key]
    spec = g["bandwidth_tbs"] * 1e12
    w_eff, k_eff, c_eff = _efficiencies(mode)
    kflume_read, coloc_read = spec * k_eff, spec * c_eff
    measured = d["measured"].get(key)
    if measured:  # a measured read rate beats a scaled one
        kflume_read = measured["kflume_read_tbs"] * 1e12
        coloc_read = measured["colocated_read_tbs"] * 1e12
    return GpuProfile(name=key, memory_bytes=g["memory_gb"] * 1e9, bandwidth_bps=spec,
                      flops=g["bf16_tflops"] * 1e12, weight_read_bps=spec * w_eff,
                      kflume_read_bps=kflume_read, colocated_read_bps=coloc_read,
                      source=g["source"])


@dataclass(frozen=True, slots=True)
class PriceTable:
    """USD per GPU-hour by GPU class, for one tier ('community' or 'secure')."""

    tier: str
    per_gpu_hour: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for k, v in self.per_gpu_hour.items():
            if not v >= 0:
                raise ValueError(f"price of {k!r} must be >= 0, got {v}")

    def __getitem__(self, gpu_name: str) -> float:
        try:
            return self.per_gpu_hour[gpu_name]
        except KeyError:
            raise ValueError(f"no price for GPU {gpu_name!r}; give one with --price "
                             f"{gpu_name}=USD_PER_HOUR") from None


def price_table(tier: str = "community", overrides: dict[str, float] | None = None) -> PriceTable:
    if tier not in ("community", "secure"):
        raise ValueError(f"price tier must be 'community' or 'secure', got {tier!r}")
    prices = {k: v[tier] for k, v in hardware_data()["prices"]["per_gpu_hour"].items()}
    for k, v in (overrides or {}).items():
        if k.lower() not in hardware_data()["gpus"]:
            raise ValueError(f"price for unknown GPU {k!r}; known: {', '.join(GPU_NAMES)}")
        prices[k.lower()] = float(v)
    return PriceTable(tier=tier, per_gpu_hour=prices)
