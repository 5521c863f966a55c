"""Page tables in one pool, shared by KVM's MMUs: the TDP MMU's and the legacy MMU's shadow pages.

Page tables live in a ``(tables, 512)`` int64 array of SPTEs, so the vCPUs' batched walks read them
directly. A non-leaf SPTE holds its child's pool index where KVM holds a physical address. This
module has what both MMUs do the same way: allocating and freeing tables, the lockless walks
(``walk_shadow_page_lockless`` / ``tdp_mmu_for_each_pte``), ``cmpxchg`` on an SPTE, and the
bookkeeping of every SPTE change (page stats, the tracepoint, and the invariant checks).
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Protocol

import numpy as np

from vsim.memslots import KVM_MEMSLOT_INVALID
from vsim.mmu.arch_mmu import NO_DESCS, NO_SPS, ArchMmuHandle
from vsim.mmu.fast_page_fault import fast_page_fault, page_fault_can_be_fast
from vsim.mmu.mmio import vcpu_cache_mmio_info
from vsim.mmu.mmu_page import SpsRef
from vsim.mmu.page_fault import RET_PF_EMULATE, RET_PF_INVALID, RET_PF_RETRY, KvmPageFault
from vsim.mmu.pte_list import DescsRef
from vsim.mmu.sp_pool import H_LOG, NO_STAT, PoolRef, SpPool, account_spte_change, note_mapped, note_zapped, sp_free
from vsim.mmu.spte import (
    PG_LEVEL_4K,
    SPTE_MMU_PRESENT,
)
from vsim.mmu.tdp_mmu_map import tdp_walk_to
from vsim.sched import Proc
from vsim.stats import ARRAY_STATS

if TYPE_CHECKING:
    from vsim.vcpu.kvm_vcpu import KvmVcpu
    from vsim.vm import Vm


class Root(Protocol):
    """What a vCPU holds as its root: the top table, and whether it is obsolete."""

    table: int

    @property
    def invalid(self) -> bool: ...


class PageTables:
    """The pool of page tables and the SPTE operations common to the MMUs."""

    pages_stat = ""  # the VM stat counting tables in use
    mmu_valid_gen = 0  # kvm->arch.mmu_valid_gen (the TDP MMU's roots do not read it)
    spte_event = ""  # the tracepoint logged for every SPTE change

    def __init__(self, vm: Vm, initial_tables: int = 64) -> None:
        self.vm = vm
        c = vm.costs
        self._c_fast = c.fast_page_fault
        self._c_faultin = c.faultin_present
        self._c_host = c.host_fault
        self._c_zero = c.zero_4k
        self._ad = vm.cfg.mmu.ept_ad
        self._locked_check = vm.cfg.host_mm.locked_retry_check  # False brings back R8
        self._root_check = vm.cfg.mmu.stale_root_check  # False brings back R3
        self._pre_lock_retry = vm.cfg.host_mm.pre_lock_retry and bool(vm.cfg.host_mm.invalidations)
        cfg = vm.cfg
        region_pages = cfg.vm.vcpus * (cfg.workload.per_vcpu_memory // 4096)
        self.pool = SpPool(vm.stat.counts, vm.region_base_gfn, region_pages, initial_tables)
        # Compiled operations log their SPTE changes only when something reads them.
        self.logging = vm.sink.all or vm.checker is not None
        self.pool.p.hdr[H_LOG] = self.logging
        self._stat = ARRAY_STATS.index(self.pages_stat)

    @cached_property
    def arch(self) -> ArchMmuHandle:
        """The MMU's arrays as one handle for compiled code (made on first use)."""
        return ArchMmuHandle(self)

    def arch_bundles(self) -> tuple[PoolRef, SpsRef, DescsRef]:
        """What ``arch`` holds: the pool, and no shadow pages (the TDP MMU)."""
        return self.pool.ref, NO_SPS, NO_DESCS

    # -- the pool's arrays (replaced when the pool grows: read them each time) --------------------
    @property
    def spt(self) -> np.ndarray:
        return self.pool.p.spt

    @property
    def sp_level(self) -> np.ndarray:
        return self.pool.p.sp_level

    @property
    def sp_gfn(self) -> np.ndarray:
        return self.pool.p.sp_gfn

    @property
    def sp_gen(self) -> np.ndarray:
        """Bumped whenever a table is freed or reused: a walk that remembers it can tell that the
        table it read is gone, where KVM's RCU-deferred free makes a late cmpxchg fail instead."""
        return self.pool.p.sp_gen

    @property
    def n_tables(self) -> int:
        return self.pool.n_tables

    # -- page-table pool -------------------------------------------------------------------------
    def alloc_sp(self, level: int, gfn: int, counted: bool = True) -> int:
        """A zeroed page table from the pool (``tdp_mmu_alloc_sp`` / ``kvm_mmu_alloc_shadow_page``);
        ``counted`` is False for the PAE root pages, which are not shadow pages."""
        return self.pool.alloc(level, gfn, self._stat if counted else NO_STAT)

    def _free_sp(self, table: int, counted: bool = True) -> None:
        sp_free(self.pool.p, table, self._stat if counted else NO_STAT)

    def note_zapped(self, gfn: int, level: int) -> None:
        """A zap unmapped a leaf: a later fault that maps these gfns again is a refault."""
        note_zapped(self.pool.p, gfn, level)

    def note_mapped(self, gfn: int, level: int) -> None:
        """A fault mapped a leaf: vsim's ``refaults`` counts it if a zap had unmapped it."""
        note_mapped(self.pool.p, gfn, level)

    def alloc_vcpu_root(self, v: KvmVcpu) -> Root:
        """The root a vCPU loads (``kvm_mmu_load``): the MMU's shared root of its role."""
        return self.alloc_root()  # type: ignore[attr-defined]

    def tlb_keys_of_gfn(self, gfn: int) -> list[tuple[int, int]]:
        """``(size_class, key)`` of every TLB entry that could translate to ``gfn``."""
        return [(c, gfn >> (9 * c)) for c in range(3)]

    # -- lockless walks --------------------------------------------------------------------------
    def walk_to(self, root: Root, gfn: int, goal: int) -> tuple[int, int, int, int]:
        """``kvm_tdp_mmu_map``'s walk (``tdp_walk_to``): down to ``goal`` at most, stopping early at
        a leaf, a non-present or a frozen entry."""
        return tdp_walk_to(self.spt, root.table, gfn, goal)

    def walk_last(self, root: Root, gfn: int) -> tuple[int, int, int, int]:
        """``tdp_mmu_for_each_pte`` down to ``gfn``'s leaf: ``(table, index, level, old_spte)`` of
        the last entry visited (a leaf, a non-present or a frozen entry)."""
        return self.walk_to(root, gfn, PG_LEVEL_4K)

    def fast_pf_get_last_sptep(self, root: Root, gfn: int) -> tuple[int, int, int, int]:
        """``kvm_tdp_mmu_fast_pf_get_last_sptep``: the last SPTE on the walk (under RCU only)."""
        return self.walk_last(root, gfn)

    def try_cmpxchg(self, table: int, idx: int, level: int, gfn: int, old: int, new: int, vcpu_id: int, t: int) -> bool:
        """``try_cmpxchg64`` on an SPTE; on success, ``handle_changed_spte``."""
        if self.spt.item(table, idx) != old:
            return False
        self.spt[table, idx] = new
        self.handle_changed_spte(gfn, old, new, level, vcpu_id, t)
        return True

    def set_spte(self, table: int, idx: int, level: int, gfn: int, old: int, new: int, actor: int, t: int) -> None:
        """``tdp_mmu_set_spte`` / a successful ``tdp_mmu_set_spte_atomic`` by an ``mmu_lock`` holder."""
        self.spt[table, idx] = new
        self.handle_changed_spte(gfn, old, new, level, actor, t)

    # -- SPTE changes ----------------------------------------------------------------------------
    def handle_changed_spte(self, gfn: int, old: int, new: int, level: int, vcpu_id: int, t: int) -> None:
        """``handle_changed_spte``: page stats, the tracepoint and the invariant checks."""
        account_spte_change(self.vm.stat.counts, old, new, level)
        self.spte_hooks(gfn, old, new, level, vcpu_id, t)

    def spte_hooks(self, gfn: int, old: int, new: int, level: int, actor: int, t: int) -> None:
        """What reads an SPTE change besides the page stats: the tracepoint and the checker."""
        vm = self.vm
        if vm.sink.all:
            vm.sink.emit(self.spte_event, t, actor, 0, gfn, level, old, new)
        if vm.checker is not None:
            vm.checker.on_spte_changed(gfn, old, new, level, t, actor)

    def replay_changes(self) -> None:
        """Hand the SPTE changes that compiled operations logged to ``spte_hooks``, in order."""
        for gfn, old, new, level, actor, t in self.pool.take_changes():
            self.spte_hooks(gfn, old, new, level, actor, t)

    # -- the front of a direct fault ----------------------------------------------------------------
    def fast_path_and_faultin(self, v: KvmVcpu, fault: KvmPageFault) -> int | None:
        """The part of a direct fault before ``mmu_lock``: ``fast_page_fault``, then
        ``kvm_faultin_pfn`` (snapshot ``mmu_invalidate_seq``, find the slot, resolve the pfn).
        Returns a ``RET_PF_*`` that ends the fault here, or ``None`` to go on under the lock."""
        # fast_page_fault, lockless (direct MMUs only).
        if page_fault_can_be_fast(fault, self._ad):
            r = fast_page_fault(self, v, fault)
            v.now += self._c_fast
            if r != RET_PF_INVALID:
                return r
        return self.kvm_faultin_pfn(v, fault)

    def kvm_faultin_pfn(self, v: KvmVcpu, fault: KvmPageFault) -> int | None:
        """``mmu_topup_memory_caches``, then ``kvm_faultin_pfn``: snapshot ``mmu_invalidate_seq``,
        find the slot, resolve the pfn. Returns a ``RET_PF_*`` that ends the fault here, or
        ``None`` to go on under the lock."""
        vm = self.vm
        gfn = fault.gfn
        fault.mmu_seq = vm.mmu_invalidate_seq
        slot = v.gfn_to_memslot(gfn)
        if slot is not None and slot.flags & KVM_MEMSLOT_INVALID and not vm.cfg.memslots.invalid_slot_retry:
            slot = None  # R2 brought back: the slot being deleted or moved is taken for no slot
        fault.slot = slot
        v.now += self._c_faultin
        if slot is None:
            # kvm_handle_noslot_fault: an MMIO gfn. Cache it; install an MMIO SPTE if caching is on.
            vcpu_cache_mmio_info(v, gfn, vm.memslots.generation)
            if not vm.cfg.memslots.mmio_caching:
                return RET_PF_EMULATE
        elif slot.flags & KVM_MEMSLOT_INVALID:
            return RET_PF_RETRY  # the slot is being deleted or moved (R2)
        else:
            # Before GUP and before mmu_lock: an invalidation of this gfn is pending (v6.8, R8).
            # (Only a host MM invalidates; without one the checks cannot fire.)
            pre = self._pre_lock_retry
            if pre and vm.mmu_invalidate_retry_gfn(fault.mmu_seq, gfn):
                return RET_PF_RETRY
            zeroed = slot.faultin(gfn)
            if zeroed and vm.uffd is not None:  # a missing page: a userfaultfd handler fills it
                v.now = vm.uffd.page_in(v.now)
                v.stat.host_page_allocs += 1
            elif zeroed:  # first touch: the host allocates and zeroes the backing page
                v.now += self._c_host + self._c_zero * zeroed
                v.stat.host_page_allocs += 1
            fault.pfn = slot.gfn_to_pfn(gfn)
            fault.map_writable = True
            if pre and vm.mmu_invalidate_retry_gfn(fault.mmu_seq, gfn):
                return RET_PF_RETRY
        return None

    def lock_mmu(self, v: KvmVcpu, write: bool) -> Proc[None]:
        """``write_lock``/``read_lock(&kvm->mmu_lock)`` at the vCPU's instant, waiting if contended."""
        ev = v.sync()
        if ev is not None:
            yield ev
        lock = self.vm.mmu_lock
        wait = (lock.write_lock if write else lock.read_lock)(v.id, v.now)
        if wait is not None:
            v.now = yield wait

    def lock_write(self, v: KvmVcpu) -> Proc[None]:
        """``write_lock(&kvm->mmu_lock)`` at the vCPU's instant."""
        yield from self.lock_mmu(v, write=True)

    def unlock_write(self, v: KvmVcpu) -> Proc[None]:
        """``write_unlock`` at the vCPU's instant."""
        ev = v.sync()
        if ev is not None:
            yield ev
        self.vm.mmu_lock.write_unlock(v.id, v.now)

    def lock_for_fault(self, v: KvmVcpu, fault: KvmPageFault, write: bool) -> Proc[bool]:
        """Take ``mmu_lock`` (read for the TDP MMU, write for shadow pages) at the vCPU's instant,
        then ``is_page_fault_stale`` (``fault_is_stale``). Returns False, with the lock dropped
        again, when the fault must retry."""
        yield from self.lock_mmu(v, write)
        return not self.fault_is_stale(v, fault, write)

    def fault_is_stale(self, v: KvmVcpu, fault: KvmPageFault, write: bool) -> bool:
        """``is_page_fault_stale`` just after ``mmu_lock`` was taken: an obsolete root, or an
        invalidation of the gfn since the snapshot. A stale fault drops the lock again."""
        vm = self.vm
        stale = self._root_check and v.root.invalid  # type: ignore[union-attr]
        if stale or (fault.slot is not None and self._locked_check
                     and vm.mmu_invalidate_retry_gfn(fault.mmu_seq, fault.gfn)):  # fmt: skip
            lock = vm.mmu_lock
            (lock.write_unlock if write else lock.read_unlock)(v.id, v.now)
            return True
        return False

    # -- inspection --------------------------------------------------------------------------------
    def count_leaves(self) -> dict[int, int]:
        """Present leaves per level over all roots' tables (for the invariant checker)."""
        counts = {1: 0, 2: 0, 3: 0}
        n = self.n_tables
        spt = self.spt[:n]
        present = (spt & SPTE_MMU_PRESENT) != 0
        live = np.ones(n, dtype=bool)
        live[self.pool.free_tables()] = False
        for level in (1, 2, 3):
            rows = (self.sp_level[:n] == level) & live
            if level == PG_LEVEL_4K:
                counts[1] = int(present[rows].sum())
            else:
                counts[level] = int((present[rows] & ((spt[rows] & (1 << 7)) != 0)).sum())
        return counts
