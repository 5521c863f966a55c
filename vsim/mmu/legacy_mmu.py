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

from typing import TYPE_CHECKING

import numpy as np

from vsim.dirty_log import dirty_bit
from vsim.mmu.direct_map import (
    MS_DROP,
    MS_PREFETCHED,
    MS_SCANNED,
    MS_UNLINK,
    PTE_PREFETCH_NUM,
    direct_map,
    direct_pte_prefetch,
    mmu_set_spte,
)
from vsim.mmu.hugepage import kvm_mmu_hugepage_adjust
from vsim.mmu.mmio import make_mmio_spte
from vsim.mmu.mmu_page_view import KvmMmuPage
from vsim.mmu.page_fault import RET_PF_FIXED, RET_PF_RETRY, KvmPageFault
from vsim.mmu.page_tables import Root
from vsim.mmu.rmap_walks import RmapRangeOps
from vsim.mmu.shadow_page import KVM_REFILL_PAGES
from vsim.mmu.spte import (
    PG_LEVEL_4K,
    TDP_ROOT_LEVEL,
    pages_per_level,
    spte_index,
)
from vsim.sched import Proc

if TYPE_CHECKING:
    from vsim.memslots import Memslot
    from vsim.mmu.tdp_mmu import TdpRoot
    from vsim.vcpu.kvm_vcpu import KvmVcpu
    from vsim.vm import Vm
    from vsim.vmm import Vmm

BATCH_ZAP_PAGES = 10
NO_U8 = np.zeros(0, dtype=np.uint8)
NO_I64 = np.zeros(0, dtype=np.int64)
NO_I32 = np.zeros(0, dtype=np.int32)
# What direct_pte_prefetch reads of the faulting slot: (may prefetch, base gfn, end gfn, host offset, host
# pages resident, their new bases, host pfn base, host span shift, write-track counts).
PrefetchArgs = tuple[bool, int, int, int, np.ndarray, np.ndarray, int, int, np.ndarray]


