"""What a run will need before it starts: peak memory, the event log's size, and a lower bound on
its wall time, against what this machine has (application layer).

The memory model is linear in what a config sizes: a fixed base (the interpreter, numpy, numba and
a first run's compilation), bytes per 4K page of guest memory for the chosen MMU (the host page
arrays, the page tables, rmaps and shadow pages, the per-fault samples), bytes per vCPU (its TLB
arrays, its chunks of accesses, its Python objects), and the invariant checker's arrays. Its
constants were measured with ``ru_maxrss`` on this project's 2-core machine (``docs/model.md``
lists the points). The estimate is meant to refuse a run that cannot fit, not to predict its RSS.

The event log holds about two records per fault at ``faults`` and about eight at ``all``. The wall
time bound assumes vsim's fastest rates (every access a TLB hit or a walk in compiled code, every
fault taken in the vCPU group), so a run refused for time would take at least that long.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vsim.config.schema import ScenarioConfig
from vsim.guest.kernel import process_pages
from vsim.guest.paging import REGISTERS, shadow_mmu_init_context

MiB = 1 << 20
GiB = 1 << 30
BASE_BYTES = 330 * MiB  # python, numpy, numba, simpy (180 MiB) and a first run's compilation (150 MiB)
PAGE_BYTES = {"tdp_mmu": 40, "legacy_tdp": 60, "shadow": 40}  # per 4K page of guest memory
SHADOW_PROCESS_PAGE_BYTES = 500  # per page a shadow-paged guest process touches (shadow pages, guest tables)
CHECKER_PAGE_BYTES = 12  # the invariant checker's per-page arrays
FAULT_SAMPLE_BYTES = 8  # fault_service_ns: one int64 per fault after the first touch of a page
VCPU_BYTES = 96 << 10  # a vCPU's Python objects, workload and stats
TLB_ENTRY_BYTES = 9  # a tag (int64) and a write state (int8)
CHUNK_ACCESS_BYTES = 2 * 9  # a chunk's gfns and writes, in the workload and in the group's rows
EVENT_BYTES_PER_FAULT = {"off": 0, "faults": 215, "all": 900}  # measured on the quickstart and shadow_paging
FASTEST_ACCESSES_PER_S = 20_000_000  # above any rate benchmarks/bench.py has measured (about 9 million)
FASTEST_FAULTS_PER_S = 1_000_000  # likewise (TDP MMU populate in the group: about 400,000)
MAX_WALL_S = 24 * 3600  # a run bound to take longer is refused
EVENTS_WARN_BYTES = 4 * GiB


@dataclass(frozen=True)
class Estimate:
    """What a config needs: peak bytes of memory (and its largest term, named by the keys that
    size it), bytes of events, guest accesses and faults."""

    memory: int
    biggest: str  # the largest term of ``memory``, in words
    events: int
    accesses: int
    faults: int

    @property
    def wall_lower_bound(self) -> float:
        """Seconds the run takes at least, at vsim's fastest rates."""
        return self.accesses / FASTEST_ACCESSES_PER_S + self.faults / FASTEST_FAULTS_PER_S


def estimate(cfg: ScenarioConfig) -> Estimate:
    """The resources ``cfg`` needs (see the module's docstring)."""
    nv = cfg.vm.vcpus
    wl = cfg.workload
    guest_bytes = nv * wl.per_vcpu_memory
    pages = guest_bytes // 4096
    shadow = cfg.mmu.mode == "shadow"
    touched = pages  # pages that fault in (the workload's region)
    per_vcpu_pages = wl.per_vcpu_memory // 4096
    if shadow and cfg.guest.paging != "nonpaging":
        per_vcpu_pages = process_pages(cfg, shadow_mmu_init_context(*REGISTERS[cfg.guest.paging]))
        touched = nv * cfg.guest.processes * per_vcpu_pages
    region = per_vcpu_pages * (nv if wl.overlap else 1)  # the pages one vCPU's pass covers
    accesses = nv * wl.passes * region if wl.kind == "memstress" else nv * wl.accesses
    longest = region if wl.kind == "memstress" else wl.accesses  # (chunks never cross a pass boundary)
    huge = cfg.vm.backing_page_size != "4K" and not shadow
    faults = touched // 512 if huge else touched
    if shadow:
        faults *= 2  # the guest's own #PF and the shadow fault, for most pages
    if cfg.selftest.name == "dirty_log_perf":
        faults += cfg.selftest.iterations * pages  # a write-protection fault per page and iteration
    terms = {
        f"{size_text(guest_bytes)} guest (vm.vcpus × workload.per_vcpu_memory: {pages:,} 4K pages, "
        f"{PAGE_BYTES[cfg.mmu.mode]} B each under mmu.mode = {cfg.mmu.mode})": pages * PAGE_BYTES[cfg.mmu.mode],
        f"shadow pages and guest tables of {touched:,} guest process pages": (
            touched * SHADOW_PROCESS_PAGE_BYTES if shadow else 0
        ),
        f"the invariant checker's arrays over {pages:,} pages": pages * CHECKER_PAGE_BYTES if cfg.sim.invariants else 0,
        "per-fault samples": max(0, faults - touched) * FAULT_SAMPLE_BYTES,
        f"{nv:,} vCPUs × {size_text(_vcpu_bytes(cfg, longest))} (TLB arrays from tlb.entries_*, chunks from "
        "sim.batch_accesses)": nv * _vcpu_bytes(cfg, longest),
    }
    biggest = max(terms, key=lambda k: terms[k])
    return Estimate(
        memory=BASE_BYTES + sum(terms.values()),
        biggest=biggest,
        events=faults * EVENT_BYTES_PER_FAULT[cfg.events.level],
        accesses=accesses,
        faults=faults,
    )


