"""Dirty logging on the TDP MMU, driven by dirty_log_perf_test's main thread."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import make_config, simulate

from vsim.mmu import fast_page_fault as fpf
from vsim.runner import collect_stats
from vsim.vcpu.vcpu import Vcpu
from vsim.vm import Vm

VCPUS, PAGES = 3, 1024  # 4 MiB per vCPU


def _perf(*sets: str) -> dict[str, Any]:
    _, stats, _ = simulate(
        f"vm.vcpus={VCPUS}", f"workload.per_vcpu_memory={PAGES * 4}KiB", "workload.passes=3",
        "selftest.name=dirty_log_perf", "selftest.iterations=2", *sets,
    )  # fmt: skip
    return stats


MODES = {
    "manual+initially_set": [],
    "manual": ["dirty_log.initially_set=false"],
    "get_protects": ["dirty_log.manual_protect=false"],
    "pml+manual+initially_set": ["dirty_log.pml=true"],
    "pml+get_protects": ["dirty_log.pml=true", "dirty_log.manual_protect=false"],
}


@pytest.mark.parametrize("mmu", ["tdp_mmu", "legacy_tdp"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backing", ["4K", "2M"])
def test_every_page_written_is_harvested(mode: str, backing: str, mmu: str) -> None:
    """Each iteration writes every page once; every harvest reports all of them, and the checker
    (§13.5, on in tests) finds no write after a harvest returned that the next one misses."""
    stats = _perf(f"vm.backing_page_size={backing}", f"mmu.mode={mmu}", *MODES[mode])
    st = stats["selftest"]
    assert st["dirty_pages"] == [VCPUS * PAGES] * 2
    if mode.startswith("manual"):
        assert st["cleared_pages"] == [VCPUS * PAGES] * 2
    tot = stats["vcpu_total"]
    if "pml" in mode:
        # SPTEs stay writable: no write-protection faults; the CPU logs, one PML-full exit per
        # 512 newly dirtied pages at most (the buffer is also drained at every other exit).
        assert tot["pf_fast"] == 0
        assert 0 < tot["pml_full_exits"] <= 2 * VCPUS * PAGES // 512
    else:
        # Iteration 2 always starts write-protected: every page takes one lockless fast fault then.
        assert tot["pf_fast"] >= VCPUS * PAGES


@pytest.mark.parametrize("pml", ["false", "true"])
def test_random_partial_writes_are_harvested_completely(pml: str) -> None:
    stats = _perf("workload.access=random", "workload.write_percent=40", "vm.backing_page_size=2M",
                  "dirty_log.eager_split=false", f"dirty_log.pml={pml}")  # fmt: skip
    assert 0 < stats["selftest"]["dirty_pages"][1] < VCPUS * PAGES


def test_pml_replaces_write_protection_faults_with_logging() -> None:
    """cost-anchors 6.1/6.2: with PML a dirty pass costs PML-full exits instead of one fault per page."""
    wp = _phases("dirty_log.initially_set=false")
    pml = _phases("dirty_log.initially_set=false", "dirty_log.pml=true")
    assert pml["Iteration 2 dirty memory time"] < wp["Iteration 2 dirty memory time"] / 2


def test_missed_dirty_mark_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fast fault that forgets ``mark_page_dirty_in_slot`` (the class of R12) loses pages. (The
    Python fast path is the one patched: the vCPU group, whose compiled fast fault marks the page
    itself, is off.)"""
    monkeypatch.setattr(fpf, "mark_page_dirty_in_slot", lambda slot, gfn: None)
    vm = Vm(make_config(f"vm.vcpus={VCPUS}", "workload.per_vcpu_memory=256KiB", "workload.passes=3",
                        "selftest.name=dirty_log_perf", "selftest.iterations=2", "sim.fault_kernel=false"))  # fmt: skip
    vm.run()
    assert {rule for _, rule, _ in vm.checker.violations} == {"dirty_log_incomplete"}  # type: ignore[union-attr]


def test_a_dirty_mark_the_loop_loses_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same loss in compiled code: the vCPU group's fast faults mark a copy of the dirty bitmap
    (as if ``fast_fault`` forgot the mark). The checker, which sees the loop's writes, catches it."""
    from vsim.vcpu import group_transfer
    from vsim.vcpu.group import VcpuGroup

    load = group_transfer.load_slots

    def stale_bitmap(grp: VcpuGroup) -> None:
        load(grp)
        grp._bitmap = grp._bitmap.copy()

    monkeypatch.setattr(group_transfer, "load_slots", stale_bitmap)
    vm = Vm(make_config(f"vm.vcpus={VCPUS}", "workload.per_vcpu_memory=256KiB", "workload.passes=3",
                        "selftest.name=dirty_log_perf", "selftest.iterations=2"))  # fmt: skip
    vm.run()
    assert vm.group is not None and vm.group.faults > 0 and sum(v.stat.pf_fast for v in vm.vcpus) > 0
    assert {rule for _, rule, _ in vm.checker.violations} == {"dirty_log_incomplete"}  # type: ignore[union-attr]


