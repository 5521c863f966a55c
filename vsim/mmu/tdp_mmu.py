"""The TDP MMU (``arch/x86/kvm/mmu/tdp_mmu.c``): 512-entry EPT page tables shared by all vCPUs.

Page tables live in one pool, a ``(tables, 512)`` int64 array of SPTEs, so the vCPUs' batched walks
read them directly. A non-leaf SPTE holds its child's pool index where KVM holds a physical address.

Faults run ``kvm_tdp_mmu_page_fault`` under ``read_lock(mmu_lock)``. ``kvm_tdp_mmu_map`` reads the
path (``iter->old_spte`` at each level) when it starts and installs with cmpxchg when its work is
done, ``tdp_mmu_map`` time later. If another vCPU changed an entry in between, the cmpxchg fails and
the fault returns ``RET_PF_RETRY``; if the entry already held the SPTE this fault would make, the
fault is ``RET_PF_SPURIOUS``. That is how two vCPUs faulting the same gfn end in KVM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vsim.dirty_log import dirty_bit
from vsim.mmu.hugepage import kvm_mmu_hugepage_adjust
from vsim.mmu.mmio import make_mmio_spte
from vsim.mmu.page_fault import (
    RET_PF_EMULATE,
    RET_PF_RETRY,
    KvmPageFault,
)
from vsim.mmu.page_tables import Root
from vsim.mmu.spte import (
    REMOVED_SPTE,
    SPTE_ENT_PER_PAGE,
    SPTE_MMU_PRESENT,
    TDP_ROOT_LEVEL,
    is_last_spte,
    is_shadow_present_pte,
    make_spte,
    pages_per_level,
    spte_to_pfn,
)
from vsim.mmu.tdp_mmu_map import count_entries, tdp_mmu_map_install, tdp_zap_table
from vsim.mmu.tdp_range_ops import TdpRangeOps
from vsim.requests import kvm_flush_remote_tlbs
from vsim.sched import Proc

if TYPE_CHECKING:
    from vsim.vcpu.kvm_vcpu import KvmVcpu
    from vsim.vm import Vm
    from vsim.vmm import Vmm

FaultGen = Proc[int]


@dataclass(eq=False)
class TdpRoot:
    """A TDP MMU root: ``kvm_mmu_page`` with ``tdp_mmu_page`` set and a refcount."""

    table: int
    as_id: int = 0
    refcount: int = 2  # one for the vCPU that allocated it, one for the TDP MMU itself
    invalid: bool = False


class TdpMmu(TdpRangeOps):
    """The VM's TDP MMU: ``kvm->arch.tdp_mmu_roots`` and their page tables."""

    mode = "tdp_mmu"
    shared_range_ops = True  # slot-wide write protection, splitting and recovery take the read lock
    pages_stat = "tdp_mmu_pages"
    spte_event = "kvm_tdp_mmu_spte_changed"

    def __init__(self, vm: Vm, initial_tables: int = 64) -> None:
        super().__init__(vm, initial_tables)
        self.roots: list[TdpRoot] = []
        c = vm.costs
        self._c_map = c.tdp_mmu_map
        self._c_sp = c.sp_alloc
        self._c_split = c.tdp_split_spte

    # -- roots -----------------------------------------------------------------------------------
    def alloc_root(self, as_id: int = 0) -> TdpRoot:
        """``kvm_tdp_mmu_alloc_root``: reuse a valid root of the same role, else allocate one
        (refcount 2)."""
        for root in self.roots:
            if not root.invalid and root.as_id == as_id:
                root.refcount += 1
                return root
        root = TdpRoot(table=self.alloc_sp(TDP_ROOT_LEVEL, 0), as_id=as_id)
        self.roots.append(root)
        return root

    def put_root(self, root: Root, vid: int, t: int) -> int:
        """``kvm_tdp_mmu_put_root``: drop a reference; the last one frees the (zapped) root.
        Returns the time the caller goes on (no flush: the root is already unused)."""
        assert isinstance(root, TdpRoot)
        root.refcount -= 1
        if root.refcount == 0:
            self.roots.remove(root)
            self._zap_table(root.table, vid, t)
        return t

    def invalidate_all_roots(self) -> list[TdpRoot]:
        """``kvm_tdp_mmu_invalidate_all_roots``: mark every valid root invalid (and scheduled to be
        zapped)."""
        invalid = [r for r in self.roots if not r.invalid]
        for r in invalid:
            r.invalid = True
        return invalid

    def kvm_zap_obsolete_pages(self, vmm: Vmm) -> Proc[None]:
        """The TDP MMU puts no pages on ``active_mmu_pages``: nothing to zap there."""
        return
        yield

    def zap_root(self, root: TdpRoot, vid: int, t: int) -> int:
        """``tdp_mmu_zap_root``: clear every SPTE under an invalidated root, bottom-up (no flush:
        every vCPU flushes when it loads a new root). Returns the entries visited. The child
        tables go back to the pool; the root table goes when its last reference does."""
        return self._zap_table(root.table, vid, t, free=False)

    def _zap_table(self, table: int, vid: int, t: int, free: bool = True) -> int:
        if self.logging:
            self.pool.reserve_changes(count_entries(self.pool.ref, table))
        visited = tdp_zap_table(self.pool.ref, table, self._stat, free, vid, t)
        self.replay_changes()
        return int(visited)

    # -- the fault -------------------------------------------------------------------------------
    def page_fault(self, v: KvmVcpu, fault: KvmPageFault) -> FaultGen:
        """``kvm_tdp_mmu_page_fault`` (spec §1.4), as a SimPy generator returning ``RET_PF_*``."""
        # 1-4. page tracking (nothing is write-tracked without shadow pages), fast_page_fault,
        # mmu_topup_memory_caches and kvm_faultin_pfn.
        r = self.fast_path_and_faultin(v, fault)
        if r is not None:
            return r
        return (yield from self.page_fault_locked(v, fault))

    def page_fault_locked(self, v: KvmVcpu, fault: KvmPageFault) -> FaultGen:
        """The fault from ``read_lock(mmu_lock)`` on (where a vCPU group member that found the lock
        contended goes on in Python)."""
        vm = self.vm
        gfn = fault.gfn
        # 5-6. read_lock(mmu_lock), is_page_fault_stale.
        if not (yield from self.lock_for_fault(v, fault, write=False)):
            return RET_PF_RETRY
        lock = vm.mmu_lock
        root = v.root
        assert root is not None
        # 8. kvm_tdp_mmu_map: read the path now, install after the map work.
        kvm_mmu_hugepage_adjust(fault)
        last = self.walk_to(root, gfn, fault.goal_level)
        table_gen = self.sp_gen.item(last[0])
        level = last[2]
        new_tables = level - fault.goal_level if level > fault.goal_level and last[3] != REMOVED_SPTE else 0
        v.now += self._c_map + self._c_sp * new_tables
        if new_tables and last[3] & SPTE_MMU_PRESENT:  # splitting a huge leaf fills each new table
            v.now += self._c_split * SPTE_ENT_PER_PAGE * new_tables
        ev = v.sync()
        if ev is not None:
            yield ev
        if vm.checker is not None and root.invalid:
            vm.checker.on_obsolete_install(v, gfn)
        # A table freed since the walk (a zapped root's, reachable only without the R3 check)
        # takes no install: in KVM its entries are frozen and the cmpxchg fails.
        ret = self._map_install(v, fault, last) if self.sp_gen.item(last[0]) == table_gen else RET_PF_RETRY
        lock.read_unlock(v.id, v.now)
        return ret

    def _map_install(self, v: KvmVcpu, fault: KvmPageFault, last: tuple[int, int, int, int]) -> int:
        """The cmpxchg half of ``kvm_tdp_mmu_map`` (``tdp_mmu_map_install``) against the entry its
        walk ended at earlier; then the flush a collapsed page table needs."""
        table, idx, level, old = last
        vid = v.id
        t = v.now
        gfn = fault.gfn
        goal = fault.goal_level
        if old == REMOVED_SPTE:
            return RET_PF_RETRY
        vm = self.vm
        vm.mmu_lock.lockdep_assert_held(vid, write=False)  # tdp_mmu_set_spte_atomic
        if vm.sink.all:
            vm.sink.emit("kvm_mmu_spte_requested", t, vid, gfn, fault.pfn, goal)
        slot = fault.slot
        if slot is None:
            # The generation is read now, at install: later than the memslot lookup (R1's window).
            new = make_mmio_spte(gfn, vm.memslots.generation)
        else:
            # The pfn resolved before the lock: only the locked retry check makes it safe to use.
            new = make_spte(fault.pfn & ~(pages_per_level(goal) - 1), goal, fault.map_writable)
        bitmap, bit = dirty_bit(slot, gfn)
        self.pool.reserve(level - goal)
        if self.logging:
            collapsing = level == goal and is_shadow_present_pte(old) and not is_last_spte(old, goal)
            removed = count_entries(self.pool.ref, spte_to_pfn(old)) if collapsing else 0
            self.pool.reserve_changes(level - goal + 1 + removed)
        ret, leaves = tdp_mmu_map_install(self.pool.ref, self._stat, table, idx, level, old, gfn, goal, new,
                                          slot is None, bitmap, bit, vid, t)  # fmt: skip
        self.replay_changes()
        if leaves:  # kvm_flush_remote_tlbs_gfn for the translations it held (x86 flushes everything)
            v.now = kvm_flush_remote_tlbs(vm, t, me=vid)
        if ret == RET_PF_EMULATE:
            v.stat.pf_mmio_spte_created += 1
        return int(ret)
