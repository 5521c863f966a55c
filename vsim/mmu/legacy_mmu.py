"""The legacy direct MMU (``mmu.mode = "legacy_tdp"``): TDP built from shadow pages, faults under the
write lock (``direct_page_fault`` in ``arch/x86/kvm/mmu/mmu.c``, spec §1.4 and §1.7).

A fault runs ``fast_page_fault`` and ``kvm_faultin_pfn`` as the TDP MMU does, then takes
``mmu_lock`` for **write**: ``is_page_fault_stale``, ``make_mmu_pages_available``, and
``direct_map``, which walks from the root, creates missing shadow pages through the hash
(``kvm_mmu_get_child_sp`` + ``link_shadow_page``), installs the leaf (``mmu_set_spte``, entering it
in the rmap) and prefetches up to 8 neighbouring 4K SPTEs whose host pages are resident
(``direct_pte_prefetch``). Every vCPU's fault serializes on the lock, which is what the TDP MMU's
read lock removed.

Roots are shadow pages shared through the hash (``mmu_alloc_direct_roots``). A fast zap makes every
page obsolete by toggling ``mmu_valid_gen``; ``kvm_zap_obsolete_pages`` zaps them from the tail of
``active_mmu_pages`` in batches of 10, yielding ``mmu_lock`` between batches when others wait for
it, and commits (flush, then free) at the end. Dirty logging, MMU notifiers and aging reach the
SPTEs through the rmaps (``vsim.mmu.rmap_walks``).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

from vsim.dirty_log import mark_page_dirty_in_slot
from vsim.mmu.hugepage import kvm_mmu_hugepage_adjust
from vsim.mmu.mmio import make_mmio_spte
from vsim.mmu.mmu_page import KvmMmuPage
from vsim.mmu.page_fault import RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS, KvmPageFault
from vsim.mmu.rmap import RMAP_RECYCLE_THRESHOLD
from vsim.mmu.rmap_walks import RmapRangeOps
from vsim.mmu.shadow_page import KVM_REFILL_PAGES, ShadowMmu
from vsim.mmu.spte import (
    PFN_MASK,
    PFN_SHIFT,
    PG_LEVEL_4K,
    PT_WRITABLE,
    SPTE_HOST_WRITABLE,
    SPTE_MMU_PRESENT,
    TDP_ROOT_LEVEL,
    is_last_spte,
    is_shadow_present_pte,
    make_spte,
    pages_per_level,
    spte_index,
    spte_to_pfn,
)
from vsim.requests import kvm_flush_remote_tlbs

if TYPE_CHECKING:
    from vsim.memslots import Memslot
    from vsim.vcpu.vcpu import Vcpu
    from vsim.vm import Vm
    from vsim.vmm import Vmm

PTE_PREFETCH_NUM = 8
BATCH_ZAP_PAGES = 10


class LegacyMmu(RmapRangeOps, ShadowMmu):
    """The legacy MMU with TDP enabled: direct shadow pages for the EPT."""

    mode = "legacy_tdp"
    shared_range_ops = False  # rmap walks take mmu_lock for write

    def __init__(self, vm: Vm, initial_tables: int = 64) -> None:
        super().__init__(vm, initial_tables)
        c = vm.costs
        self._c_map = c.legacy_direct_map
        self._c_sp = c.sp_alloc
        self._c_prefetch = c.prefetch_spte

    def zaps_by_vcpus_possible(self, region_pages: int) -> bool:
        """Can a vCPU's fault zap shadow pages (``make_mmu_pages_available``)? Only if the pages
        mapping the region, twice over (old and new across a fast zap), could crowd the limit."""
        tables = region_pages // 512 + region_pages // (512 * 512) + 8
        return 2 * tables + 16 + KVM_REFILL_PAGES >= self.n_max_mmu_pages

    # -- roots -----------------------------------------------------------------------------------
    def alloc_root(self) -> KvmMmuPage:
        """``mmu_alloc_direct_roots``: the valid root of the direct role, shared by all vCPUs."""
        root = self.kvm_mmu_get_shadow_page(0, TDP_ROOT_LEVEL, True)
        root.root_count += 1
        return root

    def put_root(self, root: KvmMmuPage, vid: int, t: int) -> int:
        """``mmu_free_root_page``: drop a use; an invalid root goes with its last user (zap, flush,
        free). Returns the time the caller goes on."""
        root.root_count -= 1
        if root.root_count or not root.invalid:
            return t
        invalid: list[KvmMmuPage] = []
        self.kvm_mmu_prepare_zap_page(root, invalid, vid, t)
        return self.kvm_mmu_commit_zap_page(invalid, vid, t)

    def invalidate_all_roots(self) -> list[object]:
        """No TDP MMU roots: toggling ``mmu_valid_gen`` made every shadow page obsolete."""
        return []

    def kvm_zap_obsolete_pages(self, vmm: Vmm) -> Generator[object, object, None]:
        """Zap obsolete pages from the tail of ``active_mmu_pages`` (the oldest first; pages made
        after the toggle are at the head and end the walk), in batches of ``BATCH_ZAP_PAGES``
        with ``cond_resched_rwlock_write`` between them, then commit."""
        invalid: list[KvmMmuPage] = []
        batch = 0
        c = self.vm.costs
        for sp in list(self.active):  # oldest first
            if sp not in self.active or sp.role_invalid:
                continue  # zapped meanwhile (while the lock was dropped), or a root still in use
            if not sp.invalid:
                break  # pages made after the toggle: the rest of the list is newer still
            if batch >= BATCH_ZAP_PAGES and self.vm.mmu_lock.waiters:
                batch = 0
                yield from vmm.mmu_lock_release(write=True)
                yield from vmm.mmu_lock_acquire(write=True)
                if sp not in self.active:
                    continue
            visited = self.kvm_mmu_prepare_zap_page(sp, invalid, vmm.actor_id, vmm.now)
            vmm.now += visited * c.tdp_zap_spte
            batch += 1
        vmm.now = self.kvm_mmu_commit_zap_page(invalid, vmm.actor_id, vmm.now)

    # -- the fault -------------------------------------------------------------------------------
    def page_fault(self, v: Vcpu, fault: KvmPageFault) -> Generator[object, object, int]:
        """``direct_page_fault``, as a SimPy generator returning ``RET_PF_*``."""
        vm = self.vm
        r = self.fast_path_and_faultin(v, fault)
        if r is not None:
            return r
        if not (yield from self.lock_for_fault(v, fault, write=True)):
            return RET_PF_RETRY
        lock = vm.mmu_lock
        root = v.root
        v.now = self.make_mmu_pages_available(v.id, v.now)
        kvm_mmu_hugepage_adjust(fault)
        if vm.checker is not None and root.invalid:
            vm.checker.on_obsolete_install(v, fault.gfn)
        ret = self.direct_map(v, root, fault)  # type: ignore[arg-type]
        ev = v.sync()
        if ev is not None:
            yield ev
        lock.write_unlock(v.id, v.now)
        return ret

    def direct_map(self, v: Vcpu, root: KvmMmuPage, fault: KvmPageFault) -> int:
        """``direct_map`` under the write lock; advances ``v.now`` by the work done."""
        vm = self.vm
        vid = v.id
        t = v.now
        gfn = fault.gfn
        goal = fault.goal_level
        if vm.sink.all:
            vm.sink.emit("kvm_mmu_spte_requested", t, vid, gfn, fault.pfn, goal)
        work = self._c_map
        table, level = root.table, TDP_ROOT_LEVEL
        while level > goal:
            idx = spte_index(gfn, level)
            spte = self.spt.item(table, idx)
            if is_shadow_present_pte(spte) and not is_last_spte(spte, level):
                table, level = (spte & PFN_MASK) >> PFN_SHIFT, level - 1
                continue
            if is_shadow_present_pte(spte):  # drop_large_spte: a huge leaf above the goal
                self.drop_spte(table, idx, level, gfn & ~(pages_per_level(level) - 1), vid, t)
                t = kvm_flush_remote_tlbs(vm, t, me=vid)
            misses = vm.stat.mmu_cache_miss
            sp = self.kvm_mmu_get_shadow_page(gfn & ~(pages_per_level(level) - 1), level - 1, True)
            work += self._c_sp * (vm.stat.mmu_cache_miss - misses)
            self.link_shadow_page(table, idx, sp, vid, t)
            table, level = sp.table, level - 1
        ret, t = self.mmu_set_spte(v, table, goal, fault, t)
        if ret == RET_PF_FIXED and goal == PG_LEVEL_4K:
            work += self.direct_pte_prefetch(v, table, spte_index(gfn, goal), fault.slot, t)
        v.now = t + work
        return ret

    def mmu_set_spte(self, v: Vcpu, table: int, level: int, fault: KvmPageFault, t: int) -> tuple[int, int]:
        """``mmu_set_spte`` for the faulting gfn of a direct fault; returns ``(RET_PF_*, time)``."""
        return self.set_spte_at(v, table, spte_index(fault.gfn, level), level, fault.gfn, fault.slot, fault.pfn,
                                fault.map_writable, fault.write, t)  # fmt: skip

    def set_spte_at(self, v: Vcpu, table: int, idx: int, level: int, gfn: int, slot: Memslot | None, pfn: int,
                    writable: bool, write_fault: bool, t: int) -> tuple[int, int]:  # fmt: skip
        """``mmu_set_spte``: make the leaf at ``(table, idx)`` map ``gfn`` (an MMIO SPTE without a
        slot). ``writable`` is what the host page and the guest's access allow; ``make_spte`` may
        still withhold W (``make_spte_writable``), and a write fault then emulates. Returns
        ``(RET_PF_*, time)``."""
        vm = self.vm
        vid = v.id
        base = gfn & ~(pages_per_level(level) - 1)
        old = self.spt.item(table, idx)
        if slot is None:  # mark_mmio_spte
            new = make_mmio_spte(gfn, vm.memslots.generation)
            if new != old:
                self.set_spte(table, idx, level, base, old, new, vid, t)
                self.note_mmio_gfn(table, idx, gfn)
                v.stat.pf_mmio_spte_created += 1
            return RET_PF_EMULATE, t
        wrprot = writable and not self.make_spte_writable(v, gfn, level, old, t)
        new = make_spte(pfn & ~(pages_per_level(level) - 1), level, writable and not wrprot)
        if wrprot:  # the host page is writable; KVM may make the SPTE writable later
            new |= SPTE_HOST_WRITABLE
        was_rmapped = False
        if is_shadow_present_pte(old):
            if not is_last_spte(old, level):  # a page table replaced by a huge leaf
                child = self.sp_of[(old & PFN_MASK) >> PFN_SHIFT]
                child.parent_ptes.remove((table, idx))
                self.set_spte(table, idx, level, base, old, 0, vid, t)
                t = kvm_flush_remote_tlbs(vm, t, me=vid)
                old = 0
            elif spte_to_pfn(old) != spte_to_pfn(new) or self.sp_of[table].get_gfn(idx) != base:
                self.drop_spte(table, idx, level, self.sp_of[table].get_gfn(idx), vid, t)
                t = kvm_flush_remote_tlbs(vm, t, me=vid)
                old = 0
            else:
                was_rmapped = True
        ret = RET_PF_EMULATE if wrprot and write_fault else RET_PF_FIXED
        if old == new:
            return (ret if ret == RET_PF_EMULATE else RET_PF_SPURIOUS), t
        if new & PT_WRITABLE:
            mark_page_dirty_in_slot(slot, gfn)
        if was_rmapped:
            self.set_spte(table, idx, level, base, old, new, vid, t)
            if old & PT_WRITABLE and not new & PT_WRITABLE:  # mmu_spte_update says flush
                t = kvm_flush_remote_tlbs(vm, t, me=vid)
        elif self.set_leaf(self.rmap_of(slot), table, idx, level, base, new, vid, t) > RMAP_RECYCLE_THRESHOLD:
            t = self.rmap_recycle(slot, base, level, vid, t)
        self.note_mapped(base, level)
        return ret, t

    def make_spte_writable(self, v: Vcpu, gfn: int, level: int, old: int, t: int) -> bool:
        """``make_spte``'s check before it sets W: a direct MMU never shadows guest page tables."""
        return True

    def prefetch_writable(self, slot: Memslot, gfn: int) -> bool:
        """``make_spte`` for a prefetched SPTE: the same check, without unsyncing anything."""
        return True

    def note_mmio_gfn(self, table: int, idx: int, gfn: int) -> None:
        """Record the gfn of an MMIO SPTE in an indirect page (its entry index is by gva)."""
        gfns = self.sp_of[table].gfns
        if gfns is not None:
            gfns[idx] = gfn

    def direct_pte_prefetch(self, v: Vcpu, table: int, idx: int, slot: Memslot | None, t: int) -> int:
        """``direct_pte_prefetch``: map the non-present neighbours in the faulting SPTE's aligned
        block of 8 whose host pages are resident (each run stops at the first that is not).
        Not while an invalidation is in progress, nor in a dirty-logged slot. Returns the ns spent."""
        vm = self.vm
        if slot is None or vm.mmu_invalidate_in_progress or slot.dirty_bitmap is not None:
            return 0
        sp = self.sp_of[table]
        rmap = self.rmap_of(slot)
        done = 0
        run_ok = True
        first = idx & ~(PTE_PREFETCH_NUM - 1)
        for i in range(first, first + PTE_PREFETCH_NUM):
            if i == idx or self.spt.item(table, i) & SPTE_MMU_PRESENT:
                run_ok = True  # a run of non-present entries ends here
                continue
            gfn = sp.gfn + i
            if not run_ok or not slot.contains(gfn) or not slot.resident(gfn):
                run_ok = False
                continue
            new = make_spte(slot.gfn_to_pfn(gfn), PG_LEVEL_4K, self.prefetch_writable(slot, gfn), prefetch=True)
            self.set_leaf(rmap, table, i, PG_LEVEL_4K, gfn, new, v.id, t)
            self.note_mapped(gfn, PG_LEVEL_4K)
            done += 1
        return done * self._c_prefetch
