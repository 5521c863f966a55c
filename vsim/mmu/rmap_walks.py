"""The legacy MMU's range operations through the rmaps (``walk_slot_rmaps``,
``kvm_handle_gfn_range``; spec §3, §8.6, §10): the counterparts of ``TdpRangeOps``.

Each walks the rmap heads of the gfns in a range, level by level, under the **write** lock (the
legacy MMU has no shared-lock walks), and returns what it visited and whether a flush is needed:

* ``kvm_zap_rmap`` (MMU-notifier unmap), ``kvm_age_rmap`` / ``kvm_test_age_rmap`` (aging);
* ``slot_rmap_write_protect`` and ``rmap_write_protect`` (W, and MMU-writable when protecting for
  the 2M pages around a dirty mask), ``kvm_mmu_write_protect_pt_masked`` /
  ``kvm_mmu_clear_dirty_pt_masked`` (4K heads of a mask), ``__rmap_clear_dirty`` (PML);
* ``kvm_shadow_mmu_try_split_huge_pages``: each huge leaf becomes a shadow page of leaves with the
  same translation, entered in the rmaps, then linked in place of the huge SPTE (no flush);
* ``kvm_rmap_zap_collapsible_sptes``: on disabling dirty logging, zap the leaves of pages that the
  slot could now map at a higher level (the faults that follow map huge again).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from vsim.mmu.hugepage import kvm_mmu_max_mapping_level
from vsim.mmu.pte_list import iter_pte_list
from vsim.mmu.rmap import gfn_to_rmap_index
from vsim.mmu.shadow_page import ShadowMmu
from vsim.mmu.spte import (
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT_WRITABLE,
    SPTE_DIRTY,
    SPTE_ENT_PER_PAGE,
    SPTE_MMU_WRITABLE,
    age_spte,
    make_huge_page_split_spte,
    pages_per_level,
    spte_is_young,
)

if TYPE_CHECKING:
    from vsim.memslots import Memslot

RmapSpte = tuple[int, int, int, int]  # (table, index, level, gfn)


class RmapRangeOps(ShadowMmu):
    """The range operations over the rmaps, the layer of ``LegacyMmu`` over the shadow pages."""

    _flush_on_mmu_writable = True

    def _rmap_sptes(self, start: int, end: int, level: int) -> Iterator[RmapSpte]:
        """The SPTEs on the heads for ``[start, end)`` at ``level``, in every overlapping slot."""
        for slot in self.vm.memslots.slots:
            lo, hi = max(start, slot.base_gfn), min(end, slot.end_gfn)
            if lo >= hi:
                continue
            heads = slot.rmap[level - 1]
            first = gfn_to_rmap_index(slot, lo, level)
            for i in (np.flatnonzero(heads[first : gfn_to_rmap_index(slot, hi - 1, level) + 1]) + first).tolist():
                for table, idx in iter_pte_list(self.descs.d, heads, i):
                    yield table, idx, level, self.sp_of[table].get_gfn(idx)

    def _all_levels(self, start: int, end: int, min_level: int = PG_LEVEL_4K) -> list[RmapSpte]:
        return [s for level in range(min_level, PG_LEVEL_1G + 1) for s in self._rmap_sptes(start, end, level)]

    def _clear_bits(self, sptes: list[RmapSpte], bits: int, actor: int, t: int) -> bool:
        changed = False
        for table, idx, level, gfn in sptes:
            old = self.spt.item(table, idx)
            if old & bits:
                self.set_spte(table, idx, level, gfn, old, old & ~bits, actor, t)
                changed = True
        return changed

    def zap_leafs(self, start: int, end: int, actor: int, t: int) -> tuple[int, bool]:
        """``kvm_zap_rmap`` over the range (``kvm_unmap_gfn_range``)."""
        self.vm.mmu_lock.lockdep_assert_held(actor, write=True)  # __walk_slot_rmaps / kvm_unmap_gfn_range
        sptes = self._all_levels(start, end)
        for table, idx, level, gfn in sptes:
            self.drop_spte(table, idx, level, gfn, actor, t)
        return len(sptes), bool(sptes)

    def age_gfn(self, gfn: int, actor: int, t: int) -> tuple[int, bool]:
        """``kvm_age_rmap``: clear A (or mark for access tracking) on the SPTEs mapping ``gfn``."""
        sptes = self._all_levels(gfn, gfn + 1)
        ad = self.vm.cfg.mmu.ept_ad
        young = False
        for table, idx, level, g in sptes:
            old = self.spt.item(table, idx)
            if spte_is_young(old, ad):
                self.set_spte(table, idx, level, g, old, age_spte(old, ad), actor, t)
                young = True
        return len(sptes), young

    def test_age_gfn(self, gfn: int) -> tuple[int, bool]:
        """``kvm_test_age_rmap``."""
        sptes = self._all_levels(gfn, gfn + 1)
        ad = self.vm.cfg.mmu.ept_ad
        return len(sptes), any(spte_is_young(self.spt.item(tb, i), ad) for tb, i, _, _ in sptes)

    def wrprot_range(
        self, start: int, end: int, min_level: int, clear_mmu_writable: bool, actor: int, t: int
    ) -> tuple[int, bool]:
        """``slot_rmap_write_protect`` (W) or ``rmap_write_protect(pt_protect)`` (W and MMU-writable)
        on the heads at or above ``min_level``."""
        self.vm.mmu_lock.lockdep_assert_held(actor, write=True)  # __walk_slot_rmaps
        sptes = self._all_levels(start, end, min_level)
        bits = PT_WRITABLE | (SPTE_MMU_WRITABLE if clear_mmu_writable else 0)
        writable = any(self.spt.item(tb, i) & PT_WRITABLE for tb, i, _, _ in sptes)
        changed = self._clear_bits(sptes, bits, actor, t)
        # Protecting a page table flushes whenever MMU-writable was set: a dirty-log protection may
        # have cleared W without flushing yet (R5 brings back the flush decided by W alone).
        return len(sptes), writable or (clear_mmu_writable and changed and self._flush_on_mmu_writable)

    def clear_dirty_pt_masked(self, gfns: np.ndarray, pml: bool, actor: int, t: int) -> tuple[int, bool]:
        """``kvm_mmu_write_protect_pt_masked`` (W) or ``kvm_mmu_clear_dirty_pt_masked`` (D, PML) on the
        4K heads of ``gfns``."""
        self.vm.mmu_lock.lockdep_assert_held(actor, write=True)  # __walk_slot_rmaps
        sptes = [s for g in gfns.tolist() for s in self._rmap_sptes(g, g + 1, PG_LEVEL_4K)]
        return len(sptes), self._clear_bits(sptes, SPTE_DIRTY if pml else PT_WRITABLE, actor, t)

    def clear_dirty_range(self, start: int, end: int, actor: int, t: int) -> tuple[int, bool]:
        """``__rmap_clear_dirty`` on the 4K heads (``kvm_mmu_slot_leaf_clear_dirty``, PML)."""
        self.vm.mmu_lock.lockdep_assert_held(actor, write=True)  # __walk_slot_rmaps
        sptes = list(self._rmap_sptes(start, end, PG_LEVEL_4K))
        return len(sptes), self._clear_bits(sptes, SPTE_DIRTY, actor, t)

    def try_split_huge_pages(self, start: int, end: int, target_level: int, actor: int, t: int) -> int:
        """``kvm_shadow_mmu_try_split_huge_pages``: 1G leaves first, then the 2M ones (old and new)."""
        self.vm.mmu_lock.lockdep_assert_held(actor, write=True)  # __walk_slot_rmaps
        created = 0
        for level in range(PG_LEVEL_1G, target_level, -1):
            for table, idx, lvl, gfn in list(self._rmap_sptes(start, end, level)):
                created += self._split(table, idx, lvl, gfn, actor, t)
        return created

    def _split(self, table: int, idx: int, level: int, gfn: int, actor: int, t: int) -> int:
        """``shadow_mmu_split_huge_page``: fill a child page with the huge leaf's translation, then
        link it in place of the leaf (``drop_large_spte`` without a flush)."""
        huge = self.spt.item(table, idx)
        rmap = self.leaf_rmap(table, idx)
        child = self.kvm_mmu_get_shadow_page(gfn, level - 1, True)
        span = pages_per_level(level - 1)
        for k in range(SPTE_ENT_PER_PAGE):
            if not self.spt.item(child.table, k):
                self.set_leaf(rmap, child.table, k, level - 1, gfn + k * span,
                              make_huge_page_split_spte(huge, level, k), actor, t)  # fmt: skip
        self.drop_spte(table, idx, level, gfn, actor, t)
        self.link_shadow_page(table, idx, child, actor, t)
        return SPTE_ENT_PER_PAGE

    def recover_huge_pages(self, slot: Memslot, start: int, end: int, actor: int, t: int) -> tuple[int, bool]:
        """``kvm_rmap_zap_collapsible_sptes``: zap the leaves of direct pages the slot could now
        map at a higher level."""
        self.vm.mmu_lock.lockdep_assert_held(actor, write=True)  # __walk_slot_rmaps
        visited = 0
        flush = False
        for level in (PG_LEVEL_4K, PG_LEVEL_2M):
            for table, idx, lvl, gfn in list(self._rmap_sptes(start, end, level)):
                visited += 1
                sp = self.sp_of[table]
                if sp.direct and sp.level < kvm_mmu_max_mapping_level(slot, sp.gfn, PG_LEVEL_1G):
                    self.drop_spte(table, idx, lvl, gfn, actor, t)
                    flush = True
        return visited, flush
