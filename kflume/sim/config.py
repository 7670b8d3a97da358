"""SimConfig: every knob of a simulation, with its default and unit."""

from __future__ import annotations

from dataclasses import dataclass, field

from .hardware import GPU_NAMES
from .models import MODELS

__all__ = ["BASE_SYSTEMS", "SimConfig"]

BASE_SYSTEMS = ("colocated", "instance", "kflume")


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Systems and hardware of a run.

    systems             'colocated', 'instance', 'kflume' and 'kflume-<gpu>' (kflume with
                        its attention nodes on GPU class <gpu>).
    model               a preset of kflume/sim/models.py.
    gpu                 GPU class of replicas and weight nodes; attention_gpu: of kflume's
                        attention nodes.
    tp                  GPUs per replica / weight node; None: the fewest (1, 2, 4, 8) whose
                        memory the weights fill to at most 60 %.
    price_tier, prices  'community' or 'secure', and USD per GPU-hour overrides by class.
    slo_tpot_ms         TPOT target of the SLO (per call, mean time per output token).
    chunk_tokens        prefill tokens a step carries at most (chunked prefill); fewer when
                        more would take the step past 0.9 x slo_tpot_ms.
    max_batch           requests a replica or weight node serves at once.
    replicas            colocated replica count; None: the most replicas the instance
                        system ran at once (provisioned for its peak), or 4 when it does
                        not run.
    warm_start_s, cold_start_s, keep_warm_s
                        a new replica or weight node starts in warm_start_s on a host that
                        released one in the last keep_warm_s (checkpoint in memory), else
                        in cold_start_s.
    attention_start_s   a new attention node's time to serve.
    reserve_idle        kflume's policy sizes the attention nodes for idle sessions' KV
                        too (True), or only for live KV, keeping idle sessions in the room
                        left and dropping the oldest when a call needs it (False).
    session_ttl_s       kflume drops a session's KV from its attention nodes after this long
                        idle; None: when holding it would have cost more than recomputing
                        it (per session, from its size and the prices). Replicas keep idle
                        KV while they have room, oldest dropped first.
    policy_interval_s   how often autoscaling decides.
    min_nodes, max_nodes  floor and ceiling of autoscaled replicas / attention nodes (and
                        weight nodes); 0 lets a system scale to zero when idle.
    weight_target_batch kflume runs a weight node per this many requests...
    prefill_utilization ...and enough that they spend at most this share of their time with
                        prefill waiting (averaged over two minutes); the instance system
                        keeps as many replicas for it too.
    migrate_gbs         GB/s at which a draining attention node's KV moves away.
    refresh_steps       a busy server's step time is recomputed at least this often.
    calibration         overrides of kflume.sim.hardware.Calibration fields.
    """

    systems: tuple[str, ...] = ("colocated", "instance", "kflume", "kflume-l40s")
    model: str = "llama-3.1-8b"
    gpu: str = "h200"
    attention_gpu: str = "h200"
    tp: int | None = None
    price_tier: str = "community"
    prices: dict = field(default_factory=dict)
    slo_tpot_ms: float = 50.0
    chunk_tokens: int = 2048
    max_batch: int = 256
    replicas: int | None = None
    warm_start_s: float = 1.1
    cold_start_s: float = 10.8
    keep_warm_s: float = 600.0
    attention_start_s: float = 6.4
    reserve_idle: bool = False
    session_ttl_s: float | None = None
    policy_interval_s: float = 1.0
    min_nodes: int = 0
    max_nodes: int = 512
    weight_target_batch: int = 128
    prefill_utilization: float = 0.6
    migrate_gbs: float = 50.0
    refresh_steps: float = 1000.0
    calibration: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.systems:
            raise ValueError("SimConfig.systems is empty")
        for s in self.systems:
            if s not in BASE_SYSTEMS and not (s.startswith("kflume-") and s[7:] in GPU_NAMES):
                raise ValueError(f"unknown system {s!r}; known: {', '.join(BASE_SYSTEMS)} and "
                                 f"kflume-<gpu> with <gpu> in {', '.join(GPU_NAMES)}")
        if len(set(self.systems)) != len(self.systems):
            raise ValueError(f"a system is named twice in {self.systems}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(MODELS)}")
        for name in ("gpu", "attention_gpu"):
            if getattr(self, name) not in GPU_NAMES:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; known: "
                                 f"{', '.join(GPU_NAMES)}")
        if self.tp is not None and self.tp not in (1, 2, 4, 8):
            raise ValueError(f"tp must be 1, 2, 4 or 8 (or None), got {self.tp}")
        for name in ("slo_tpot_ms", "warm_start_s", "cold_start_s", "policy_interval_s",
                     "migrate_gbs", "refresh_steps", "prefill_utilization"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.session_ttl_s is not None and self.session_ttl_s < 0:
            raise ValueError(f"session_ttl_s must be >= 0 or None, got {self.session_ttl_s}")
        for name in ("keep_warm_s", "attention_start_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("chunk_tokens", "max_batch", "weight_target_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"replicas must be >= 1 or None, got {self.replicas}")
        if not 0 <= self.min_nodes <= self.max_nodes or self.max_nodes < 1:
            raise ValueError(f"need 0 <= min_nodes <= max_nodes and max_nodes >= 1, got "
                             f"{self.min_nodes}, {self.max_nodes}")
