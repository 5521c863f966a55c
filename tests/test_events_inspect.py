"""vsim events summary / filter / latency / timeline and vsim report, checked against stats.json."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vsim.config import load_config
from vsim.events.latency import collect, percentile_row
from vsim.events.reader import Selection, iter_events
from vsim.events.summary import summarize
from vsim.report import build_report
from vsim.runner import run_scenario

# Overlapping vCPUs race (spurious and retried faults) and a second pass adds exits without faults.
SETS = ["vm.vcpus=3", "workload.per_vcpu_memory=128KiB", "workload.overlap=true", "workload.passes=2",
        "sim.invariants=true"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for level in ("all", "faults"):
        out[level] = base / level
        run_scenario(load_config(None, [*SETS, f"events.level={level}"]), out[level])
    return out


def _stats(run: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((run / "stats.json").read_text())


def vsim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsim", *args], capture_output=True, text=True)


def test_summary_counts_equal_stats(runs: dict[str, Path]) -> None:
    run = runs["all"]
    stats = _stats(run)
    s = summarize(iter_events(run))
    tot = stats["vcpu_total"]
    assert s.kinds["kvm_page_fault"] == tot["pf_taken"]
    assert s.faults_by_outcome["FIXED"] == tot["pf_fixed"] and s.faults_by_outcome["SPURIOUS"] == tot["pf_spurious"]
    assert s.faults_by_outcome["RETRY"] == tot["pf_retry"] and tot["pf_spurious"] + tot["pf_retry"] > 0
    assert sum(s.exits_by_reason.values()) == tot["exits"]
    assert s.exits_by_reason["IO_INSTRUCTION"] == tot["io_exits"]
    for v in stats["vcpus"]:
        assert s.per_vcpu[v["id"]]["kvm_exit"] == v["exits"]
        assert s.per_vcpu[v["id"]]["fault FIXED"] == v["pf_fixed"]
    p = vsim("events", str(run), "summary")
    assert p.returncode == 0 and "EPT_VIOLATION" in p.stdout and f"{tot['pf_fixed']:,}" in p.stdout


def test_summary_window_counts_only_the_window(runs: dict[str, Path]) -> None:
    run = runs["all"]
    every = list(iter_events(run))
    lo, hi = every[len(every) // 3]["t_ns"], every[2 * len(every) // 3]["t_ns"]
    s = summarize(iter_events(run, Selection(lo, hi)))
    assert s.kinds == Counter(e["event"] for e in every if lo <= e["t_ns"] < hi)


def test_filter_is_exact(runs: dict[str, Path]) -> None:
    run = runs["all"]
    raw = (run / "events.jsonl").read_text().splitlines(keepends=True)[1:]
    recs = [json.loads(x) for x in raw]
    gfn0 = recs[0]["gpa"] >> 12 if "gpa" in recs[0] else 0x100000
    cases = [
        (["--vcpu", "1", "--kind", "kvm_page_fault"],
         lambda r: r["vcpu"] == 1 and r["event"] == "kvm_page_fault"),
        (["--gfn", f"{gfn0:#x}-{gfn0 + 3:#x}"],
         lambda r: gfn0 <= r.get("gfn", r.get("gpa", -1 << 20) >> 12) < gfn0 + 3),
        (["--gpa", f"{gfn0 << 12:#x}", "--kind", "kvm_exit", "--kind", "kvm_page_fault"],
         lambda r: r["event"] in ("kvm_exit", "kvm_page_fault") and r.get("gpa", -1) >> 12 == gfn0),
        (["--from", "20us", "--to", "40us"], lambda r: 20_000 <= r["t_ns"] < 40_000),
    ]  # fmt: skip
    for args, keep in cases:
        p = vsim("events", str(run), "filter", *args)
        assert p.returncode == 0, p.stderr
        expect = "".join(line for line, r in zip(raw, recs, strict=True) if keep(r))
        assert expect and p.stdout == expect, args
    table = vsim("events", str(run), "filter", "--vcpu", "2", "--kind", "kvm_exit", "--table")
    assert table.returncode == 0 and all(" 2 kvm_exit " in x for x in table.stdout.splitlines())


def test_latency_percentiles_match_numpy_and_stats(runs: dict[str, Path]) -> None:
    run = runs["all"]
    stats = _stats(run)
    samples = collect(iter_events(run))
    svc = samples["exit EPT_VIOLATION"]  # exit -> entry = stats.json's fault service time
    row = percentile_row(svc)
    for q in (50, 90, 99, 99.9):
        assert row[f"p{q:g}"] == int(np.percentile(np.asarray(svc), q, method="inverted_cdf"))
    for k in ("count", "p50", "p90", "p99", "max"):
        assert row[k] == stats["latency_ns"]["fault_service"][k]
    wait = percentile_row(samples["mmu_lock wait (read)"])
    for k in ("count", "p50", "p90", "p99", "max"):
        assert wait[k] == stats["latency_ns"]["mmu_lock_wait"]["read"][k]
    by_vcpu = collect(iter_events(run), by_vcpu=True)
    assert sum(len(by_vcpu[f"page fault [vcpu {v}]"]) for v in range(3)) == len(samples["page fault"])
    p = vsim("events", str(run), "latency")
    assert p.returncode == 0 and "page fault" in p.stdout and "#" in p.stdout
    # The per-vCPU rows keep their labels (Rich would take "[vcpu 1]" for markup and drop it).
    p = vsim("events", str(run), "latency", "--by-vcpu")
    assert p.returncode == 0 and all(f"page fault [vcpu {v}]" in p.stdout for v in range(3))


def _check_balanced(trace: dict) -> int:  # type: ignore[type-arg]
    stacks: dict[tuple[int, int], list[str]] = {}
    last: dict[tuple[int, int], float] = {}
    n = 0
    for e in trace["traceEvents"]:
        assert e["ph"] in ("B", "E", "i", "M")
        if e["ph"] not in ("B", "E"):
            continue
        key = (e["pid"], e["tid"])
        assert e["ts"] >= last.get(key, 0.0)
        last[key] = e["ts"]
        st = stacks.setdefault(key, [])
        if e["ph"] == "B":
            st.append(e["name"])
            n += 1
        else:
            assert st and st.pop() == e["name"], (key, e)
    assert all(not st for st in stacks.values())
    return n


def test_timeline_is_balanced_trace_json(runs: dict[str, Path], tmp_path: Path) -> None:
    for level, args in (("all", []), ("all", ["--from", "10us", "--to", "30us"]), ("faults", [])):
        out = tmp_path / f"{level}{len(args)}.json"
        p = vsim("events", str(runs[level]), "timeline", "-o", str(out), *args)
        assert p.returncode == 0, p.stderr
        trace = json.loads(out.read_text())
        spans = _check_balanced(trace)
        names = {e["name"] for e in trace["traceEvents"] if e["ph"] == "B"}
        assert spans > 0 and "page fault" in names
        if level == "all" and not args:
            assert {"in guest", "exit EPT_VIOLATION", "mmu_lock held (read)"} <= names
        if args:
            assert all(10.0 <= e["ts"] <= 30.0 for e in trace["traceEvents"] if e["ph"] in ("B", "E"))


def test_report_renders(runs: dict[str, Path]) -> None:
    page = build_report(runs["all"])
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") == 4
    assert "found no violation" in page and "pf_fixed" in page and "[workload]" in page
    assert "http://" not in page and "https://" not in page  # self-contained
    faults_only = build_report(runs["faults"])
    assert faults_only.count("data:image/png;base64,") == 2
    assert faults_only.count('run with events.level = "all"') == 2
    p = vsim("report", str(runs["faults"]))
    assert p.returncode == 0 and (runs["faults"] / "report.html").read_text() == faults_only


def test_vmm_spans_in_latency_and_timeline(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_scenario(load_config(None, [*SETS, "events.level=all", "vm.memslots=2",
                                    'vmm.ops=[{at="30us", op="delete", slot=1}, {at="60us", op="create", slot=1}]']),
                 out)  # fmt: skip
    stats = _stats(out)
    samples = collect(iter_events(out))
    assert samples["SRCU grace period"] == [stats["latency_ns"]["srcu_grace_period"]["max"]] * 3
    assert len(samples["memslot update (KVM_MR_DELETE)"]) == len(samples["memslot update (KVM_MR_CREATE)"]) == 1
    assert percentile_row(samples["memslot update (KVM_MR_DELETE)"] + samples["memslot update (KVM_MR_CREATE)"])[
        "max"] == stats["latency_ns"]["memslot_update"]["max"]  # fmt: skip
    trace_path = tmp_path / "t.json"
    assert vsim("events", str(out), "timeline", "-o", str(trace_path)).returncode == 0
    trace = json.loads(trace_path.read_text())
    _check_balanced(trace)
    vmm = {e["name"] for e in trace["traceEvents"] if e["ph"] == "B" and e["pid"] == 0 and e["tid"] == -1}
    # The fast zap's write lock waited for vCPUs inside faults: that wait is on the VMM's track too.
    assert vmm == {"memslot update (KVM_MR_DELETE)", "memslot update (KVM_MR_CREATE)", "SRCU grace period",
                   "mmu_lock wait (write)"}  # fmt: skip
    held = {e["name"] for e in trace["traceEvents"] if e["ph"] == "B" and e["pid"] == 2 and e["tid"] == -1}
    assert held == {"mmu_lock held (write)", "mmu_lock held (read)"}  # fast zap: write, then read for the zap


def test_flush_and_invalidation_latencies(tmp_path: Path) -> None:
    """``vsim events latency`` reports remote-flush round trips and MMU-notifier invalidations."""
    cfg = load_config(None, ["vm.vcpus=2", "workload.per_vcpu_memory=1MiB", "workload.passes=20",
                             "host_mm.invalidations=20", "host_mm.interval=50us", "host_mm.pages=64"])  # fmt: skip
    run_scenario(cfg, tmp_path / "r")
    samples = collect(iter_events(tmp_path / "r", Selection()))
    assert len(samples["mmu-notifier invalidation"]) == 20
    assert min(samples["mmu-notifier invalidation"]) >= cfg.host_mm.work
    assert samples["remote TLB flush round trip"]