def test_skipped_local_flush_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """§13.1: a vCPU that enters after a completed remote flush without flushing its TLB keeps
    writable translations of write-protected pages."""

    def count_only(self: Vcpu) -> None:
        self.stat.tlb_flush += 1

    monkeypatch.setattr(Vcpu, "kvm_vcpu_flush_tlb_all", count_only)
    vm = Vm(make_config("vm.vcpus=1", "workload.per_vcpu_memory=256KiB", "workload.passes=3",
                        "selftest.name=dirty_log_perf", "selftest.iterations=2"))  # fmt: skip
    end = vm.run()
    rules = {v["rule"] for v in collect_stats(vm, end)["invariant_violations"]}
    assert "stale_tlb_after_flush_write" in rules


def _phases(*sets: str) -> dict[str, int]:
    return dict(_perf("vm.backing_page_size=2M", *sets)["selftest"]["phases_ns"])


def test_eager_splitting_moves_work_from_iteration_1_into_enabling() -> None:
    eager = _phases("dirty_log.initially_set=false", "dirty_log.eager_split=true")
    lazy = _phases("dirty_log.initially_set=false", "dirty_log.eager_split=false")
    split_work = VCPUS * PAGES * make_config().costs.tdp_split_spte  # every 4K SPTE created once
    assert eager["Enabling dirty logging time"] - lazy["Enabling dirty logging time"] >= split_work
    assert lazy["Iteration 1 dirty memory time"] > eager["Iteration 1 dirty memory time"]
    # Iteration 2 finds everything split either way.
    assert lazy["Iteration 2 dirty memory time"] == eager["Iteration 2 dirty memory time"]


def test_initially_set_moves_protection_into_the_first_clear() -> None:
    """With INITIALLY_SET, enabling protects nothing and Iteration 1 takes no write faults; the
    first CLEAR splits and write-protects, and Iteration 2 takes the faults (cost-anchors 6.6)."""
    init = _phases()
    assert init["Enabling dirty logging time"] < init["Iteration 1 clear dirty log time"]
    assert init["Iteration 1 dirty memory time"] < init["Iteration 2 dirty memory time"]


def test_legacy_splits_on_fault_by_zapping_and_flushing() -> None:
    """The legacy MMU has no in-place split on a fault: ``drop_large_spte`` zaps the huge leaf and
    flushes, and the 4K pages fault back in under the write lock (cost-anchors 3.9)."""
    sets = ("dirty_log.initially_set=false", "dirty_log.eager_split=false")
    tdp = _perf("vm.backing_page_size=2M", *sets)
    legacy = _perf("vm.backing_page_size=2M", "mmu.mode=legacy_tdp", *sets)
    huge = VCPUS * PAGES // 512
    # One flush per huge page dropped, besides enabling's, the two GETs' and disabling's.
    assert legacy["vm"]["remote_tlb_flush_requests"] == tdp["vm"]["remote_tlb_flush_requests"] + huge
    it1 = "Iteration 1 dirty memory time"
    assert dict(legacy["selftest"]["phases_ns"])[it1] > 2 * dict(tdp["selftest"]["phases_ns"])[it1]
    # Disabling zaps the collapsible 4K leaves instead of recovering huge pages in place.
    assert legacy["vm"]["pages_4k"] == legacy["vm"]["pages_2m"] == 0
    assert tdp["vm"]["pages_2m"] == huge


def test_disabling_recovers_huge_pages_and_flushes() -> None:
    stats = _perf("vm.backing_page_size=2M")
    vm = stats["vm"]
    assert vm["pages_4k"] == 0 and vm["pages_2m"] == VCPUS * PAGES // 512
    # Two CLEARs and the recovery each request one flush; the vCPUs are parked in userspace,
    # so no IPI is sent (remote_tlb_flush counts only flushes that kicked someone).
    assert vm["remote_tlb_flush_requests"] == 3
    assert vm["remote_tlb_flush"] == 0
    # Each vCPU flushes at its entry into iteration 2; the second CLEAR and the recovery come after
    # its last pass, and their requests stay pending.
    assert [v["tlb_flush"] for v in stats["vcpus"]] == [1] * VCPUS


def _toggle(*sets: str) -> dict[str, Any]:
    """Dirty logging switched on and off on slot 0 while 4 vCPUs keep writing."""
    _, stats, _ = simulate(
        "vm.vcpus=4", "workload.per_vcpu_memory=16MiB", "workload.passes=40", "vm.backing_page_size=2M",
        "tlb.entries_4k=12", "dirty_log.initially_set=false",
        'vmm.ops=[{at="300us", op="flags", slot=0, log_dirty=true}, {at="2ms", op="flags", slot=0, log_dirty=false}]',
        *sets,
    )  # fmt: skip
    return stats


