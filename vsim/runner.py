"""Running a scenario into a run directory: the only place (with the CLI) that touches files.

A run directory holds ``config.toml`` (the resolved config, every default filled in: running it
again reproduces the run), ``stats.json`` (simulated results only, byte-identical for the same
config and seed), ``timing.json`` (wall time, peak memory, SimPy events: machine-dependent) and
``events.jsonl`` (the event log at the configured level). Every file is written under a temporary
name and renamed into place, so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsim.config import ScenarioConfig, dump_config
from vsim.events.sink import EventSink
from vsim.events.writer import JsonlWriter
from vsim.jit import compile_clock
from vsim.sched import events_scheduled
from vsim.stats import VCPU_STATS, percentiles
from vsim.vm import Vm

STATS_SCHEMA = 1


@dataclass
class RunResult:
    """What a run produced: its directory, ``stats.json`` and ``timing.json`` contents."""

    out_dir: Path
    stats: dict[str, Any]
    timing: dict[str, Any]


def config_digest(cfg: ScenarioConfig) -> str:
    """A short stable id of a resolved config (names default run directories)."""
    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:10]


def default_out_dir(cfg: ScenarioConfig, name: str) -> Path:
    return Path("runs") / f"{name}-seed{cfg.seed}-{config_digest(cfg)}"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def collect_stats(vm: Vm, sim_time_ns: int) -> dict[str, Any]:
    """``stats.json``: KVM-named VM and per-vCPU stats, latency percentiles and simulated time."""
    vcpus = []
    totals = dict.fromkeys(VCPU_STATS, 0)
    service = []
    for v in vm.vcpus:
        d = v.stat.as_dict()
        for k, x in d.items():
            totals[k] += x
        d["mmu_lock_wait_ns"] = vm.mmu_lock.wait_by_actor.get(v.id, 0)
        vcpus.append({"id": v.id, "finished_ns": v.finished_at, **d})
        service.append(v.stat.fault_service_ns)
    all_service = [x for s in service for x in s]
    lock = vm.mmu_lock
    stats: dict[str, Any] = {
        "schema": STATS_SCHEMA,
        "seed": vm.cfg.seed,
        "sim_time_ns": sim_time_ns,
        "vm": {**vm.stat.as_dict(), "mmu_lock_contended": lock.contended},
        "memslots_generation": vm.memslots.generation,
        "vcpu_total": totals,
        "latency_ns": {
            "fault_service": percentiles(all_service),
            "mmu_lock_wait": {"read": percentiles(lock.waits("read")), "write": percentiles(lock.waits("write"))},
            "srcu_grace_period": percentiles(vm.srcu.grace_ns),
            "memslot_update": percentiles(vm.memslot_update_ns),
            "memslot_update_srcu": percentiles(vm.memslot_srcu_ns),
            "memslot_update_zap": percentiles(vm.memslot_zap_ns),
        },
        "vcpus": vcpus,
    }
    if vm.program is not None:
        stats["selftest"] = vm.program.results()
    if vm.checker is not None:
        stats["invariant_violations"] = [
            {"t_ns": t, "rule": rule, "detail": detail} for t, rule, detail in vm.checker.violations
        ]
    return stats


def run_scenario(cfg: ScenarioConfig, out_dir: Path, wall_timeout_s: float | None = None,
                 on_compile: Callable[[], None] | None = None) -> RunResult:  # fmt: skip
    """Simulate ``cfg`` and write its run directory (``WallClockTimeout`` after ``wall_timeout_s``).
    ``on_compile`` is called once if the run has to compile kernels (a first run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = JsonlWriter(out_dir / "events.jsonl")
    sink = EventSink(cfg.events.level, consumer=writer)
    try:
        with compile_clock(on_compile) as clock:
            t0 = time.perf_counter()
            vm = Vm(cfg, sink)
            end = vm.run(None if wall_timeout_s is None else t0 + wall_timeout_s)
            wall = time.perf_counter() - t0
    except BaseException:
        writer.abort()
        raise
    writer.close()
    stats = collect_stats(vm, end)
    sim_wall = wall - clock.seconds  # the rates leave compilation out
    timing = {
        "wall_s": round(wall, 6),
        "compile_s": round(clock.seconds, 6),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "simpy_events": events_scheduled(vm.env),
        "events_logged": writer.lines,
        "accesses_per_wall_s": round(stats["vcpu_total"]["accesses"] / sim_wall) if sim_wall > 0 else 0,
        "faults_per_wall_s": round(stats["vcpu_total"]["pf_taken"] / sim_wall) if sim_wall > 0 else 0,
    }
    write_atomic(out_dir / "config.toml", dump_config(cfg))
    write_atomic(out_dir / "stats.json", json.dumps(stats, indent=1) + "\n")
    write_atomic(out_dir / "timing.json", json.dumps(timing, indent=1) + "\n")
    return RunResult(out_dir, stats, timing)
