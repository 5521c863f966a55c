"""``vsim report RUN_DIR``: one self-contained HTML page about a run.

The page leads with the headline numbers, then figures (matplotlib PNGs embedded as data URIs:
no network assets), the KVM stats table, any invariant violations and the resolved config. The
figures come from the event log, read once, streaming; a figure whose events the run did not log
(``events.level`` too low) says which level would show it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from array import array
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from vsim.events.reader import EventLogError, iter_events
from vsim.events.spans import pair_spans

OUTCOME_COLOURS = {"FIXED": "#2b8a3e", "SPURIOUS": "#e8a317", "RETRY": "#c92a2a", "EMULATE": "#5f3dc4"}


class _Collected:
    """What the figures need, gathered in one pass over the log."""

    def __init__(self) -> None:
        self.fault_ns = array("q")
        self.fault_end = array("q")
        self.fault_ret: list[str] = []
        self.lock_t = array("q")
        self.lock_wait = array("q")
        self.exit_t = array("q")
        self.exit_reason: list[str] = []
        self.last_t = 0

    def events(self, run_dir: Path, warn: list[str]):  # type: ignore[no-untyped-def]
        for ev in iter_events(run_dir, warn=warn.append):
            self.last_t = ev["t_ns"]
            kind = ev["event"]
            if kind == "vsim_mmu_lock_acquire":
                self.lock_t.append(ev["t_ns"])
                self.lock_wait.append(ev["wait_ns"])
            elif kind == "kvm_exit":
                self.exit_t.append(ev["t_ns"])
                self.exit_reason.append(ev["reason"])
            yield ev


def build_report(run_dir: str | Path) -> str:
    """The report's HTML text."""
    d = Path(run_dir)
    try:
        stats = json.loads((d / "stats.json").read_text())
        timing = json.loads((d / "timing.json").read_text())
        config = (d / "config.toml").read_text()
    except FileNotFoundError as e:
        raise EventLogError(f"{d}: no {Path(e.filename).name} (not a vsim run directory?)") from None
    warnings: list[str] = []
    c = _Collected()
    for span in pair_spans(c.events(d, warnings)):
        if span.name == "page fault":
            c.fault_ns.append(span.duration)
            c.fault_end.append(span.end)
            c.fault_ret.append(span.detail.rsplit(" ", 1)[-1])
    figures = [
        ("Page-fault handling time", _fault_histogram(c)),
        ("Page faults over time, by outcome", _faults_over_time(c)),
        ("mmu_lock wait over time", _lock_waits(c)),
        ("VM exits over time, by reason", _exits_over_time(c)),
    ]
    return _page(d, stats, timing, config, figures, warnings)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fault_histogram(c: _Collected) -> str | None:
    if not c.fault_ns:
        return None
    us = np.asarray(c.fault_ns) / 1000
    fig, ax = plt.subplots(figsize=(7, 3.2))
    lo, hi = max(us.min(), 1e-3), max(us.max(), 1e-3) * 1.01
    bins = np.geomspace(lo, hi, 60) if hi / lo > 20 else 60
    ax.hist(us, bins=bins if isinstance(bins, int) else bins.tolist(), color="#1c7ed6")
    if not isinstance(bins, int):
        ax.set_xscale("log")
    ax.set_xlabel("kvm_page_fault → return (µs)")
    ax.set_ylabel("faults")
    for q, style in ((50, "--"), (99, ":")):
        v = float(np.percentile(us, q, method="inverted_cdf"))
        ax.axvline(v, color="k", linestyle=style, linewidth=1, label=f"p{q} = {v:.2f} µs")
    ax.legend(frameon=False)
    return _png(fig)


def _time_bins(last_t: int) -> np.ndarray:
    return np.linspace(0, max(last_t, 1) / 1e6, 80)


def _stacked_over_time(times_ns: array, labels: list[str], order: list[str], last_t: int, ylabel: str,
                       colours: dict[str, str] | None = None) -> str | None:  # fmt: skip
    """A stacked histogram over simulated time of events, one colour per label."""
    if not times_ns:
        return None
    t = np.asarray(times_ns) / 1e6
    lab = np.asarray(labels)
    present = [x for x in order if (lab == x).any()]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.hist([t[lab == x] for x in present], bins=_time_bins(last_t).tolist(), stacked=True, label=present,
            color=[colours[x] for x in present] if colours else None)  # fmt: skip
    ax.set_xlabel("simulated time (ms)")
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False)
    return _png(fig)


def _faults_over_time(c: _Collected) -> str | None:
    return _stacked_over_time(c.fault_end, c.fault_ret, list(OUTCOME_COLOURS), c.last_t, "faults per bin",
                              OUTCOME_COLOURS)  # fmt: skip


def _lock_waits(c: _Collected) -> str | None:
    if not c.lock_t:
        return None
    t = np.asarray(c.lock_t) / 1e6
    w = np.asarray(c.lock_wait) / 1000
    bins = _time_bins(c.last_t)
    idx = np.clip(np.digitize(t, bins) - 1, 0, len(bins) - 2)
    mean = np.bincount(idx, weights=w, minlength=len(bins) - 1) / np.maximum(
        np.bincount(idx, minlength=len(bins) - 1), 1
    )
    peak = np.zeros(len(bins) - 1)
    np.maximum.at(peak, idx, w)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(bins[:-1], peak, color="#c92a2a", label="max wait")
    ax.plot(bins[:-1], mean, color="#1c7ed6", label="mean wait")
    ax.set_xlabel("simulated time (ms)")
    ax.set_ylabel("wait for mmu_lock (µs)")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False)
    return _png(fig)


