"""Shadow pages (``struct kvm_mmu_page``, spec §2): the legacy MMU's page tables and their lifecycle.

Each shadow page owns one page table of the pool and has a role (level, direct, access, ...).
Pages are found through ``mmu_page_hash`` (4096 buckets by gfn; several pages per gfn, one per
role), linked under parent SPTEs (``parent_ptes``), kept on ``active_mmu_pages`` (newest at the
head) and counted against ``n_max_mmu_pages``. Leaf SPTEs are entered in their memslot's rmap.

Zapping has two phases, as in KVM: ``kvm_mmu_prepare_zap_page`` clears the page's SPTEs (children
unlinked, leaves dropped from the rmaps), unlinks it from its parents and moves it to an invalid
list (a root still in use is only marked invalid); ``kvm_mmu_commit_zap_page`` flushes remote TLBs
and only then frees the pages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vsim.mmu.page_tables import PageTables
from vsim.mmu.rmap import rmap_add, rmap_entries, rmap_remove
from vsim.mmu.spte import (
    ACC_ALL,
    PFN_MASK,
    PFN_SHIFT,
    REMOVED_SPTE,
    SPTE_MMU_PRESENT,
    is_last_spte,
    make_nonleaf_spte,
    pages_per_level,
)
from vsim.requests import kvm_flush_remote_tlbs

if TYPE_CHECKING:
    from vsim.memslots import Memslot
    from vsim.vm import Vm

KVM_MMU_HASH_SHIFT = 12
GOLDEN_RATIO_64 = 0x61C8864680B583EB
KVM_MIN_FREE_MMU_PAGES = 5
KVM_REFILL_PAGES = 25
KVM_MIN_ALLOC_MMU_PAGES = 64
KVM_PERMILLE_MMU_PAGES = 20


def kvm_page_table_hashfn(gfn: int) -> int:
    """``hash_64(gfn, KVM_MMU_HASH_SHIFT)``."""
    return ((gfn * GOLDEN_RATIO_64) & ((1 << 64) - 1)) >> (64 - KVM_MMU_HASH_SHIFT)


@dataclass(eq=False)
class KvmMmuPage:
    """``struct kvm_mmu_page`` (the fields the simulation needs)."""

    table: int
    gfn: int
    level: int  # role.level
    direct: bool  # role.direct
    access: int  # role.access
    mmu_valid_gen: int
    vm: Vm = field(repr=False)
    root_count: int = 0
    role_invalid: bool = False  # role.invalid: zapped while still in use as a root
    parent_ptes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def invalid(self) -> bool:
        """Obsolete (``is_obsolete_sp``): zapped, or from before the last fast zap."""
        return self.role_invalid or self.mmu_valid_gen != self.vm.mmu_valid_gen

    def role(self) -> tuple[int, bool, int]:
        return (self.level, self.direct, self.access)


class ShadowMmu(PageTables):
    """What the legacy direct MMU and shadow paging share: shadow pages, the hash, rmaps."""

    pages_stat = "mmu_shadow_pages"
    spte_event = "kvm_mmu_set_spte"

    def __init__(self, vm: Vm, initial_tables: int = 64) -> None:
        super().__init__(vm, initial_tables)
        self.hash: list[list[KvmMmuPage]] = [[] for _ in range(1 << KVM_MMU_HASH_SHIFT)]
        self.active: dict[KvmMmuPage, None] = {}  # active_mmu_pages, oldest first
        self.sp_of: dict[int, KvmMmuPage] = {}  # page table -> its shadow page (sptep_to_sp)
        self.leaf_slot: dict[tuple[int, int], Memslot] = {}  # leaf SPTE -> the slot whose rmap has it
        self.n_used_mmu_pages = 0
        pages = sum(s.npages for s in vm.memslots.slots)
        # kvm_mmu_calculate_default_mmu_pages, unless the VMM set it (KVM_SET_NR_MMU_PAGES).
        default = max(pages * KVM_PERMILLE_MMU_PAGES // 1000, KVM_MIN_ALLOC_MMU_PAGES)
        self.n_max_mmu_pages = vm.cfg.mmu.nr_mmu_pages or default

    # -- finding and creating shadow pages -------------------------------------------------------
    def kvm_mmu_get_shadow_page(self, gfn: int, level: int, direct: bool, access: int = ACC_ALL) -> KvmMmuPage:
        """``kvm_mmu_get_shadow_page``: the valid page of this gfn and role, else a new one."""
        vm = self.vm
        bucket = self.hash[kvm_page_table_hashfn(gfn)]
        collisions = 0
        for sp in bucket:
            if sp.invalid:
                continue  # for_each_valid_sp skips obsolete pages
            if sp.gfn != gfn:
                collisions += 1
                continue
            if sp.role() == (level, direct, access):
                vm.stat.max_mmu_page_hash_collisions = max(vm.stat.max_mmu_page_hash_collisions, collisions)
                return sp
        vm.stat.max_mmu_page_hash_collisions = max(vm.stat.max_mmu_page_hash_collisions, collisions)
        vm.stat.mmu_cache_miss += 1
        sp = KvmMmuPage(self.alloc_sp(level, gfn), gfn, level, direct, access, vm.mmu_valid_gen, vm)
        bucket.append(sp)
        self.active[sp] = None  # the head of active_mmu_pages: the newest
        self.sp_of[sp.table] = sp
        self.n_used_mmu_pages += 1
        return sp

    def link_shadow_page(self, table: int, idx: int, sp: KvmMmuPage, actor: int, t: int) -> None:
        """``link_shadow_page``: point the parent SPTE at ``sp`` and record the parent."""
        old = self.spt.item(table, idx)
        self.set_spte(table, idx, sp.level + 1, sp.gfn, old, make_nonleaf_spte(sp.table), actor, t)
        sp.parent_ptes.append((table, idx))

    # -- leaves and rmaps ------------------------------------------------------------------------
    def set_leaf(self, slot: Memslot, table: int, idx: int, level: int, gfn: int, new: int, actor: int, t: int) -> int:
        """Install a leaf where none was and enter it in the rmap (``mmu_set_spte`` + ``rmap_add``).
        Returns the head's length after the add."""
        old = self.spt.item(table, idx)
        self.set_spte(table, idx, level, gfn, old, new, actor, t)
        self.leaf_slot[(table, idx)] = slot
        n = rmap_add(slot, gfn, level, (table, idx))
        self.vm.stat.max_mmu_rmap_size = max(self.vm.stat.max_mmu_rmap_size, n)
        return n

    def drop_spte(self, table: int, idx: int, level: int, gfn: int, actor: int, t: int) -> None:
        """``drop_spte``: clear a leaf and take it off its rmap."""
        old = self.spt.item(table, idx)
        self.set_spte(table, idx, level, gfn, old, 0, actor, t)
        slot = self.leaf_slot.pop((table, idx))
        rmap_remove(slot, gfn, level, (table, idx))
        self.vm.note_zapped(gfn, level)

    def rmap_recycle(self, slot: Memslot, gfn: int, level: int, actor: int, t: int) -> int:
        """Past ``RMAP_RECYCLE_THRESHOLD`` SPTEs on one head: zap them all, then flush."""
        for table, idx in rmap_entries(slot, gfn, level):
            self.drop_spte(table, idx, level, gfn, actor, t)
        self.vm.stat.mmu_recycled += 1
        return kvm_flush_remote_tlbs(self.vm, t, me=actor)

    # -- zapping -----------------------------------------------------------------------------------
    def kvm_mmu_prepare_zap_page(self, sp: KvmMmuPage, invalid_list: list[KvmMmuPage], actor: int, t: int) -> int:
        """``__kvm_mmu_prepare_zap_page``: clear ``sp``'s SPTEs, unlink it from its parents, and
        move it to ``invalid_list`` (a root in use stays, marked invalid). Returns entries visited."""
        vm = self.vm
        vm.stat.mmu_shadow_zapped += 1
        visited = 0
        span = pages_per_level(sp.level)
        for i in np.flatnonzero(self.spt[sp.table]).tolist():
            spte = self.spt.item(sp.table, i)
            visited += 1
            if not spte & SPTE_MMU_PRESENT or spte == REMOVED_SPTE:
                self.set_spte(sp.table, i, sp.level, sp.gfn + i * span, spte, 0, actor, t)  # MMIO
            elif is_last_spte(spte, sp.level):
                self.drop_spte(sp.table, i, sp.level, sp.gfn + i * span, actor, t)
            else:  # kvm_mmu_unlink_children: the child loses this parent
                child = self.sp_of[(spte & PFN_MASK) >> PFN_SHIFT]
                child.parent_ptes.remove((sp.table, i))
                self.set_spte(sp.table, i, sp.level, sp.gfn + i * span, spte, 0, actor, t)
        for table, idx in sp.parent_ptes:  # kvm_mmu_unlink_parents
            old = self.spt.item(table, idx)
            self.set_spte(table, idx, sp.level + 1, sp.gfn, old, 0, actor, t)
            visited += 1
        sp.parent_ptes.clear()
        if sp.root_count:
            sp.role_invalid = True
            self.active.pop(sp)
            self.active[sp] = None  # moved to the head: not revisited by the tail walk
        else:
            self._unhash(sp)
            invalid_list.append(sp)
        return visited

    def _unhash(self, sp: KvmMmuPage) -> None:
        self.hash[kvm_page_table_hashfn(sp.gfn)].remove(sp)
        self.active.pop(sp)
        self.n_used_mmu_pages -= 1

    def kvm_mmu_commit_zap_page(self, invalid_list: list[KvmMmuPage], actor: int, t: int) -> int:
        """``kvm_mmu_commit_zap_page``: flush remote TLBs, then free the pages. Returns the time
        the caller goes on (after the flush's acknowledgements)."""
        if not invalid_list:
            return t
        t = kvm_flush_remote_tlbs(self.vm, t, me=actor)
        for sp in invalid_list:
            del self.sp_of[sp.table]
            self._free_sp(sp.table)
        invalid_list.clear()
        return t

    def make_mmu_pages_available(self, actor: int, t: int) -> int:
        """``make_mmu_pages_available``: below ``KVM_MIN_FREE_MMU_PAGES`` free pages, zap the oldest
        pages that are not roots in use until ``KVM_REFILL_PAGES`` are free. Returns the time."""
        avail = self.n_max_mmu_pages - self.n_used_mmu_pages
        if avail >= KVM_MIN_FREE_MMU_PAGES:
            return t
        invalid: list[KvmMmuPage] = []
        want = KVM_REFILL_PAGES - avail
        visited = 0
        for sp in list(self.active):  # kvm_mmu_zap_oldest_mmu_pages: from the tail (oldest)
            if len(invalid) >= want:
                break
            if sp.root_count:
                continue
            visited += self.kvm_mmu_prepare_zap_page(sp, invalid, actor, t)
        self.vm.stat.mmu_recycled += len(invalid)
        t += visited * self.vm.costs.tdp_zap_spte
        return self.kvm_mmu_commit_zap_page(invalid, actor, t)

    # -- inspection --------------------------------------------------------------------------------
    def check_rmaps(self) -> list[str]:
        """Every leaf SPTE is on its gfn's rmap exactly once and every rmap entry is a present
        leaf of that gfn; every ``parent_ptes`` entry points at its child (spec §13)."""
        problems = []
        seen: set[tuple[int, int]] = set()
        for (table, idx), slot in self.leaf_slot.items():
            sp = self.sp_of[table]
            gfn = sp.gfn + idx * pages_per_level(sp.level)
            spte = self.spt.item(table, idx)
            if not (spte & SPTE_MMU_PRESENT) or not is_last_spte(spte, sp.level):
                problems.append(f"rmap holds a non-leaf at table {table} index {idx}")
            if rmap_entries(slot, gfn, sp.level).count((table, idx)) != 1:
                problems.append(f"gfn {gfn:#x} level {sp.level}: leaf not on its rmap once")
            seen.add((table, idx))
        for sp in self.sp_of.values():
            for i in np.flatnonzero(self.spt[sp.table]).tolist():
                spte = self.spt.item(sp.table, i)
                if spte & SPTE_MMU_PRESENT and is_last_spte(spte, sp.level) and (sp.table, i) not in seen:
                    problems.append(f"table {sp.table} index {i}: leaf missing from the rmaps")
            for table, idx in sp.parent_ptes:
                if (self.spt.item(table, idx) & PFN_MASK) >> PFN_SHIFT != sp.table:
                    problems.append(f"parent_ptes of table {sp.table} lists ({table}, {idx}), which points elsewhere")
        return problems

    def count_leaves(self) -> dict[int, int]:
        counts = {1: 0, 2: 0, 3: 0}
        for table, _ in self.leaf_slot:
            counts[int(self.sp_level[table])] += 1
        return counts
