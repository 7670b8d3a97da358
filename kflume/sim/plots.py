"""Plots of a simulation: TPOT over time, GPUs over time, cost per system.

matplotlib is imported here, lazily: `import kflume.sim` works without it.
"""

from __future__ import annotations

import math
from pathlib import Path

from .metrics import Recorder, SystemResult

__all__ = ["write_plots"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'kflume[sim]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tpot_series(rec: Recorder, bins: int = 60) -> tuple[list, list, list]:
    """Bin centres (hours), p50 and p99 TPOT (ms) of the calls finishing in each bin."""
    import numpy as np

    pts = [(f, t) for f, t in zip(rec.finish_s, rec.tpot_s) if t == t and f == f]
    if not pts:
        return [], [], []
    finish = np.array([p[0] for p in pts])
    tpot = np.array([p[1] for p in pts]) * 1e3
    edges = np.linspace(finish.min(), finish.max() + 1e-9, bins + 1)
    which = np.digitize(finish, edges) - 1
    x, p50, p99 = [], [], []
    for b in range(bins):
        sel = tpot[which == b]
        if sel.size:
            x.append((edges[b] + edges[b + 1]) / 2 / 3600)
            p50.append(float(np.percentile(sel, 50)))
            p99.append(float(np.percentile(sel, 99)))
    return x, p50, p99


def write_plots(out_dir: str | Path, results: dict[str, SystemResult],
                recorders: dict[str, Recorder], slo_tpot_ms: float) -> list[Path]:
    """tpot_over_time.png, gpus_over_time.png and cost.png in out_dir; returns their paths."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, rec in recorders.items():
        x, p50, p99 = _tpot_series(rec)
        (line,) = ax.plot(x, p99, label=f"{name} p99")
        ax.plot(x, p50, linestyle=":", color=line.get_color(), label=f"{name} p50")
    ax.axhline(slo_tpot_ms, color="grey", linestyle="--", linewidth=1, label="SLO")
    ax.set(xlabel="time (h)", ylabel="TPOT of calls finishing (ms)", title="TPOT over time")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    paths.append(_save(fig, out / "tpot_over_time.png", plt))

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, rec in recorders.items():
        if rec.timeline:
            t = [p[0] / 3600 for p in rec.timeline]
            g = [sum(p[1].values()) for p in rec.timeline]
            ax.step(t, g, where="post", label=name)
    ax.set(xlabel="time (h)", ylabel="GPUs billed", title="GPUs over time")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "gpus_over_time.png", plt))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(results)
    cost = [results[n].dollars_per_mtok for n in names]
    bars = ax.bar(names, [c if math.isfinite(c) else 0 for c in cost])
    for bar, n in zip(bars, names):
        r = results[n]
        ax.annotate(f"${r.dollars_per_mtok:.2f}\np99 {r.tpot_p99_ms:.0f} ms",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="$ per million output tokens", title="Cost per system")
    ax.margins(y=0.2)
    paths.append(_save(fig, out / "cost.png", plt))
    return paths


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