def test_flush_batching_changes_the_flush_count_not_the_outcome() -> None:
    """Recovering huge pages with one flush (6.13+) or zapping each with its own flush (before):
    more flushes, the same mappings at the end, and the checker (on) finds nothing either way."""
    batched = _toggle()
    each = _toggle("mmu.batch_collapse_flushes=false")
    assert each["vm"]["remote_tlb_flush_requests"] > batched["vm"]["remote_tlb_flush_requests"]
    for st in (batched, each):
        assert (st["vm"]["pages_4k"], st["vm"]["pages_2m"]) == (0, 4 * 16 // 2)


def test_slot_walks_yield_to_waiting_faults_and_finish() -> None:
    """The legacy MMU write-protects under the write lock: faulting vCPUs queue, so the walk
    yields between page tables (and still finishes); the TDP MMU's read lock never makes it wait."""
    legacy = _toggle("mmu.mode=legacy_tdp", "workload.access=random")
    tdp = _toggle("workload.access=random")
    assert legacy["vm"]["mmu_lock_yields"] > 0 and tdp["vm"]["mmu_lock_yields"] == 0
    for st in (legacy, tdp):
        assert st["vm"]["memslot_updates"] == 2


def test_a_shadow_spte_made_writable_by_a_resync_after_a_flags_only_update_is_logged() -> None:
    """``FNAME(sync_spte)`` makes a write-protected SPTE writable again (``make_spte``): the page
    is marked dirty in the memslot as it is now, after ``KVM_MEM_LOG_DIRTY_PAGES`` replaced the
    slot, not in the copy that was current when the leaf was installed (issue 15's lost page)."""
    from dataclasses import replace

    import numpy as np

    from vsim.memslots import KVM_MEM_LOG_DIRTY_PAGES, Memslots
    from vsim.mmu.spte import PT_WRITABLE, SPTE_MMU_WRITABLE

    vm = Vm(make_config("mmu.mode=shadow", "vm.vcpus=1", "guest.process_memory=1MiB", "workload.passes=1",
                        "workload.write_percent=100", "sim.invariants=false"))  # fmt: skip
    vm.run()
    mmu = vm.mmu
    spt = mmu.spt
    leaf = next((sp, i) for sp in mmu.sp_of.values() if not sp.direct and sp.level == 1 and not sp.invalid
                for i in np.flatnonzero(spt[sp.table] & PT_WRITABLE).tolist())  # fmt: skip
    sp, idx = leaf
    gfn = sp.get_gfn(idx)
    spt[sp.table, idx] &= ~(PT_WRITABLE | SPTE_MMU_WRITABLE)  # write-protected, as a harvest leaves it
    old = vm.memslots.gfn_to_memslot(gfn)
    logged = replace(old, flags=old.flags | KVM_MEM_LOG_DIRTY_PAGES, dirty_bitmap=np.zeros(old.npages, np.uint8))
    vm.memslots = Memslots([logged if s is old else s for s in vm.memslots.slots], vm.memslots.generation + 2)
    mmu.sync_spte(vm.vcpus[0], sp, idx)  # type: ignore[union-attr]
    assert spt[sp.table, idx] & PT_WRITABLE
    assert logged.dirty_bitmap is not None and logged.dirty_bitmap[gfn - logged.base_gfn] == 1


def test_kvms_own_writes_to_guest_memory_under_shadow_paging_are_harvested(monkeypatch: pytest.MonkeyPatch) -> None:
    """dirty_log_perf under shadow paging with forks and context switches: the gptes whose A/D
    bits ``FNAME(walk_addr)`` sets and the stores the emulator completes are KVM's writes to guest
    memory (``kvm_vcpu_mark_page_dirty``), and the checker counts them as writes. Every harvest
    holds them; with the marks left out, the checker reports the pages lost."""
    import vsim.vcpu.shadow_vcpu as shadow_vcpu

    sets = ["mmu.mode=shadow", "vm.vcpus=2", "guest.processes=2", "guest.process_memory=1MiB",
            "workload.per_vcpu_memory=8MiB", "guest.context_switch_interval=100us", "guest.fork_interval=50us",
            "guest.child_writes=16", "workload.write_percent=50", "selftest.name=dirty_log_perf",
            "selftest.iterations=3", "workload.passes=4", "sim.invariants=true"]  # fmt: skip
    vm = Vm(make_config(*sets))
    vm.run()
    assert vm.checker is not None and vm.checker.violations == []
    assert vm.program is not None and all(n > 0 for n in vm.program.results()["dirty_pages"])
    monkeypatch.setattr(shadow_vcpu, "mark_page_dirty_in_slot", lambda slot, gfn: None)
    lost = Vm(make_config(*sets))
    lost.run()
    assert lost.checker is not None and {r for _, r, _ in lost.checker.violations} == {"dirty_log_incomplete"}
