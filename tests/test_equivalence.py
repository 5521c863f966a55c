"""The batched mode gives exactly the reference mode's results (one SimPy event per access)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from vsim.config import load_config
from vsim.runner import run_scenario


def _random_config(seed: int) -> list[str]:
    r = random.Random(seed)
    kind = r.choice(["memstress", "memstress", "uniform", "zipf"])
    sets = [
        f"seed={seed}",
        f"vm.vcpus={r.randint(1, 5)}",
        f"workload.kind={kind}",
        f"workload.per_vcpu_memory={r.choice([64, 256, 1024, 2048])}KiB",
        f"workload.overlap={r.choice(['true', 'false'])}",
        f"workload.access={r.choice(['sequential', 'random'])}",
        f"workload.write_percent={r.choice([0, 30, 100])}",
        f"workload.passes={r.randint(1, 3)}",
        f"workload.accesses={r.randint(100, 3000)}",
        f"vm.backing_page_size={r.choice(['4K', '4K', '2M'])}",
        f"guest.page_size={r.choice(['4K', '4K', '2M'])}",
        f"tlb.entries_4k={r.choice([4, 32, 1536])}",
        "tlb.ways_4k=4",
        f"tlb.entries_2m={r.choice([2, 8])}",
        "tlb.ways_2m=2",
        f"sim.batch_accesses={r.choice([7, 64, 4096])}",
        f"costs.tdp_mmu_map={r.choice([100, 400, 3000])}ns",
        f"costs.faultin_present={r.choice([300, 800, 2500])}ns",
        "events.level=all",
        "sim.invariants=true",
    ]
    scheme = f"memslots.generation_scheme={r.choice(['in_progress_bit', 'double_increment', 'single_increment'])}"
    story = r.random()
    if story < 0.3:
        # Hot-plug: the second half of the region is MMIO until the VMM creates it mid-run.
        sets += ["vm.memslots=2", "vm.absent_memslots=[1]", scheme,
                 f'vmm.ops=[{{at="{r.randint(5, 400)}us", op="create", slot=1}}, '
                 f'{{at="{r.randint(401, 600)}us", op="flags", slot=0, log_dirty=true}}]']  # fmt: skip
    elif story < 0.6:
        # Delete, re-create and move a memslot while the vCPUs run: fast zaps, kicks, refaults.
        t = r.randint(5, 300)
        sets += ["vm.memslots=2", scheme,
                 f'vmm.ops=[{{at="{t}us", op="delete", slot=1}}, {{at="{t + r.randint(1, 200)}us", op="create", '
                 f'slot=1}}, {{at="{t + r.randint(201, 400)}us", op="move", slot=1, to_gpa="64GiB"}}]']  # fmt: skip
    elif story < 0.65:
        sets += [f"vmm.stress.iterations={r.randint(1, 12)}", f"vmm.stress.interval={r.randint(1, 40)}us"]
    if r.random() < 0.4:
        # The legacy direct MMU: faults under the write lock, shadow pages, rmaps, prefetch.
        sets += ["mmu.mode=legacy_tdp"]
    elif story < 0.75:
        # The host MM invalidates ranges under the running vCPUs (zaps, flushes, retries).
        sets += [f"host_mm.invalidations={r.randint(5, 60)}", f"host_mm.interval={r.randint(2, 30)}us",
                 f"host_mm.pages={r.choice([1, 16, 512])}", f"host_mm.pattern={r.choice(['sequential', 'random'])}",
                 f"host_mm.action={r.choice(['migrate', 'dontneed'])}",
                 f"host_mm.start={r.randint(0, 200)}us"]  # fmt: skip
    elif story < 0.85:
        # Dirty logging switched on and off while the vCPUs run: write protection, splits on
        # write faults, huge-page recovery and remote flushes that kick running vCPUs.
        t = r.randint(5, 300)
        sets += [_dirty_log_setting(r), "vm.memslots=2", "vm.backing_page_size=2M",
                 f'vmm.ops=[{{at="{t}us", op="flags", slot=0, log_dirty=true}}, '
                 f'{{at="{t + r.randint(1, 300)}us", op="flags", slot=0, log_dirty=false}}]']  # fmt: skip
    elif story < 0.93:
        it = r.randint(2, 3)
        sets += [_dirty_log_setting(r), "workload.kind=memstress", f"workload.passes={it + 1}",
                 "selftest.name=dirty_log_perf", f"selftest.iterations={it}"]  # fmt: skip
        if r.random() < 0.5:  # the populate pass through userfaultfd
            sets += ["host_mm.uffd=true", f"host_mm.uffd_handlers={r.randint(1, 3)}"]
    else:
        sets += ["workload.kind=memstress", "workload.passes=5", "selftest.name=access_tracking_perf",
                 f"mmu.age_flush={r.choice(['true', 'false'])}",
                 f"mmu.ept_ad={r.choice(['true', 'false'])}"]  # fmt: skip
    return sets


def _dirty_log_setting(r: random.Random) -> str:
    return r.choice(["dirty_log.eager_split=false", "dirty_log.manual_protect=false", "dirty_log.initially_set=false",
                     "dirty_log.eager_split=true", "dirty_log.pml=true"])  # fmt: skip


def _outputs(sets: list[str], mode: str, out: Path) -> tuple[str, bytes]:
    cfg = load_config(None, [*sets, f"sim.mode={mode}"])
    res = run_scenario(cfg, out)
    if cfg.memslots.generation_scheme != "single_increment":  # that one is the R1 bug on purpose
        assert res.stats["invariant_violations"] == []
    return json.dumps(res.stats), (out / "events.jsonl").read_bytes()


@pytest.mark.parametrize(("kind", "seed"), [("ept", s) for s in range(32)] + [("shadow", s) for s in range(12)])
def test_batched_equals_reference(tmp_path: Path, kind: str, seed: int) -> None:
    sets = _random_config(seed) if kind == "ept" else _random_shadow_config(seed)
    stats_b, events_b = _outputs(sets, "batched", tmp_path / "b")
    stats_r, events_r = _outputs(sets, "reference", tmp_path / "r")
    assert stats_b == stats_r
    assert events_b == events_r  # identical per-vCPU fault sequences, and everything else
    assert b"kvm_page_fault" in events_b


def _random_shadow_config(seed: int) -> list[str]:
    """Shadow paging: every paging mode, processes with context switches and forks, eviction,
    dirty logging (with harvests: dirty_log_perf) and host-MM invalidations under the running guest."""
    r = random.Random(seed)
    paging = r.choice(["paging64", "paging64", "pae", "paging32", "nonpaging"])
    nv = r.randint(1, 3)
    sets = [
        f"seed={seed}",
        "mmu.mode=shadow",
        f"guest.paging={paging}",
        f"vm.vcpus={nv}",
        f"workload.per_vcpu_memory={r.choice([2, 4])}MiB",
        f"workload.access={r.choice(['sequential', 'random'])}",
        f"workload.write_percent={r.choice([0, 30, 100])}",
        f"workload.passes={r.randint(1, 3)}",
        f"tlb.entries_4k={r.choice([4, 32, 1536])}",
        "tlb.ways_4k=4",
        f"sim.batch_accesses={r.choice([7, 64, 4096])}",
        "events.level=all",
        "sim.invariants=true",
    ]
    if paging != "paging64":
        sets.append("vm.base_gpa=0")
    if paging != "nonpaging":
        sets += [f"guest.processes={r.randint(1, 3)}", f"guest.process_memory={r.choice([64, 256, 512])}KiB",
                 f"guest.context_switch_interval={r.choice([0, 20, 150])}us"]  # fmt: skip
        if r.random() < 0.5:
            sets += [f"guest.fork_interval={r.choice([100, 300])}us", f"guest.child_writes={r.choice([0, 4, 40])}"]
    story = r.random()
    if story < 0.25:
        sets += ["mmu.nr_mmu_pages=64"]  # make_mmu_pages_available evicts from the fault path
    elif story < 0.5:
        t = r.randint(5, 200)
        sets += [_dirty_log_setting(r).replace("dirty_log.pml=true", "dirty_log.pml=false"),
                 f'vmm.ops=[{{at="{t}us", op="flags", slot=0, log_dirty=true}}, '
                 f'{{at="{t + r.randint(1, 300)}us", op="flags", slot=0, log_dirty=false}}]']  # fmt: skip
    elif story < 0.6:  # dummy-slot deletes: fast zaps make every root obsolete, current and cached
        sets += [f"vmm.stress.iterations={r.randint(1, 12)}", f"vmm.stress.interval={r.randint(5, 40)}us"]
    elif story < 0.75:
        sets += [f"host_mm.invalidations={r.randint(5, 40)}", f"host_mm.interval={r.randint(2, 30)}us",
                 f"host_mm.pages={r.choice([1, 16])}", f"host_mm.pattern={r.choice(['sequential', 'random'])}",
                 f"host_mm.action={r.choice(['migrate', 'dontneed'])}"]  # fmt: skip
    elif story < 0.9:  # dirty_log_perf: harvests, with the checker's completeness rule over KVM's own writes
        it = r.randint(2, 3)
        sets += [_dirty_log_setting(r).replace("dirty_log.pml=true", "dirty_log.pml=false"),
                 "selftest.name=dirty_log_perf", f"selftest.iterations={it}", f"workload.passes={it + 1}"]  # fmt: skip
    return sets
