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
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vsim.config import ScenarioConfig, dump_config
from vsim.events.sink import EventSink
from vsim.events.writer import JsonlWriter
from vsim.jit import compile_clock
from vsim.resources import estimate
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
    all_service = np.concatenate([np.asarray(s, dtype=np.int64) for s in service])  # (8 B per sample, not 36)
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
            "mmu_lock_wait": {
                "read": percentiles(lock.wait_samples("read")),
                "write": percentiles(lock.wait_samples("write")),
            },  # fmt: skip
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


def _scratch(out_dir: Path, what: str) -> Path:
    """A hidden sibling of ``out_dir`` for this process (``.NAME.PID.tmp`` or ``.old``)."""
    return out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{what}")


def _clean_scratch(out_dir: Path) -> None:
    """Remove what killed runs into ``out_dir`` left beside it (their unfinished directories)."""
    for d in out_dir.parent.glob(f".{out_dir.name}.*"):
        if d.is_dir() and d.suffix in (".tmp", ".old"):
            shutil.rmtree(d, ignore_errors=True)


def _commit(scratch: Path, out_dir: Path) -> None:
    """Put the finished run in place as a whole: rename it there, the old run (if any) aside first
    and then away. No reader ever sees a mixture of two runs, and a run killed before this point
    leaves the old one as it was."""
    if out_dir.exists():
        old = _scratch(out_dir, "old")
        os.rename(out_dir, old)
        os.rename(scratch, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(scratch, out_dir)


def run_scenario(cfg: ScenarioConfig, out_dir: Path, wall_timeout_s: float | None = None,
                 on_compile: Callable[[], None] | None = None, progress: Callable[[int, int], None] | None = None,
                 max_wall_s: float | None = None) -> RunResult:  # fmt: skip
    """Simulate ``cfg`` and write its run directory (``WallClockTimeout`` after ``wall_timeout_s``).
    ``on_compile`` is called once if the run has to compile kernels (a first run); ``progress``
    with the simulated time and the accesses so far while it runs (``Vm.run``). After
    ``max_wall_s`` wall seconds the run stops where it is and its directory says it is partial
    (``status``: ``complete``, or ``partial: why``).

    The run is written into a hidden sibling directory and renamed into place when complete
    (``_commit``): a directory already at ``out_dir`` is replaced whole."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_scratch(out_dir)
    scratch = _scratch(out_dir, "tmp")
    scratch.mkdir()
    try:
        return _run_into(cfg, out_dir, scratch, wall_timeout_s, on_compile, progress, max_wall_s)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # (gone already once committed)


def _run_into(cfg: ScenarioConfig, out_dir: Path, scratch: Path, wall_timeout_s: float | None,
              on_compile: Callable[[], None] | None, progress: Callable[[int, int], None] | None,
              max_wall_s: float | None) -> RunResult:  # fmt: skip
    writer = JsonlWriter(scratch / "events.jsonl")
    sink = EventSink(cfg.events.level, consumer=writer)
    try:
        with compile_clock(on_compile) as clock:
            t0 = time.perf_counter()
            vm = Vm(cfg, sink)
            limit = min(x for x in (wall_timeout_s, max_wall_s, float("inf")) if x is not None)
            deadline = None if limit == float("inf") else t0 + limit
            end = vm.run(deadline, progress, stop_at_deadline=max_wall_s is not None and limit == max_wall_s)
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
        "estimated_peak_bytes": estimate(cfg).memory,  # what vsim.resources predicted before the run
        "simpy_events": events_scheduled(vm.env),
        "events_logged": writer.lines,
        "accesses_per_wall_s": round(stats["vcpu_total"]["accesses"] / sim_wall) if sim_wall > 0 else 0,
        "faults_per_wall_s": round(stats["vcpu_total"]["pf_taken"] / sim_wall) if sim_wall > 0 else 0,
    }
    status = f"partial: --max-wall {max_wall_s:g}s reached at simulated time {end} ns" if vm.partial else "complete"
    if vm.partial:  # (a complete run's stats.json is the same bytes on any machine)
        stats["partial"] = status
    (scratch / "status").write_text(status + "\n", encoding="utf-8")
    (scratch / "config.toml").write_text(dump_config(cfg), encoding="utf-8")
    (scratch / "stats.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    (scratch / "timing.json").write_text(json.dumps(timing, indent=1) + "\n", encoding="utf-8")
    _commit(scratch, out_dir)
    return RunResult(out_dir, stats, timing)
