"""The TDP MMU's operations on gfn ranges (``tdp_mmu.c``, spec §8.5–8.6).

Each helper walks every valid root over a gfn range and changes SPTEs in place; the caller holds
``mmu_lock`` in the kernel's mode, charges the time for the entries visited and issues any TLB
flush (the helpers return whether one is needed, as KVM's return ``flush``). The changes of one
call land at the caller's instant; callers walk a slot one page table (512 gfns) at a time so that
time passes between the pieces as it does in the kernel.

* ``tdp_mmu_zap_leafs`` (MMU-notifier unmap): clear the leaves in the range.
* ``kvm_tdp_mmu_age_gfn_range`` / ``test_age_gfn`` (MMU-notifier aging): clear or test A.
* ``kvm_tdp_mmu_wrprot_slot``: clear W on leaves at or above a level (enable dirty logging).
* ``kvm_tdp_mmu_clear_dirty_pt_masked`` with ``wrprot``: clear W on the 4K leaves of a bitmap mask.
* ``kvm_tdp_mmu_write_protect_gfn``: clear W and MMU-writable on the leaves mapping one gfn.
* ``kvm_tdp_mmu_try_split_huge_pages``: eager splitting, each huge leaf replaced by a page table of
  leaves with the same translation (no flush needed).
* ``kvm_tdp_mmu_recover_huge_pages`` (6.13+): a page table under a level the slot may now map huge
  becomes a huge leaf again (a flush is needed); ``kvm_tdp_mmu_zap_collapsible_sptes`` (before)
  zaps it instead, with a flush per zap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vsim.mmu.hugepage import kvm_mmu_max_mapping_level
from vsim.mmu.page_tables import PageTables
from vsim.mmu.spte import (
    PFN_MASK,
    PFN_SHIFT,
    PG_LEVEL_4K,
    PT_PAGE_SIZE,
    PT_WRITABLE,
    REMOVED_SPTE,
    SPTE_DIRTY,
    SPTE_ENT_PER_PAGE,
    SPTE_MMU_PRESENT,
    SPTE_MMU_WRITABLE,
    age_spte,
    is_last_spte,
    make_nonleaf_spte,
    pages_per_level,
    spte_is_young,
)
from vsim.mmu.tdp_mmu_map import count_entries, handle_removed_pt, tdp_range_entries, tdp_split_huge_page

if TYPE_CHECKING:
    from vsim.memslots import Memslot
    from vsim.mmu.tdp_mmu import TdpRoot


Collapsible = tuple[int, int, int, int, int, int]  # (table, index, level, gfn, spte, first leaf)


class TdpRangeOps(PageTables):
    """The range operations, the layer of ``TdpMmu`` over the pool (they walk ``self.roots``)."""

    roots: list[TdpRoot]  # kvm->arch.tdp_mmu_roots (TdpMmu sets it)

    def handle_removed_pt(self, table: int, gfn: int, vid: int, t: int) -> int:
        """``handle_removed_pt`` (``vsim.mmu.tdp_mmu_map``): the present leaves the table held."""
        if self.logging:
            self.pool.reserve_changes(count_entries(self.pool.ref, table))
        leaves = handle_removed_pt(self.pool.ref, table, gfn, self._stat, vid, t)
        self.replay_changes()
        return int(leaves)

    def _entries(self, start: int, end: int) -> list[list[int]]:
        """``(table, index, level, gfn, spte)`` of every present entry overlapping ``[start, end)``
        in every valid root, parents before children (``for_each_tdp_pte``: ``tdp_range_entries``).
        The list is read before the caller changes anything, as each operation's walk would."""
        roots = np.array([r.table for r in self.roots if not r.invalid], dtype=np.int64)
        return tdp_range_entries(self.spt, roots, start, end).tolist()

    def zap_leafs(self, start: int, end: int, actor: int, t: int) -> tuple[int, bool]:
        """``tdp_mmu_zap_leafs``: clear every leaf overlapping ``[start, end)`` (page tables stay).
        Returns ``(entries visited, flush needed)``."""
        self.vm.mmu_lock.lockdep_assert_held(actor, write=True)  # tdp_mmu_zap_leafs
        visited = 0
        flush = False
        for table, i, level, gfn, spte in self._entries(start, end):
            visited += 1
            if is_last_spte(spte, level):
                self.set_spte(table, i, level, gfn, spte, 0, actor, t)
                self.note_zapped(gfn, level)
                flush = True
        return visited, flush

    def age_gfn(self, gfn: int, actor: int, t: int) -> tuple[int, bool]:
        """``kvm_tdp_mmu_age_gfn_range`` for one gfn: clear A on the leaf mapping it. Returns
        ``(entries visited, whether it was young)``."""
        visited = 0
        young = False
        ad = self.vm.cfg.mmu.ept_ad
        for table, i, level, g, spte in self._entries(gfn, gfn + 1):
            visited += 1
            if is_last_spte(spte, level) and spte_is_young(spte, ad):
                self.set_spte(table, i, level, g, spte, age_spte(spte, ad), actor, t)
                young = True
        return visited, young

    def test_age_gfn(self, gfn: int) -> tuple[int, bool]:
        """``kvm_tdp_mmu_test_age_gfn``: whether the leaf mapping ``gfn`` has A set."""
        visited = 0
        young = False
        ad = self.vm.cfg.mmu.ept_ad
        for _, _, level, _, spte in self._entries(gfn, gfn + 1):
            visited += 1
            young = young or (is_last_spte(spte, level) and spte_is_young(spte, ad))
        return visited, young

    def wrprot_range(
        self, start: int, end: int, min_level: int, clear_mmu_writable: bool, actor: int, t: int
    ) -> tuple[int, bool]:
        """``kvm_tdp_mmu_wrprot_slot`` (and, with ``clear_mmu_writable``, ``write_protect_gfn``):
        clear W on leaves at or above ``min_level``. Returns ``(entries visited, flush needed)``."""
        self.vm.mmu_lock.lockdep_assert_held(actor, write=None)  # kvm_lockdep_assert_mmu_lock_held(kvm, shared)
        mask = PT_WRITABLE | (SPTE_MMU_WRITABLE if clear_mmu_writable else 0)
        visited = 0
        flush = False
        for table, i, level, gfn, spte in self._entries(start, end):
            visited += 1
            if level < min_level or not is_last_spte(spte, level) or not spte & mask:
                continue
            # Dirty logging leaves MMU-writable set, so the next write is fixed by fast_page_fault.
            self.set_spte(table, i, level, gfn, spte, spte & ~mask, actor, t)
            flush = flush or bool(spte & PT_WRITABLE) or clear_mmu_writable
        return visited, flush

    def clear_dirty_pt_masked(self, gfns: np.ndarray, pml: bool, actor: int, t: int) -> tuple[int, bool]:
        """``kvm_tdp_mmu_clear_dirty_pt_masked``: clear W (``wrprot``, no PML) or D (PML) on the 4K
        leaves mapping ``gfns`` (sorted). Huge leaves are left to the caller's 2M write protection."""
        self.vm.mmu_lock.lockdep_assert_held(actor, write=True)  # kvm_tdp_mmu_clear_dirty_pt_masked
        visited = 0
        flush = False
        if not len(gfns):
            return 0, False
        bit = SPTE_DIRTY if pml else PT_WRITABLE
        wanted = set(gfns.tolist())
        for table, i, level, gfn, spte in self._entries(int(gfns[0]), int(gfns[-1]) + 1):
            if level != PG_LEVEL_4K or gfn not in wanted:
                continue
            visited += 1
            if spte & bit:
                self.set_spte(table, i, level, gfn, spte, spte & ~bit, actor, t)
                flush = True
        return visited, flush

    def clear_dirty_range(self, start: int, end: int, actor: int, t: int) -> tuple[int, bool]:
        """``kvm_tdp_mmu_clear_dirty_slot`` on 4K leaves (PML): clear D so the next write is logged."""
        self.vm.mmu_lock.lockdep_assert_held(actor, write=None)  # (shared or exclusive, as the caller took it)
        visited = 0
        flush = False
        for table, i, level, gfn, spte in self._entries(start, end):
            visited += 1
            if level == PG_LEVEL_4K and spte & SPTE_DIRTY:
                self.set_spte(table, i, level, gfn, spte, spte & ~SPTE_DIRTY, actor, t)
                flush = True
        return visited, flush

    def try_split_huge_pages(self, start: int, end: int, target_level: int, actor: int, t: int) -> int:
        """``kvm_tdp_mmu_try_split_huge_pages``: split every huge leaf above ``target_level`` in the
        range, recursively (1G → 2M → 4K), filling each child table before linking it. Returns the
        SPTEs created."""
        self.vm.mmu_lock.lockdep_assert_held(actor, write=None)  # kvm_lockdep_assert_mmu_lock_held(kvm, shared)
        created = 0
        for table, i, level, gfn, spte in self._entries(start, end):
            if level > target_level and is_last_spte(spte, level):
                created += self._split(table, i, level, gfn, spte, (start, end, target_level), actor, t)
        return created

    def _split(
        self, table: int, i: int, level: int, gfn: int, spte: int, goal: tuple[int, int, int], actor: int, t: int
    ) -> int:
        """Split one huge leaf; then its children that overlap ``[start, end)`` above the target."""
        start, end, target = goal
        self.pool.reserve(1)
        child = int(tdp_split_huge_page(self.pool.ref, spte, level, gfn, self._stat))
        self.set_spte(table, i, level, gfn, spte, make_nonleaf_spte(child), actor, t)
        created = SPTE_ENT_PER_PAGE
        if level - 1 > target:
            span = pages_per_level(level - 1)
            for k in range(max(0, (start - gfn) // span), min(SPTE_ENT_PER_PAGE, -(-(end - gfn) // span))):
                created += self._split(child, k, level - 1, gfn + k * span, int(self.spt[child, k]), goal, actor, t)
        return created

    def _collapsible(
        self, slot: Memslot, start: int, end: int
    ) -> tuple[int, list[tuple[int, int, int, int, int, int]]]:
        """The entries visited, and the page tables under entries the slot may now map huge with a
        present leaf below them: ``(table, index, level, gfn, spte, first_leaf)``."""
        entries = self._entries(start, end)
        found: list[Collapsible] = []
        for table, i, level, gfn, spte in entries:
            if level == PG_LEVEL_4K or level > 3 or is_last_spte(spte, level):
                continue
            if self.spt.item(table, i) != spte:
                continue  # replaced while handling a parent
            if gfn < slot.base_gfn or gfn + pages_per_level(level) > slot.end_gfn:
                continue
            if kvm_mmu_max_mapping_level(slot, gfn, level) < level:
                continue
            small = self._first_leaf((spte & PFN_MASK) >> PFN_SHIFT, level - 1)
            if small is not None:
                found.append((table, i, level, gfn, spte, small))
        return len(entries), found

    def recover_huge_pages(self, slot: Memslot, start: int, end: int, actor: int, t: int) -> tuple[int, bool]:
        """``kvm_tdp_mmu_recover_huge_pages`` (6.13+): replace each collapsible page table by a huge
        leaf built from its first present leaf (``make_huge_spte``); the caller flushes once.
        Returns ``(entries visited, flush needed)``."""
        self.vm.mmu_lock.lockdep_assert_held(actor, write=None)  # (shared or exclusive, as the caller took it)
        visited, found = self._collapsible(slot, start, end)
        for table, i, level, gfn, spte, small in found:
            span_mask = pages_per_level(level) - 1
            pfn = ((small & PFN_MASK) >> PFN_SHIFT) & ~span_mask
            huge = (small & ~PFN_MASK) | (pfn << PFN_SHIFT) | PT_PAGE_SIZE
            self.set_spte(table, i, level, gfn, spte, huge, actor, t)
            self.handle_removed_pt((spte & PFN_MASK) >> PFN_SHIFT, gfn, actor, t)
        return visited, bool(found)

    def zap_collapsible_sptes(self, slot: Memslot, start: int, end: int, actor: int, t: int) -> tuple[int, int]:
        """``kvm_tdp_mmu_zap_collapsible_sptes`` (before 6.13): zap each collapsible page table
        (later faults map huge again); the caller flushes once per zap. Returns ``(entries visited,
        page tables zapped)``."""
        visited, found = self._collapsible(slot, start, end)
        for table, i, level, gfn, spte, _ in found:
            self.set_spte(table, i, level, gfn, spte, 0, actor, t)
            self.handle_removed_pt((spte & PFN_MASK) >> PFN_SHIFT, gfn, actor, t)
            self.note_zapped(gfn, level)
        return visited, len(found)

    def _first_leaf(self, table: int, level: int) -> int | None:
        for i in np.flatnonzero(self.spt[table]).tolist():
            spte = int(self.spt[table, i])
            if not spte & SPTE_MMU_PRESENT or spte == REMOVED_SPTE:
                continue
            if is_last_spte(spte, level):
                return spte
            found = self._first_leaf((spte & PFN_MASK) >> PFN_SHIFT, level - 1)
            if found is not None:
                return found
        return None