class LegacyMmu(RmapRangeOps):
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

    def put_root(self, root: Root, vid: int, t: int) -> int:
        """``mmu_free_root_page``: drop a use; an invalid root goes with its last user (zap, flush,
        free). Returns the time the caller goes on."""
        assert isinstance(root, KvmMmuPage)
        root.root_count -= 1
        if root.root_count or not root.invalid:
            return t
        invalid: list[KvmMmuPage] = []
        self.kvm_mmu_prepare_zap_page(root, invalid, vid, t)
        return self.kvm_mmu_commit_zap_page(invalid, vid, t)

    def invalidate_all_roots(self) -> list[TdpRoot]:
        """No TDP MMU roots: toggling ``mmu_valid_gen`` made every shadow page obsolete."""
        return []

    def kvm_zap_obsolete_pages(self, vmm: Vmm) -> Proc[None]:
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
    def page_fault(self, v: KvmVcpu, fault: KvmPageFault) -> Proc[int]:
        """``direct_page_fault``, as a SimPy generator returning ``RET_PF_*``."""
        r = self.fast_path_and_faultin(v, fault)
        if r is not None:
            return r
        return (yield from self.page_fault_locked(v, fault))

    def page_fault_locked(self, v: KvmVcpu, fault: KvmPageFault) -> Proc[int]:
        """The fault from ``write_lock(mmu_lock)`` on (where a vCPU group member goes on in Python
        before taking the lock)."""
        if not (yield from self.lock_for_fault(v, fault, write=True)):
            return RET_PF_RETRY
        return (yield from self.page_fault_held(v, fault))

    def page_fault_held(self, v: KvmVcpu, fault: KvmPageFault) -> Proc[int]:
        """The fault from just after ``write_lock(mmu_lock)`` (where a vCPU group member holding
        the lock goes on in Python when the compiled loop cannot finish it): ``is_page_fault_stale``,
        ``make_mmu_pages_available``, ``direct_map``, ``write_unlock``."""
        vm = self.vm
        if self.fault_is_stale(v, fault, write=True):
            return RET_PF_RETRY
        root = v.root
        v.now = self.make_mmu_pages_available(v.id, v.now)
        kvm_mmu_hugepage_adjust(fault)
        if vm.checker is not None and root.invalid:  # type: ignore[union-attr]
            vm.checker.on_obsolete_install(v, fault.gfn)
        ret = self.direct_map(v, root, fault)  # type: ignore[arg-type]
        ev = v.sync()
        if ev is not None:
            yield ev
        vm.mmu_lock.write_unlock(v.id, v.now)
        return ret

    def direct_map(self, v: KvmVcpu, root: KvmMmuPage, fault: KvmPageFault) -> int:
        """``direct_map`` under the write lock, then ``direct_pte_prefetch`` (``vsim.mmu.direct_map``);
        advances ``v.now`` by the work done."""
        vm = self.vm
        vid = v.id
        t = v.now
        gfn = fault.gfn
        goal = fault.goal_level
        if vm.sink.all:
            vm.sink.emit("kvm_mmu_spte_requested", t, vid, gfn, fault.pfn, goal)
        slot = fault.slot
        mmio = make_mmio_spte(gfn, vm.memslots.generation) if slot is None else 0
        rmap = self.rmap_args(slot)
        bitmap, bit = dirty_bit(slot, gfn)
        pf = self._prefetch_args(slot)
        work = self._c_map
        scan = self.indirect  # a non-paging shadow guest: make_spte looks for pages to unsync
        while True:
            self.reserve(TDP_ROOT_LEVEL - goal, 1 + TDP_ROOT_LEVEL + PTE_PREFETCH_NUM)
            ret, status, dt, di, dl, dg, created, leaf, done = direct_map(
                self.arch.sync(), rmap, root.table, gfn, goal, mmio, fault.pfn, fault.map_writable, fault.write,
                bitmap, bit, scan, *pf, vid, t)  # fmt: skip
            self.replay_changes()
            work += self._c_sp * created
            if status & MS_SCANNED:
                scan = False
            if not status & (MS_DROP | MS_UNLINK):
                break
            t = self.drop_or_unlink(status, dt, di, dl, dg, vid, t)
        t = self.set_spte_done(v, status, slot, gfn & ~(pages_per_level(goal) - 1), goal, t)
        if status & MS_PREFETCHED:
            work += done * self._c_prefetch
        elif ret == RET_PF_FIXED and goal == PG_LEVEL_4K:  # after the flush or recycle it needed
            work += self.direct_pte_prefetch(v, leaf, spte_index(gfn, goal), slot, t)
        v.now = t + work
        return int(ret)

    def _prefetch_args(self, slot: Memslot | None) -> PrefetchArgs:
        """What ``direct_pte_prefetch`` reads of the faulting slot, and whether it may run at all:
        not without a slot, while an invalidation is in progress, or in a dirty-logged slot."""
        if slot is None:
            return False, 0, 0, 0, NO_U8, NO_I64, 0, 0, NO_I32
        host = slot.host
        ok = not self.vm.mmu_invalidate_in_progress and slot.dirty_bitmap is None
        return (ok, slot.base_gfn, slot.end_gfn, slot.host_offset, host.resident, host.new_base, host.pfn_base,
                host.span_shift, slot.write_track)  # fmt: skip

    def set_spte_at(self, v: KvmVcpu, table: int, idx: int, level: int, gfn: int, slot: Memslot | None, pfn: int,
                    writable: bool, write_fault: bool, t: int) -> tuple[int, int]:  # fmt: skip
        """``mmu_set_spte`` (``vsim.mmu.direct_map``): make the leaf at ``(table, idx)`` map ``gfn``
        (an MMIO SPTE without a slot). ``writable`` is what the host page and the guest's access
        allow; ``make_spte`` may still withhold W (``make_spte_writable``), and a write fault then
        emulates. Returns ``(RET_PF_*, time)``."""
        vm = self.vm
        mmio = make_mmio_spte(gfn, vm.memslots.generation) if slot is None else 0
        old = self.spt.item(table, idx)
        wrprot = slot is not None and writable and not self.make_spte_writable(v, gfn, level, old, t)
        rmap = self.rmap_args(slot)
        bitmap, bit = dirty_bit(slot, gfn)
        while True:
            self.reserve(0, 1)
            ret, status, dt, di, dl, dg = mmu_set_spte(self.arch.sync(), rmap, table, idx, level, gfn, mmio, pfn,
                                                       writable, wrprot, write_fault, bitmap, bit, v.id, t)  # fmt: skip
            self.replay_changes()
            if not status & (MS_DROP | MS_UNLINK):
                break
            t = self.drop_or_unlink(status, dt, di, dl, dg, v.id, t)
        return int(ret), self.set_spte_done(v, status, slot, gfn & ~(pages_per_level(level) - 1), level, t)

    def make_spte_writable(self, v: KvmVcpu, gfn: int, level: int, old: int, t: int) -> bool:
        """``make_spte``'s check before it sets W: a direct MMU never shadows guest page tables."""
        return True

    def direct_pte_prefetch(self, v: KvmVcpu, table: int, idx: int, slot: Memslot | None, t: int) -> int:
        """``direct_pte_prefetch`` (``vsim.mmu.direct_map``) on its own: map the non-present
        neighbours in the faulting SPTE's aligned block of 8 whose host pages are resident.
        Returns the ns spent."""
        pf = self._prefetch_args(slot)
        if not pf[0]:
            return 0
        self.reserve(0, PTE_PREFETCH_NUM)
        done = direct_pte_prefetch(self.arch.sync(), self.rmap_args(slot), table, idx, *pf[1:], self.indirect, v.id,
                                   t)  # fmt: skip
        self.replay_changes()
        return int(done) * self._c_prefetch