def _exits_over_time(c: _Collected) -> str | None:
    return _stacked_over_time(c.exit_t, c.exit_reason, sorted(set(c.exit_reason)), c.last_t, "exits per bin")


MISSING = {
    "Page-fault handling time": "faults",
    "Page faults over time, by outcome": "faults",
    "mmu_lock wait over time": "all",
    "VM exits over time, by reason": "all",
}

CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#212529;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} .sub{color:#666;margin-top:0}
.cards{display:flex;gap:1em;flex-wrap:wrap;margin:1.2em 0}
.card{background:#f1f3f5;border-radius:8px;padding:.7em 1.1em;min-width:150px}
.card b{display:block;font-size:1.5em}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:1.2em}
figure{margin:0;background:#fff;border:1px solid #dee2e6;border-radius:8px;padding:.6em}
figcaption{font-weight:600;margin-bottom:.3em} img{max-width:100%}
.note{color:#868e96;font-style:italic;padding:2em 0;text-align:center}
table{border-collapse:collapse;font-size:.9em} td,th{padding:.2em .8em;border-bottom:1px solid #e9ecef;text-align:right}
td:first-child,th:first-child{text-align:left} .ok{color:#2b8a3e} .bad{color:#c92a2a}
pre{background:#f8f9fa;padding:1em;border-radius:6px;overflow:auto}
"""


def _page(d: Path, stats: dict[str, Any], timing: dict[str, Any], config: str,
          figures: list[tuple[str, str | None]], warnings: list[str]) -> str:  # fmt: skip
    tot, vm, svc = stats["vcpu_total"], stats["vm"], stats["latency_ns"]["fault_service"]
    cards = [
        ("simulated time", f"{stats['sim_time_ns'] / 1e6:,.3f} ms"),
        ("vCPUs", str(len(stats["vcpus"]))),
        ("page faults", f"{tot['pf_taken']:,}"),
        ("fixed / spurious / retry", f"{tot['pf_fixed']:,} / {tot['pf_spurious']:,} / {tot['pf_retry']:,}"),
        (
            "fault service p50 / p99",
            f"{svc['p50'] / 1e3:.2f} / {svc['p99'] / 1e3:.2f} µs",
        ),
        ("pages 4K / 2M / 1G", f"{vm['pages_4k']:,} / {vm['pages_2m']:,} / {vm['pages_1g']:,}"),
    ]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>vsim report: {html.escape(d.name)}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>vsim run {html.escape(d.name)}</h1>",
             f"<p class='sub'>seed {stats['seed']} · wall {timing['wall_s']:.2f} s · "
             f"{timing['simpy_events']:,} SimPy events</p>",
             "<div class='cards'>"]  # fmt: skip
    parts += [f"<div class='card'>{html.escape(k)}<b>{html.escape(v)}</b></div>" for k, v in cards]
    parts.append("</div>")
    for w in warnings:
        parts.append(f"<p class='bad'>{html.escape(w)}</p>")
    parts.append("<div class='grid'>")
    for title, src in figures:
        body = (f"<img alt='{html.escape(title)}' src='{src}'>" if src else
                f"<div class='note'>not in this log: run with events.level = \"{MISSING[title]}\"</div>")  # fmt: skip
        parts.append(f"<figure><figcaption>{html.escape(title)}</figcaption>{body}</figure>")
    parts.append("</div>")
    viol = stats.get("invariant_violations")
    if viol is None:
        parts.append("<h2>Invariants</h2><p>The checker was off for this run (sim.invariants = false).</p>")
    elif not viol:
        parts.append("<h2>Invariants</h2><p class='ok'>The checker ran and found no violation.</p>")
    else:
        parts.append(f"<h2>Invariants</h2><p class='bad'>{len(viol)} violation(s)</p><table>"
                     "<tr><th>t (ns)</th><th>rule</th><th>detail</th></tr>")  # fmt: skip
        parts += [f"<tr><td>{x['t_ns']}</td><td>{html.escape(x['rule'])}</td><td>{html.escape(x['detail'])}</td></tr>"
                  for x in viol[:200]]  # fmt: skip
        parts.append("</table>")
    parts.append("<h2>KVM statistics</h2><div class='grid'><table><tr><th>vCPU stat (total)</th><th>value</th></tr>")
    parts += [f"<tr><td>{k}</td><td>{v:,}</td></tr>" for k, v in tot.items()]
    parts.append("</table><table><tr><th>VM stat</th><th>value</th></tr>")
    parts += [f"<tr><td>{k}</td><td>{v:,}</td></tr>" for k, v in vm.items()]
    parts.append("</table></div>")
    parts.append(f"<h2>Resolved config</h2><pre>{html.escape(config)}</pre></body></html>")
    return "\n".join(parts)
