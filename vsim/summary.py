"""The terminal summary of a run (a ``kvm_stat``-like table), rendered with rich."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _us(ns: int) -> str:
    return f"{ns / 1000:,.2f} µs"


def summary_table(stats: dict[str, Any], timing: dict[str, Any], title: str) -> Table:
    tot = stats["vcpu_total"]
    vm = stats["vm"]
    lat = stats["latency_ns"]
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("stat")
    t.add_column("value", justify="right")
    rows = [
        ("simulated time", f"{stats['sim_time_ns'] / 1e6:,.3f} ms"),
        ("vCPUs", str(len(stats["vcpus"]))),
        ("guest accesses", f"{tot['accesses']:,}"),
        ("TLB hits / hardware walks", f"{tot['tlb_hits']:,} / {tot['hw_walks']:,}"),
        ("exits (io_exits)", f"{tot['exits']:,} ({tot['io_exits']:,})"),
        ("pf_taken", f"{tot['pf_taken']:,}"),
        ("pf_fixed / pf_spurious / pf_retry", f"{tot['pf_fixed']:,} / {tot['pf_spurious']:,} / {tot['pf_retry']:,}"),
        ("pf_fast / pf_emulate", f"{tot['pf_fast']:,} / {tot['pf_emulate']:,}"),
        ("pages_4k / 2m / 1g", f"{vm['pages_4k']:,} / {vm['pages_2m']:,} / {vm['pages_1g']:,}"),
        ("fault service p50 / p99 / max", " / ".join(_us(lat["fault_service"][k]) for k in ("p50", "p99", "max"))),
        *(
            (f"mmu_lock {mode} wait p99 / max", f"{_us(w['p99'])} / {_us(w['max'])}")
            for mode, w in lat["mmu_lock_wait"].items()
            if w["count"]
        ),
        (
            "wall time",
            f"{timing['wall_s']:.2f} s"
            + (f" ({timing['compile_s']:.2f} s compiling)" if timing.get("compile_s", 0) >= 0.01 else ""),
        ),
        ("accesses / faults per wall s", f"{timing['accesses_per_wall_s']:,} / {timing['faults_per_wall_s']:,}"),
    ]
    if vm["remote_tlb_flush_requests"]:
        rows.append(
            ("remote_tlb_flush (requests)", f"{vm['remote_tlb_flush']:,} ({vm['remote_tlb_flush_requests']:,})")
        )
        rows.append(("tlb_flush", f"{tot['tlb_flush']:,}"))
    for name, ns in stats.get("selftest", {}).get("phases_ns", []):
        rows.append((name, f"{ns / 1e9:.9f} s"))
    if "invariant_violations" in stats:
        rows.append(("invariant violations", str(len(stats["invariant_violations"]))))
    for k, v in rows:
        t.add_row(escape(k), escape(v))
    return t


def print_summary(stats: dict[str, Any], timing: dict[str, Any], title: str) -> None:
    Console().print(summary_table(stats, timing, title))
