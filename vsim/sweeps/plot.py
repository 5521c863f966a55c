"""``vsim plot SWEEP_DIR``: a metric against a factor, one line per hue level, mean and spread
(min to max) across replicates, written as a PNG with matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from vsim.sweeps.spec import SweepError
from vsim.sweeps.table import read_table

LABELS = {
    "vm.vcpus": "vCPUs",
    "sim_time_ns": "simulated time",
    "vcpu_total.pf_taken": "page faults taken",
    "vcpu_total.pf_fixed": "page faults fixed",
}


def _scale(metric: str, values: np.ndarray) -> tuple[float, str]:
    """Divisor and unit for a metric: ``*_ns`` metrics in µs, ms or s."""
    if not (metric.endswith("_ns") or ".p" in metric or metric.endswith(".max")):
        return 1.0, ""
    top = float(np.nanmax(np.abs(values))) if values.size else 0.0
    for div, unit in ((1e9, "s"), (1e6, "ms"), (1e3, "µs")):
        if top >= div:
            return div, unit
    return 1.0, "ns"


def plot(sweep_dir: str | Path, x: str, y: str, hue: str | None = None, logx: bool = False,
         out: str | Path | None = None) -> Path:  # fmt: skip
    d = Path(sweep_dir)
    rows = [r for r in read_table(d) if r["status"] == "ok"]
    if not rows:
        raise SweepError(f"{d}: no completed points to plot")
    for key, what in ((x, "--x"), (y, "--y"), (hue, "--hue")):
        if key is not None and key not in rows[0]:
            raise SweepError(f"{what} {key}: not a column of results.csv; columns: {', '.join(rows[0])}")
    groups: dict[Any, dict[Any, list[float]]] = {}
    for r in rows:
        groups.setdefault(r[hue] if hue else None, {}).setdefault(r[x], []).append(float(r[y]))
    div, unit = _scale(y, np.array([float(r[y]) for r in rows]))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for level, by_x in sorted(groups.items(), key=lambda kv: str(kv[0])):
        xs = sorted(by_x)
        mean = np.array([np.mean(by_x[v]) for v in xs]) / div
        lo = np.array([np.min(by_x[v]) for v in xs]) / div
        hi = np.array([np.max(by_x[v]) for v in xs]) / div
        label = f"{hue} = {level}" if hue else None
        ax.plot(xs, mean, marker="o", label=label)
        if any(len(by_x[v]) > 1 for v in xs):
            ax.fill_between(xs, lo, hi, alpha=0.2)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(f"{LABELS.get(y, y)}" + (f" ({unit})" if unit else ""))
    n_rep = max(len(v) for g in groups.values() for v in g.values())
    ax.set_title(f"{d.name}: mean" + (f" and min–max over {n_rep} replicates" if n_rep > 1 else ""), fontsize=10)
    if hue:
        ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    path = Path(out) if out is not None else d / f"{y.replace('.', '_')}_vs_{x.replace('.', '_')}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
