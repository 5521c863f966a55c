"""vsim speed, as ratios to plain SimPy measured in the same process.

    python benchmarks/bench.py [--quick]

Prints, for this machine:

* plain SimPy: ``env.timeout`` events per wall second (16 processes yielding in a loop);
* (a) steady state: simulated guest accesses per wall second on passes of 16 vCPUs in which every
  access hits the TLB or walks successfully (no exits): the VM populates its region, then runs
  again over the populated region and only that second run is timed;
* the same steady state under shadow paging (``mmu.mode = shadow``): each vCPU's guest process
  populates its memory through the guest's #PF handler first;
* (b) populate: faults per wall second on a pass in which every 4K page faults, for 16 vCPUs and
  for 1 vCPU;
* the cost of event logging at the ``faults`` level relative to logging ``off`` on (b);
* (b) on the legacy MMU: faults per wall second for 96 vCPUs populating at once, each fault under
  the write lock (so they queue), and shadow-paging populate at ``configs/shadow_paging.toml``'s
  scale (guest #PFs and shadow faults);
* an 8-point sweep on the local process pool (all cores) against the same sweep run serially;
* a flush storm: 64 vCPUs in steady state while the host MM invalidates one page every few µs, so
  every invalidation zaps an SPTE and flushes remote TLBs with an IPI to each running vCPU. It
  prints the wall time the storm adds per simulated flush (the run against the same run without
  the host MM).

Each figure is also printed as a ratio to the SimPy rate. Targets from the issues: (a) ≥ 20×,
(b) ≥ 0.25× (legacy and shadow populate too), logging ≤ 1.5×, the sweep pool ≤ 0.6× the serial
time on 2 cores. Nothing here is asserted: speed is measured, not tested.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import simpy

from vsim.config import load_config
from vsim.events.sink import EventBatch, EventSink
from vsim.sweeps import SweepSpec
from vsim.sweeps.sweeper import run_sweep
from vsim.vm import Vm

REPO = Path(__file__).resolve().parent.parent


def simpy_timeout_rate(n: int = 400_000, procs: int = 16) -> float:
    def proc(env: simpy.Environment, k: int):  # type: ignore[no-untyped-def]
        for _ in range(k):
            yield env.timeout(1)

    env = simpy.Environment()
    for _ in range(procs):
        env.process(proc(env, n // procs))
    t = time.perf_counter()
    env.run()
    return n / (time.perf_counter() - t)


def timed_run(sets: list[str], level: str = "off", path: str | None = None) -> tuple[float, dict[str, int]]:
    """Wall seconds of ``Vm.run`` and the summed vCPU stats; with ``faults`` logging the records
    are rendered to JSON lines as the run directory writer does (the file write is left out)."""
    cfg = load_config(None if path is None else REPO / path, [*sets, f"events.level={level}"])
    rendered = [0]

    def consume(batch: EventBatch) -> None:
        rendered[0] += len(batch.render())

    vm = Vm(cfg, EventSink(level, consumer=consume))
    t = time.perf_counter()
    vm.run()
    wall = time.perf_counter() - t
    tot: dict[str, int] = {}
    for v in vm.vcpus:
        for k, x in v.stat.as_dict().items():
            tot[k] = tot.get(k, 0) + x
    return wall, tot


def timed_flush_run(sets: list[str]) -> tuple[float, dict[str, int]]:
    """Wall seconds of ``Vm.run`` (logging off), the VM's flush count and the vCPUs' IPI exits."""
    vm = Vm(load_config(None, [*sets, "events.level=off"]))
    t = time.perf_counter()
    vm.run()
    wall = time.perf_counter() - t
    return wall, {"remote_tlb_flush": vm.stat.remote_tlb_flush, "irq_exits": sum(v.stat.irq_exits for v in vm.vcpus)}


def steady_state(sets: list[str], passes: int) -> tuple[float, dict[str, int]]:
    """Populate, then time ``passes`` more passes over the populated region."""
    cfg = load_config(None, [*sets, "events.level=off"])
    vm = Vm(cfg)
    vm.run()
    before = [v.stat.as_dict() for v in vm.vcpus]
    vm.set_workloads(cfg.workload.model_copy(update={"passes": passes}))
    t = time.perf_counter()
    vm.run()
    wall = time.perf_counter() - t
    tot: dict[str, int] = {}
    for v, b in zip(vm.vcpus, before, strict=True):
        for k, x in v.stat.as_dict().items():
            tot[k] = tot.get(k, 0) + x - b[k]
    return wall, tot


def best_of(k: int, fn, *args):  # type: ignore[no-untyped-def]
    runs = [fn(*args) for _ in range(k)]
    return min(runs, key=lambda r: r[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a rough check)")
    args = ap.parse_args()
    mem = "16MiB" if args.quick else "64MiB"
    passes = 4 if args.quick else 8
    reps = 1 if args.quick else 3

    timed_run(["vm.vcpus=1", "workload.per_vcpu_memory=1MiB"])  # compile/load the kernels first
    simpy_rate = max(simpy_timeout_rate() for _ in range(reps))
    print(f"plain SimPy: {simpy_rate:,.0f} timeouts/s ({1e6 / simpy_rate:.2f} µs per event)")

    base = ["vm.vcpus=16", f"workload.per_vcpu_memory={mem}"]
    w, tot = best_of(reps, steady_state, base, passes)
    assert tot["pf_taken"] == 0, "the steady-state passes must not fault"
    rate_a = tot["accesses"] / w
    hits = tot["tlb_hits"] / tot["accesses"]
    print(
        f"(a) steady state, 16 vCPUs x {mem}, {passes} passes, no exits ({hits:.0%} TLB hits, rest walks): "
        f"{rate_a:,.0f} accesses/s = {rate_a / simpy_rate:.1f}x SimPy (target >= 20x)"
    )

    # Shadow paging (EPT off): each vCPU's guest process populates 16 MiB through the guest's #PF
    # handler, then runs passes over it; TLB misses walk the shadow page tables in the batch kernel.
    smem = "4MiB" if args.quick else "16MiB"
    shadow = ["vm.vcpus=16", "mmu.mode=shadow", f"guest.process_memory={smem}", "workload.per_vcpu_memory=24MiB"]
    w, tot = best_of(reps, steady_state, shadow, passes)
    assert tot["pf_taken"] == 0, "the steady-state passes must not fault"
    rate_s = tot["accesses"] / w
    print(
        f"(a) shadow paging steady state, 16 vCPUs x a {smem} guest process, {passes} passes: "
        f"{rate_s:,.0f} accesses/s = {rate_s / simpy_rate:.1f}x SimPy (issue 3: reported, no target)"
    )

    for nv, m in ((16, mem), (1, "256MiB" if not args.quick else "64MiB")):
        sets = [f"vm.vcpus={nv}", f"workload.per_vcpu_memory={m}"]
        w, tot = best_of(reps, timed_run, sets)
        rate_b = tot["pf_taken"] / w
        print(
            f"(b) populate, {nv} vCPU(s) x {m}, every 4K page faults: {rate_b:,.0f} faults/s "
            f"= {rate_b / simpy_rate:.2f}x SimPy (target >= 0.25x)"
        )
        if nv == 16:
            wf, _ = best_of(reps, timed_run, sets, "faults")
            print(f"    event logging at 'faults' costs {wf / w:.2f}x a run with logging off (target <= 1.5x)")

    # The legacy MMU: every fault takes mmu_lock for write, so 96 vCPUs queue behind one another.
    lmem = "4MiB" if args.quick else "16MiB"
    legacy = ["mmu.mode=legacy_tdp", "vm.vcpus=96", f"workload.per_vcpu_memory={lmem}"]
    w, tot = best_of(reps, timed_run, legacy)
    rate_l = tot["pf_taken"] / w
    print(
        f"(b) legacy MMU populate, 96 vCPUs x {lmem}, every 4K page faults under the write lock: "
        f"{rate_l:,.0f} faults/s = {rate_l / simpy_rate:.2f}x SimPy (target >= 0.25x)"
    )
    # Shadow paging populate at configs/shadow_paging.toml's scale: guest #PFs and shadow faults.
    w, tot = best_of(reps, timed_run, [], "off", "configs/shadow_paging.toml")
    rate_sp = tot["pf_taken"] / w
    print(
        f"(b) shadow paging populate, configs/shadow_paging.toml: {rate_sp:,.0f} faults/s "
        f"= {rate_sp / simpy_rate:.2f}x SimPy (target >= 0.25x)"
    )

    storm = ["vm.vcpus=64", "workload.per_vcpu_memory=2MiB", "workload.passes=100"]
    calm, _ = best_of(reps, timed_run, storm)
    hm = [f"host_mm.invalidations={100 if args.quick else 300}", "host_mm.start=2ms", "host_mm.interval=10us",
          "host_mm.pages=1", "host_mm.pattern=random"]  # fmt: skip
    w, vm_stat = best_of(reps, timed_flush_run, [*storm, *hm])
    flushes, ipis = vm_stat["remote_tlb_flush"], vm_stat["irq_exits"]
    print(
        f"flush storm, 64 vCPUs, one 4K invalidation per 10 µs: {flushes:,} remote flushes with IPIs "
        f"({ipis:,} IPI exits) add {(w - calm) / flushes * 1e6:,.0f} µs of wall time per flush "
        f"({w:.2f} s vs {calm:.2f} s without the host MM)"
    )

    # Points of about a second serially: with shorter ones the pool measures its workers' start-up.
    serial, pool = sweep_ratio("32MiB" if args.quick else "256MiB")
    print(
        f"sweep of 8 points: serial {serial:.2f} s, local pool of {os.cpu_count()} {pool:.2f} s "
        f"= {pool / serial:.2f}x serial (target <= 0.6x)"
    )


def sweep_ratio(mem: str) -> tuple[float, float]:
    """Wall seconds of an 8-point sweep run serially and on the local pool (fresh directories)."""
    spec = SweepSpec(grid={"vm.vcpus": [2, 4], "vm.backing_page_size": ["4K", "2M"]}, replicates=2)
    sets = [f"workload.per_vcpu_memory={mem}", "events.level=faults"]
    walls = []
    for jobs in (1, os.cpu_count() or 1):
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            rows, _ = run_sweep(None, sets, spec, Path(d) / "s", jobs, None, False)
            walls.append(time.perf_counter() - t)
            assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    return walls[0], walls[1]


if __name__ == "__main__":
    main()
