"""simulate(): run the configured systems over one workload, on one price table."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from ..scale import HeadroomPolicy
from .config import SimConfig
from .disagg import KflumeSystem
from .hardware import GpuProfile, calibration, gpu, price_table
from .metrics import Recorder, SystemResult, summarise
from .models import ModelShape, model
from .replicas import ReplicaSystem
from .timing import StepModel
from .workload import Workload

__all__ = ["SimRun", "attention_capacity", "replica_capacity", "simulate", "tensor_parallel"]

ProgressFactory = Callable[[str, int], Callable[[int], None] | None]


def tensor_parallel(m: ModelShape, g: GpuProfile) -> int:
    """The fewest GPUs (1, 2, 4, 8) whose weights take at most 60 % of their memory."""
    for n in (1, 2, 4, 8):
        if m.weight_bytes <= 0.6 * n * g.memory_bytes:
            return n
    raise ValueError(f"{m.name} does not fit 8 {g.name} GPUs with room for KV")


def replica_capacity(m: ModelShape, g: GpuProfile, tp: int, cfg: SimConfig) -> int:
    """KV tokens a replica of `tp` GPUs holds beside its weights."""
    cal = calibration(**cfg.calibration)
    room = tp * (g.memory_bytes * cal.memory_utilization - cal.reserve_bytes_per_gpu)
    tokens = int((room - m.weight_bytes) // m.kv_bytes_per_token)
    if tokens <= 0:
        raise ValueError(f"{m.name} leaves no room for KV on {tp} {g.name} GPU(s); raise tp")
    return tokens


def attention_capacity(m: ModelShape, g: GpuProfile, cfg: SimConfig) -> int:
    """KV tokens one attention node (one GPU, no weights) holds."""
    cal = calibration(**cfg.calibration)
    room = g.memory_bytes * cal.memory_utilization - cal.reserve_bytes_per_gpu
    return int(room // m.kv_bytes_per_token)


class SimRun:
    """The systems of one configuration over one workload."""

    def __init__(self, workload: Workload, cfg: SimConfig):
        self.workload, self.cfg = workload, cfg
        self.model = model(cfg.model)
        self.gpu = gpu(cfg.gpu)
        self.tp = cfg.tp or tensor_parallel(self.model, self.gpu)
        self.cal = calibration(**cfg.calibration)
        self.step = StepModel(self.model, self.gpu, self.tp, self.cal)
        self.prices = price_table(cfg.price_tier, cfg.prices)
        self.recorders: dict[str, Recorder] = {}

    def policy(self, keep_idle: bool) -> HeadroomPolicy:
        c = self.cfg
        return HeadroomPolicy(min_nodes=c.min_nodes, max_nodes=c.max_nodes,
                              interval_s=c.policy_interval_s, keep_idle=keep_idle,
                              tpot_slo_ms=c.slo_tpot_ms)

    def build(self, name: str, replicas: int | None = None):
        c, w = self.cfg, self.workload
        if name in ("colocated", "instance"):
            cap = replica_capacity(self.model, self.gpu, self.tp, c)
            if name == "colocated":
                return ReplicaSystem(name, c, w, self.step, cap, fixed=replicas or 4), {
                    "replicas": replicas or 4, "gpus_per_replica": self.tp, "kv_tokens": cap}
            return ReplicaSystem(name, c, w, self.step, cap, policy=self.policy(False)), {
                "gpus_per_replica": self.tp, "kv_tokens": cap,
                "start_s": [c.warm_start_s, c.cold_start_s]}
        attn = gpu(c.attention_gpu if name == "kflume" else name.split("-", 1)[1])
        cap = attention_capacity(self.model, attn, c)
        system = KflumeSystem(name, c, w, self.step, attn, cap, self.policy(c.reserve_idle),
                              self.prices)
        return system, {"gpus_per_weight_node": self.tp, "attention_gpu": attn.name,
                        "attention_node_kv_tokens": cap, "attention_start_s": c.attention_start_s}

    def run(self, progress: ProgressFactory | None = None) -> dict[str, SystemResult]:
        c = self.cfg
        order = sorted(c.systems, key=lambda s: s == "colocated")  # instance sizes colocated
        results: dict[str, SystemResult] = {}
        for name in order:
            replicas = None
            if name == "colocated":
                replicas = c.replicas
                if replicas is None and "instance" in results:
                    replicas = max(1, math.ceil(results["instance"].peak_gpus / self.tp))
            system, extra = self.build(name, replicas)
            rec = system.run(progress(name, len(self.workload)) if progress else None)
            self.recorders[name] = rec
            config = {"model": self.model.name, "gpu": self.gpu.name, **extra,
                      "price_tier": self.prices.tier, "prices": self.prices.per_gpu_hour,
                      "slo_tpot_ms": c.slo_tpot_ms, "trace": self.workload.trace}
            results[name] = summarise(name, rec, self.prices, c.slo_tpot_ms, config)
        return {name: results[name] for name in c.systems}


def simulate(workload: Workload, cfg: SimConfig | None = None,
             **overrides) -> dict[str, SystemResult]:
    """Run every system of `cfg` (SimConfig fields may be given as keywords) over the
    workload; results keyed by system name."""
    cfg = replace(cfg or SimConfig(), **overrides)
    return SimRun(workload, cfg).run()