def _vcpu_bytes(cfg: ScenarioConfig, chunk: int) -> int:
    """A vCPU's bytes; ``chunk`` is its longest run of accesses (chunks are at most that long)."""
    t = cfg.tlb
    return (
        VCPU_BYTES
        + (t.entries_4k + t.entries_2m + t.entries_1g) * TLB_ENTRY_BYTES
        + min(cfg.sim.batch_accesses, chunk) * CHUNK_ACCESS_BYTES
    )


def available_memory() -> int | None:
    """Bytes of memory this process may still use: ``MemAvailable``, capped by the cgroup's
    ``memory.max`` (a container's limit); None where neither can be read."""
    avail = None
    # (not Linux: the sysconf fallback below)
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    with contextlib.suppress(OSError, ValueError):  # (no cgroup v2 limit)
        raw = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if raw != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            room = int(raw) - used
            avail = room if avail is None else min(avail, room)
    if avail is None and hasattr(os, "sysconf"):
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return avail


def free_disk(path: Path) -> int | None:
    """Free bytes on the file system that will hold ``path`` (its nearest existing ancestor)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def refusal(est: Estimate, out: Path | None, memory: int | None, disk: int | None) -> str | None:
    """Why a run with estimate ``est`` cannot finish on this machine (one line, no ``vsim:``
    prefix), or None. ``memory`` and ``disk`` are what the machine has (None: unknown)."""
    if memory is not None and est.memory > memory:
        return (
            f"this run needs about {size_text(est.memory)} of memory (mostly {est.biggest}); this machine has "
            f"{size_text(memory)} available. Lower the sizes, or use --force to try anyway"
        )
    if out is not None and disk is not None and est.events > disk:
        return (
            f"this run writes about {size_text(est.events)} of events to {out} ({est.faults:,} faults at "
            "events.level), "
            f'and its file system has {size_text(disk)} free. Set events.level = "off" or a smaller run, or use '
            "--force to try anyway"
        )
    if est.wall_lower_bound > MAX_WALL_S:
        return (
            f"this run simulates about {est.accesses:.2g} guest accesses and {est.faults:.2g} faults: at least "
            f"{_duration(est.wall_lower_bound)} here at vsim's fastest rates. Lower workload.passes or "
            "workload.accesses, or use --force to run it anyway"
        )
    return None


INT64_HEADROOM_NS = 1 << 62  # vsim's NEVER: simulated time must stay below it


def sim_time_bound(cfg: ScenarioConfig, est: Estimate) -> int:
    """An upper bound on the simulated time the run can reach: every access and fault paying every
    cost 64 times over, one after another (lock waits only serialize work that is counted here),
    plus the schedules' times and intervals (guest context switches and forks cost time, so their
    number is bounded by the time itself)."""
    c = {name: getattr(cfg.costs, name) for name in type(cfg.costs).model_fields}
    every = sum(c.values())
    per_access = c["guest_access"] + c["tlb_hit"] + 24 * c["walk_ref"]
    hm, st = cfg.host_mm, cfg.vmm.stress
    schedules = (
        max((op.at for op in cfg.vmm.ops), default=0)
        + st.start + st.iterations * st.interval
        + hm.start + hm.invalidations * (hm.interval + hm.work)
    )  # fmt: skip
    return est.accesses * per_access + (est.faults + 1) * every * 64 + schedules


def overflow_refusal(cfg: ScenarioConfig, est: Estimate) -> str | None:
    """Why the run could overflow vsim's int64 nanoseconds (no --force: compiled code would wrap)."""
    bound = sim_time_bound(cfg, est)
    if bound < INT64_HEADROOM_NS:
        return None
    return (
        f"this run could reach {bound:.2g} ns of simulated time, beyond the {INT64_HEADROOM_NS:.2g} ns that "
        "vsim's integer clocks hold; lower the costs.* values, the schedules' intervals or the run's size"
    )


def sweep_refusal(points: list[tuple[str, ScenarioConfig]], at_once: int, local: bool, sweep_dir: Path,
                  force: bool = False) -> str | None:  # fmt: skip
    """Why a sweep cannot finish here: the first point (``(id, config)``) that cannot, with
    ``at_once`` points running together in local worker processes (``local``; on a Dask cluster
    only the wall time is checked), or None. ``force`` (``--force``) leaves only the refusal it
    cannot override: a point whose clocks could overflow (``overflow_refusal``)."""
    if force:
        for pid, cfg in points:
            why = overflow_refusal(cfg, estimate(cfg))
            if why:
                return f"point {pid}: {why}"
        return None
    memory = available_memory() if local else None
    budget = None if memory is None else memory // max(1, at_once)
    disk = free_disk(sweep_dir) if local else None
    for pid, cfg in points:
        est = estimate(cfg)
        logged = sweep_dir if cfg.events.level != "off" else None
        why = refusal(est, logged, budget, disk) or overflow_refusal(cfg, est)
        if why:
            share = f" ({at_once} points run at once: --jobs)" if local and at_once > 1 else ""
            return f"point {pid}{share}: {why}"
    return None


def warnings(est: Estimate) -> list[str]:
    """What the user should know before a run that may go ahead (one line each)."""
    out = []
    if est.events > EVENTS_WARN_BYTES:
        out.append(f'this run writes about {size_text(est.events)} of events; events.level = "off" writes none')
    return out


def size_text(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n / 1024:.3g} KiB"


def _duration(s: float) -> str:
    if s >= 2 * 86400:
        return f"{s / 86400:,.0f} days"
    return f"{s / 3600:,.0f} hours"
