"""Predicted against measured step times: the configurations of docs/benchmarks.md's
end-to-end tables (Llama-3.1-8B, 2 H200 of one host: the weight node on one, one
attention node holding all KV on the other).

    python -m kflume.sim.calibration      # prints the table of docs/simulation.md
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .hardware import calibration, gpu
from .models import model
from .timing import StepModel

__all__ = ["MEASURED", "CalibrationRow", "Measured", "calibration_table"]


@dataclass(frozen=True, slots=True)
class Measured:
    """One measured p50 step time. system: 'colocated', 'kflume' (one micro-batch) or
    'pipelined' (two); mode: 'compiled' or 'eager' (the model as written)."""

    batch: int
    context: int
    system: str
    mode: str
    p50_ms: float
    source: str


@dataclass(frozen=True, slots=True)
class CalibrationRow:
    measured: Measured
    predicted_ms: float

    @property
    def error(self) -> float:
        """(predicted − measured) / measured."""
        return self.predicted_ms / self.measured.p50_ms - 1.0


_E2E = "docs/benchmarks.md, End-to-end TPOT"
_AT_MERGE = f"{_E2E}, run at 9d66ad7"
_HEADLINE = f"{_E2E}, headline runs, library at 4b09576"
_LARGER = f"{_E2E}, larger sizes as written, code merged at 9d66ad7"
MEASURED = (
    Measured(8, 32768, "colocated", "compiled", 12.53, _AT_MERGE),
    Measured(8, 32768, "kflume", "compiled", 14.58, _AT_MERGE),
    Measured(8, 32768, "pipelined", "compiled", 11.84, _AT_MERGE),
    Measured(8, 32768, "colocated", "eager", 15.02, _HEADLINE),
    Measured(8, 32768, "kflume", "eager", 18.35, _HEADLINE),
    Measured(8, 32768, "pipelined", "eager", 17.49, _HEADLINE),
    Measured(32, 32768, "kflume", "eager", 40.15, _LARGER),
    Measured(32, 32768, "pipelined", "eager", 33.08, _LARGER),
    Measured(8, 131072, "kflume", "eager", 39.34, _LARGER),
    Measured(8, 131072, "pipelined", "eager", 32.85, _LARGER),
)


def predict_ms(m: Measured) -> float:
    """The step model's time for a measured configuration."""
    cal = calibration()
    if m.system == "kflume":  # one micro-batch only
        cal = replace(cal, kflume_pipelined_step_s=float("inf"))
    elif m.system == "pipelined":
        cal = replace(cal, kflume_step_s=float("inf"))
    g = gpu("h200", m.mode)
    step = StepModel(model("llama-3.1-8b"), g, 1, cal)
    kv = m.batch * m.context
    if m.system == "colocated":
        return step.colocated_s(m.batch, kv) * 1e3
    return step.kflume_s(m.batch, kv, g.kflume_read_bps, g.flops) * 1e3


def calibration_table() -> list[CalibrationRow]:
    return [CalibrationRow(m, predict_ms(m)) for m in MEASURED]


def main() -> int:
    print("| B x L | system | model | measured p50 ms | predicted ms | error |")
    print("|---|---|---|---|---|---|")
    for r in calibration_table():
        m = r.measured
        print(f"| {m.batch}x{m.context // 1024}K | {m.system} | {m.mode} | {m.p50_ms:.2f} | "
              f"{r.predicted_ms:.2f} | {r.error * 100:+.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
