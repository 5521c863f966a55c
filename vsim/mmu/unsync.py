"""Unsync shadow pages and their resynchronization (``mmu.c``; spec §4.3).

A write fault on a guest page table that only 4K-level shadow pages shadow does not emulate: KVM
marks those pages unsync (``kvm_unsync_page``) and maps the page writable, so the guest edits its
PTEs at full speed while the shadow goes stale. The parents record the unsync child in
``unsync_child_bitmap`` up to the root. The shadow is brought back in line when the guest flushes
its TLB: at a CR3 load (``KVM_REQ_MMU_SYNC`` → ``kvm_mmu_sync_roots`` → ``mmu_sync_children``:
write-protect each unsync page's gfn again, then ``kvm_sync_page`` re-reads every gpte), and at
INVLPG for the one entry on the invalidated address's path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from vsim.dirty_log import mark_page_dirty_in_slot
from vsim.guest.paging import (
    ACC_WRITE_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PRESENT_MASK,
    PT_WRITABLE_MASK,
    gpte_access,
    gpte_to_gfn,
)
from vsim.mmu.page_track import PageTrack
from vsim.mmu.paging_tmpl import gpte_index, prefetch_invalid_gpte, protect_clean_gpte
from vsim.mmu.spte import (
    PG_LEVEL_4K,
    PT_WRITABLE,
    SPTE_HOST_WRITABLE,
    SPTE_MMU_PRESENT,
    SPTE_MMU_WRITABLE,
    is_last_spte,
)
from vsim.requests import KVM_REQ_MMU_SYNC
from vsim.sched import Proc

if TYPE_CHECKING:
    from vsim.memslots import Memslot
    from vsim.mmu.mmu_page_view import KvmMmuPage
    from vsim.vcpu.kvm_vcpu import KvmVcpu

KVM_PAGE_ARRAY_NR = 16


class UnsyncOps(PageTrack):
    """Unsync and sync (the layer of ``ShadowPagingMmu`` after write tracking)."""

    def mmu_try_to_unsync_pages(self, slot: Memslot | None, gfn: int, can_unsync: bool) -> bool:
        """``mmu_try_to_unsync_pages``: may an SPTE mapping ``gfn`` be writable? Unsyncs the 4K
        shadow pages of ``gfn`` when it may; a write-tracked gfn, or a sync in progress, keeps it
        read-only. (A prefetch, which never unsyncs, asks ``prefetch_may_be_writable``.)"""
        if self.kvm_gfn_is_write_tracked(slot, gfn):
            return False
        for sp in self.valid_sps(gfn):
            if sp.gfns is None:
                continue
            if not can_unsync:
                return False
            if sp.unsync:
                continue
            self.kvm_unsync_page(sp)
        return True

    def kvm_unsync_page(self, sp: KvmMmuPage) -> None:
        self.vm.stat.mmu_unsync += 1
        sp.unsync = True
        self.kvm_mmu_mark_parents_unsync(sp)

    def kvm_mmu_mark_parents_unsync(self, sp: KvmMmuPage) -> None:
        """``mark_unsync`` on every parent SPTE, propagating while counts go 0 → 1."""
        for table, idx in sp.parent_ptes:
            parent = self.sp_of[table]
            if idx in parent.unsync_child_bitmap:
                continue
            parent.unsync_child_bitmap.add(idx)
            parent.unsync_children += 1
            if parent.unsync_children == 1:
                self.kvm_mmu_mark_parents_unsync(parent)

    def mmu_unsync_walk(self, sp: KvmMmuPage, out: list[KvmMmuPage]) -> None:
        """``mmu_unsync_walk``: the unsync pages below ``sp``; stale bitmap bits are cleared."""
        for idx in sorted(sp.unsync_child_bitmap):
            spte = self.spt.item(sp.table, idx)
            child = None
            if spte & SPTE_MMU_PRESENT and not is_last_spte(spte, sp.level):
                child = self.sp_of.get(self.child_table(spte))
            if child is None or not (child.unsync or child.unsync_children):
                self._clear_unsync_child_bit(sp, idx)
                continue
            if child.unsync_children:
                self.mmu_unsync_walk(child, out)
            if child.unsync:
                out.append(child)
            if not child.unsync_children:
                self._clear_unsync_child_bit(sp, idx)

    @staticmethod
    def _clear_unsync_child_bit(sp: KvmMmuPage, idx: int) -> None:
        if idx in sp.unsync_child_bitmap:
            sp.unsync_child_bitmap.discard(idx)
            sp.unsync_children -= 1

    def mmu_zap_unsync_children(self, sp: KvmMmuPage, invalid_list: list[KvmMmuPage], actor: int,
                                t: int) -> int:  # fmt: skip
        """``mmu_zap_unsync_children``: zap the unsync pages below a page being zapped."""
        if not sp.unsync_children:
            return 0
        pages: list[KvmMmuPage] = []
        self.mmu_unsync_walk(sp, pages)
        visited = 0
        for child in pages:
            if child in self.active and not child.role_invalid:
                visited += self.kvm_mmu_prepare_zap_page(child, invalid_list, actor, t)
        return visited

    def mmu_sync_children(self, v: KvmVcpu, parent: KvmMmuPage,
                          can_yield: bool) -> Proc[bool]:  # fmt: skip
        """``mmu_sync_children`` under the write lock: in batches of ``KVM_PAGE_ARRAY_NR``,
        write-protect the unsync pages' gfns (flushing if an SPTE lost W), then sync each one.
        Between batches it yields to waiters; if it may not yield it sets ``KVM_REQ_MMU_SYNC`` and
        returns False (the fault retries)."""
        vm = self.vm
        pages: list[KvmMmuPage] = []
        self.mmu_unsync_walk(parent, pages)
        for start in range(0, len(pages), KVM_PAGE_ARRAY_NR):
            batch = pages[start : start + KVM_PAGE_ARRAY_NR]
            flush = False
            for sp in batch:
                visited, changed = self.wrprot_range(sp.gfn, sp.gfn + 1, PG_LEVEL_4K, True, v.id, v.now)
                v.now += visited * vm.costs.tdp_wrprot_spte
                flush |= changed
            if flush:
                v.now = self.flush_remote(v.id, v.now)
            invalid: list[KvmMmuPage] = []
            for sp in batch:
                if sp.invalid or sp not in self.active:
                    continue
                sp.unsync = False
                if self.kvm_sync_page(v, sp, invalid):
                    v.now = self.flush_remote(v.id, v.now)
            v.now = self.kvm_mmu_commit_zap_page(invalid, v.id, v.now)
            if start + KVM_PAGE_ARRAY_NR < len(pages) and vm.mmu_lock.waiters:
                if not can_yield:
                    v.requests |= KVM_REQ_MMU_SYNC
                    return False
                yield from self.unlock_write(v)
                yield from self.lock_write(v)
        return True

    def kvm_sync_page(self, v: KvmVcpu, sp: KvmMmuPage, invalid: list[KvmMmuPage]) -> bool:
        """``kvm_sync_page``: re-read every gpte behind the page's SPTEs (``FNAME(sync_spte)``).
        Returns whether an SPTE lost a permission (the caller flushes).

        The entries whose gpte still maps the same gfn with the same write permission are found
        with numpy first; ``sync_spte`` runs on the others only (the result is the same)."""
        gfns: Mapping[int, int] = sp.gfns or {}
        if not gfns:
            return False
        idxs = np.fromiter(gfns.keys(), dtype=np.int64, count=len(gfns))
        mapped = np.fromiter(gfns.values(), dtype=np.int64, count=len(gfns))
        table = self.guest_mem.tables.get(sp.gfn)
        if table is None:
            changed = idxs
        else:
            gi = idxs if not sp.has_4_byte_gpte else sp.quadrant * 512 + idxs
            gpte = table[gi]
            four = sp.has_4_byte_gpte
            gfn = ((gpte & 0xFFFFFFFF) if four else (gpte & ((1 << 52) - 1))) >> 12
            valid = ((gpte & PT_PRESENT_MASK) != 0) & ((gpte & PT_ACCESSED_MASK) != 0) & (gfn == mapped)
            want = (gpte & PT_WRITABLE_MASK) != 0
            want &= (gpte & PT_DIRTY_MASK) != 0  # protect_clean_gpte
            want &= bool(sp.access & ACC_WRITE_MASK)
            spte = self.spt[sp.table, idxs]
            have = (spte & PT_WRITABLE) != 0
            have_m = (spte & SPTE_MMU_WRITABLE) != 0
            same = valid & (want == have) & (want == have_m)
            if self.accounted:  # a gfn that is itself shadowed may not get W: decide those one by one
                same &= ~np.isin(mapped, np.fromiter(self.accounted.keys(), dtype=np.int64))
            changed = idxs[~same]
        flush = False
        for idx in changed.tolist():
            flush |= self.sync_spte(v, sp, idx)
        v.now += len(gfns) * self._c_sync
        return flush

    def sync_spte(self, v: KvmVcpu, sp: KvmMmuPage, idx: int) -> bool:
        """``FNAME(sync_spte)``: drop the SPTE if its gpte is gone or maps another gfn, else rebuild
        its permissions (``make_spte(synchronizing)``: no unsync from here). Returns whether to
        flush."""
        spte = self.spt.item(sp.table, idx)
        if not spte & SPTE_MMU_PRESENT:
            return False
        mode = self.guest_mode
        gpte = self.guest_mem.read(sp.gfn, gpte_index(sp, idx))
        gfn = sp.get_gfn(idx)
        if prefetch_invalid_gpte(gpte) or gpte_to_gfn(gpte, sp.level, mode) != gfn:
            self.drop_spte(sp.table, idx, sp.level, gfn, v.id, v.now)
            return True
        access = protect_clean_gpte(sp.access & gpte_access(gpte), gpte)
        slot = v.gfn_to_memslot(gfn)  # the memslot now (kvm_vcpu_gfn_to_memslot), not the one at install
        writable = bool(access & ACC_WRITE_MASK) and self.mmu_try_to_unsync_pages(slot, gfn, False)
        new = spte & ~(PT_WRITABLE | SPTE_MMU_WRITABLE)
        if writable:
            new |= PT_WRITABLE | SPTE_MMU_WRITABLE | SPTE_HOST_WRITABLE
        if new == spte:
            return False
        if new & PT_WRITABLE and not spte & PT_WRITABLE:
            mark_page_dirty_in_slot(slot, gfn)  # make_spte: a writable SPTE in a logged slot
        self.set_spte(sp.table, idx, sp.level, gfn, spte, new, v.id, v.now)
        return bool(spte & PT_WRITABLE) and not new & PT_WRITABLE
