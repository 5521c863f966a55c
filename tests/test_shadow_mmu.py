"""Shadow paging end to end: each paging mode's walks, roots and the previous-root cache, write
tracking, flooding, unsync and the R5 switch."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_config, simulate

from vsim.mmu.rmap import rmap_entries
from vsim.mmu.shadow_mmu import ShadowPagingMmu
from vsim.mmu.spte import PT_WRITABLE
from vsim.vcpu.walk import walk_2d
from vsim.vm import Vm

SHADOW = "mmu.mode=shadow"
LOW = "vm.base_gpa=0"  # 32-bit guests keep their RAM in lowmem


def _one_process(paging: str, *more: str) -> tuple[Vm, dict, object]:  # type: ignore[type-arg]
    """One vCPU, one process writing each of its 64 pages once, in order."""
    sets = [SHADOW, f"guest.paging={paging}", "vm.vcpus=1", "workload.per_vcpu_memory=2MiB",
            "guest.process_memory=256KiB", *more]  # fmt: skip
    if paging != "paging64":
        sets.append(LOW)
    return simulate(*sets)


@pytest.mark.parametrize(("paging", "levels", "hw_refs"), [("paging64", 4, 4), ("pae", 2, 2), ("paging32", 2, 2)])
def test_each_paging_mode_walks_its_levels(paging: str, levels: int, hw_refs: int) -> None:
    vm, st, _ = _one_process(paging)
    t = st["vcpu_total"]
    # Every first touch: KVM walks the guest tables, finds no PTE and injects a #PF; the guest
    # handler maps the page; the retried access faults again, the walk succeeds and KVM maps it.
    assert t["pf_guest"] == 64
    walks = t["pf_taken"] - t["pf_emulate"]  # an emulated store has no guest walk of its own... yet
    assert t["gpte_reads"] % levels == 0 and t["gpte_reads"] // levels >= 128
    # PAE reads its PDPTE from the PDPTRs, so both 32-bit modes read 2 gptes per walk from memory.
    assert t["gpte_reads"] <= walks * levels
    # The CPU walks the shadow tables: 4 references for a 64-bit guest, 2 under PAE's PDPTEs.
    v = vm.vcpus[0]
    ok, refs, leaf, _ = walk_2d(vm.mmu.spt, v.root.table, vm.guest.mode.user_base, False, v.guest_refs)  # type: ignore[union-attr]
    assert ok and leaf == 1 and refs == hw_refs
    assert t["walk_refs"] <= hw_refs * t["hw_walks"]
    assert st["vm"]["pages_4k"] >= 64
    assert vm.guest is not None and vm.guest.mode.name == paging


def test_nonpaging_guest_is_shadowed_by_a_direct_mmu() -> None:
    _, st, _ = simulate(SHADOW, "guest.paging=nonpaging", LOW, "vm.vcpus=2", "workload.per_vcpu_memory=1MiB")
    t = st["vcpu_total"]
    assert t["pf_guest"] == 0 and t["gpte_reads"] == 0
    assert t["pf_fixed"] + t["pf_fast"] == 2 * 256  # gva == gpa: one fault per page, no guest walk
    assert st["vm"]["mmu_unsync"] == 0 and st["vm"]["mmu_pte_write"] == 0


def test_upper_level_guest_tables_are_write_tracked_and_their_stores_emulated() -> None:
    vm, st, _ = _one_process("paging64", "guest.process_memory=8MiB", "workload.per_vcpu_memory=16MiB")
    mmu = vm.mmu
    assert isinstance(mmu, ShadowPagingMmu)
    tracked = {}
    for sp in mmu.sp_of.values():
        if sp.gfns is not None and sp.level > 1 and not sp.invalid:
            tracked[sp.gfn] = tracked.get(sp.gfn, 0) + 1
    slot = vm.memslots.slots[0]
    counts = {slot.base_gfn + i: int(slot.write_track[i]) for i in np.flatnonzero(slot.write_track).tolist()}
    assert tracked and counts == tracked  # one count per upper-level page shadowing the gfn
    for gfn in tracked:  # and no SPTE maps them writable (§13.3)
        for level in (1, 2, 3):
            for table, idx in rmap_entries(mmu.descs, slot, gfn, level):
                assert not mmu.spt.item(table, idx) & PT_WRITABLE
    # The guest links its PUD into the (shadowed) PGD, then each page table after the first into
    # the PMD, which is shadowed from the first fault through it: those stores exit and are emulated.
    assert st["vcpu_total"]["pf_emulate"] == 1 + (2048 // 512 - 1)
    assert st["vm"]["mmu_pte_write"] == st["vcpu_total"]["pf_emulate"]


def test_leaf_tables_go_unsync_and_are_synced_at_cr3_writes() -> None:
    _, st, _ = simulate(SHADOW, "vm.vcpus=1", "workload.per_vcpu_memory=4MiB", "guest.processes=2",
                        "guest.process_memory=1MiB", "guest.context_switch_interval=20us",
                        "workload.passes=2", "workload.access=random")  # fmt: skip
    vm = st["vm"]
    t = st["vcpu_total"]
    # The #PF handler's PTE stores make the 4K page tables unsync instead of emulating them...
    assert vm["mmu_unsync"] > 0
    assert t["pf_emulate"] < t["pf_guest"]
    # ...and every CR3 write resyncs them (write protection again: remote flushes).
    assert t["cr3_writes"] > 10 and vm["remote_tlb_flush_requests"] >= t["cr3_writes"] // 2


def test_cr3_switches_reuse_the_three_previous_roots() -> None:
    vm, st, _ = simulate(SHADOW, "vm.vcpus=1", "workload.per_vcpu_memory=4MiB", "guest.processes=4",
                         "guest.process_memory=256KiB", "guest.context_switch_interval=5us",
                         "workload.passes=3")  # fmt: skip
    v = vm.vcpus[0]
    pgds = {p.pgd for p in v.procs}  # type: ignore[attr-defined]
    # Four processes: the current root and the other three cached (fast_pgd_switch).
    assert {r.pgd for r in v.prev_roots} | {v.root.pgd} == pgds  # type: ignore[union-attr]
    assert st["vcpu_total"]["cr3_writes"] > 20
    # A root page per process was ever created: switching back never rebuilt one.
    roots = [sp for sp in vm.mmu.sp_of.values() if sp.level == 4]  # type: ignore[attr-defined]
    assert len(roots) == 4


def test_pae_roots_are_rebuilt_at_every_switch() -> None:
    vm, st, _ = simulate(SHADOW, "guest.paging=pae", LOW, "vm.vcpus=1", "workload.per_vcpu_memory=4MiB",
                         "guest.processes=2", "guest.process_memory=256KiB",
                         "guest.context_switch_interval=5us", "workload.passes=2")  # fmt: skip
    assert vm.vcpus[0].prev_roots == []  # PAE roots are not SPs: no fast_pgd_switch
    assert st["vcpu_total"]["cr3_writes"] > 4


def test_fork_storm_floods_upper_level_pages_and_copy_on_write_uses_invlpg() -> None:
    _, st, _ = simulate(SHADOW, "vm.vcpus=1", "workload.per_vcpu_memory=20MiB", "guest.processes=1",
                        "guest.process_memory=8MiB", "guest.fork_interval=200us", "guest.child_writes=32",
                        "workload.write_percent=50")  # fmt: skip
    vm = st["vm"]
    t = st["vcpu_total"]
    assert t["guest_forks"] > 0
    assert vm["mmu_flooded"] > 0  # exit_mmap's pmd_clear stores: three without a use in between
    assert vm["mmu_pte_write"] >= vm["mmu_flooded"]
    # A child's write to a page the parent maps copies it: ptep_clear_flush → INVLPG (an exit).
    assert 0 < t["invlpg"] <= t["guest_forks"] * 32


def test_eviction_keeps_shadow_paging_consistent() -> None:
    _, st, _ = simulate(SHADOW, "vm.vcpus=2", "workload.per_vcpu_memory=20MiB", "guest.processes=8",
                        "guest.process_memory=2MiB", "guest.context_switch_interval=50us",
                        "mmu.nr_mmu_pages=64", "workload.passes=2")  # fmt: skip
    assert st["vm"]["mmu_recycled"] > 0 and st["vm"]["mmu_shadow_pages"] <= 64


@pytest.mark.parametrize("r5", [False, True])
def test_r5_protecting_a_page_table_must_flush_on_mmu_writable(r5: bool) -> None:
    """R5: dirty logging cleared W and has not flushed yet; KVM then shadows the page as a guest
    page table. Deciding the flush from W (already clear) leaves a vCPU's writable TLB entry in
    place, which the checker catches; deciding it from MMU-writable flushes."""
    flush_rule = f"mmu.wrprot_flush_on_mmu_writable={str(not r5).lower()}"
    cfg = make_config(SHADOW, "sim.mode=reference", "vm.vcpus=2", "workload.per_vcpu_memory=2MiB",
                      "guest.process_memory=256KiB", flush_rule)  # fmt: skip
    vm = Vm(cfg)
    vm.run()
    mmu = vm.mmu
    assert isinstance(mmu, ShadowPagingMmu) and vm.guest is not None
    holder, other = vm.vcpus
    # Page 0 of vCPU 0's process was written: its shadow leaf is writable and dirty, and the vCPU
    # holds that translation (put back in its TLB, as if it had just used it).
    gfn = int(holder.proc.frames[0]) + vm.region_base_gfn  # type: ignore[attr-defined]
    key = vm.guest.mode.user_base
    holder.tlb.insert(0, key, 2)  # type: ignore[union-attr]
    assert (0, key) in mmu.tlb_keys_of_gfn(gfn)
    # Dirty logging write-protects it (W only, MMU-writable stays) and has not flushed yet.
    lock = vm.mmu_lock
    assert lock.write_lock(-1, vm.env.now) is None  # the rmap walk runs under the write lock
    visited, flush = mmu.wrprot_range(gfn, gfn + 1, 1, False, -1, vm.env.now)
    lock.write_unlock(-1, vm.env.now)
    assert visited == 2 and flush  # the user mapping and the direct map (the kernel zeroed the page)
    holder.requests = other.requests = 0
    # vCPU 1 now shadows the frame as a guest page table (account_shadowed, in FNAME(fetch)).
    assert lock.write_lock(other.id, vm.env.now) is None
    sp, _ = mmu.get_indirect_sp(other.id, gfn, 1, 7, 0, vm.env.now)
    lock.write_unlock(other.id, vm.env.now)
    assert sp.gfn == gfn and sp.gfns == {}
    rules = {rule for _, rule, _ in vm.checker.violations}  # type: ignore[union-attr]
    assert ("write_tracked_writable_tlb" in rules) == r5
    assert bool(holder.requests) != r5  # the correct kernel sent the flush


def test_a_paging32_page_directory_is_shadowed_by_four_pages_one_per_quadrant() -> None:
    vm, st, _ = _one_process("paging32")
    mmu = vm.mmu
    assert isinstance(mmu, ShadowPagingMmu)
    pgd = vm.vcpus[0].cr3  # type: ignore[attr-defined]
    roots = [sp for sp in mmu.valid_sps(pgd) if sp.gfns is not None]  # (a direct page may share the gfn)
    assert sorted((sp.level, sp.quadrant) for sp in roots) == [(2, 0), (2, 1), (2, 2), (2, 3)]
    assert all(sp.has_4_byte_gpte for sp in roots)
    # The process's 1024-entry page table: its first half (quadrant 0) shadows the 64 pages.
    pt = next(sp for sp in mmu.sp_of.values() if sp.level == 1 and not sp.direct and sp.gfns)
    assert pt.has_4_byte_gpte and pt.quadrant == 0 and len(pt.gfns) == 64  # type: ignore[arg-type]
