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

from typing import TYPE_CHECKING

import numpy as np

from vsim.mmu.direct_map import MS_DROP, MS_FLUSH, MS_MMIO_CREATED, MS_RECYCLE
from vsim.mmu.direct_map import set_leaf as dm_set_leaf
from vsim.mmu.mmu_page import (
    KVM_MIN_FREE_MMU_PAGES,
    KVM_REFILL_PAGES,
    NIL,
    NO_ROLE,
    S_N_USED,
    S_VALID_GEN,
    Role,
    ShadowPages,
    SpsRef,
    find_valid_sp,
    pack_role,
    sp_is_obsolete,
)
from vsim.mmu.mmu_page_view import ActivePages, KvmMmuPage, SpViews
from vsim.mmu.page_tables import PageTables
from vsim.mmu.pte_list import DescPool, DescsRef
from vsim.mmu.rmap import rmap_entries, rmap_head_index
from vsim.mmu.sp_pool import PoolRef
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
from vsim.requests import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, kvm_flush_remote_tlbs, kvm_make_all_cpus_request
from vsim.stats import K_MMU_CACHE_MISS

if TYPE_CHECKING:
    from vsim.memslots import Memslot
    from vsim.vcpu.kvm_vcpu import KvmVcpu
    from vsim.vm import Vm

NO_HEADS = np.zeros(0, dtype=np.int64)
KVM_MIN_ALLOC_MMU_PAGES = 64
KVM_PERMILLE_MMU_PAGES = 20


class ShadowMmu(PageTables):
    """What the legacy direct MMU and shadow paging share: shadow pages, the hash, rmaps."""

    pages_stat = "mmu_shadow_pages"
    spte_event = "kvm_mmu_set_spte"

    indirect = False  # shadow paging's pages shadow guest tables (shadowed_translation)

    def __init__(self, vm: Vm, initial_tables: int = 64) -> None:
        super().__init__(vm, initial_tables)
        self.descs = DescPool()  # mmu_pte_list_desc_cache: rmaps' and parent_ptes' descriptors
        self.pages = ShadowPages(self.pool, self.descs, self.indirect)
        self.sp_of = SpViews(self.pages)  # page table -> its shadow page (sptep_to_sp)
        self.active = ActivePages(self.pages, self.sp_of)  # active_mmu_pages, oldest first
        # The rmaps leaves are entered in: each memslot's head arrays (shared by its FLAGS_ONLY and
        # INVALID copies) with its base gfn, numbered as leaves record them (Sps.leaf_rmap).
        self.rmaps: list[tuple[list[np.ndarray], int]] = []
        self._rmap_number: dict[int, int] = {}
        pages = sum(s.npages for s in vm.memslots.slots)
        # kvm_mmu_calculate_default_mmu_pages, unless the VMM set it (KVM_SET_NR_MMU_PAGES).
        default = max(pages * KVM_PERMILLE_MMU_PAGES // 1000, KVM_MIN_ALLOC_MMU_PAGES)
        self.n_max_mmu_pages = vm.cfg.mmu.nr_mmu_pages or default

    def arch_bundles(self) -> tuple[PoolRef, SpsRef, DescsRef]:
        """The pool, the shadow pages and the descriptors, as ``ArchMmu`` holds them."""
        return self.pool.ref, self.pages.ref, self.descs.ref

    @property
    def n_used_mmu_pages(self) -> int:
        return int(self.pages.s.hdr[S_N_USED])

    @property
    def mmu_valid_gen(self) -> int:
        """``kvm->arch.mmu_valid_gen``, toggled by a fast zap."""
        return int(self.pages.s.hdr[S_VALID_GEN])

    @mmu_valid_gen.setter
    def mmu_valid_gen(self, gen: int) -> None:
        self.pages.s.hdr[S_VALID_GEN] = gen

    def alloc_sp(self, level: int, gfn: int, counted: bool = True) -> int:
        table = super().alloc_sp(level, gfn, counted)
        self.pages.fit_pool()
        return table

    # -- finding and creating shadow pages -------------------------------------------------------
    def kvm_mmu_get_shadow_page(self, gfn: int, level: int, direct: bool, access: int = ACC_ALL) -> KvmMmuPage:
        """``kvm_mmu_get_shadow_page`` for a direct page: the valid page of this gfn and role, else
        a new one. (Indirect pages, which may be unsync, go through the shadow MMU's lookup.)"""
        role = (level, direct, access, 0, False)
        sp = self.find_valid_sp(gfn, role)
        if sp is None:
            self.vm.stat.counts[K_MMU_CACHE_MISS] += 1
            sp = self.kvm_mmu_alloc_shadow_page(gfn, role)
        return sp

    def valid_sps(self, gfn: int) -> list[KvmMmuPage]:
        """``for_each_valid_sp`` over the gfn's bucket: the valid pages of ``gfn``; notes collisions."""
        s = self.pages.s
        find_valid_sp(s, self.sp_gfn, self.vm.stat.counts, gfn, NO_ROLE)  # the collision count
        sp_gfn = self.sp_gfn
        return [self.sp_of[t] for t in self.pages.bucket(gfn) if not sp_is_obsolete(s, t) and sp_gfn[t] == gfn]

    def find_valid_sp(self, gfn: int, role: Role) -> KvmMmuPage | None:
        table = find_valid_sp(self.pages.s, self.sp_gfn, self.vm.stat.counts, gfn, pack_role(role))
        return None if table == NIL else self.sp_of[table]

    def kvm_mmu_alloc_shadow_page(self, gfn: int, role: Role) -> KvmMmuPage:
        """``kvm_mmu_alloc_shadow_page``: a new page at the head of ``active_mmu_pages``, hashed."""
        table = self.alloc_sp(role[0], gfn)
        self.pages.init_page(table, role, self.mmu_valid_gen)
        sp = self.sp_of[table] = KvmMmuPage(self.pages, table)
        return sp

    def link_shadow_page(self, table: int, idx: int, sp: KvmMmuPage, actor: int, t: int) -> None:
        """``link_shadow_page``: point the parent SPTE at ``sp`` and record the parent."""
        old = self.spt.item(table, idx)
        self.set_spte(table, idx, sp.level + 1, sp.gfn, old, make_nonleaf_spte(sp.table), actor, t)
        sp.parent_ptes.append((table, idx))

    # -- leaves and rmaps ------------------------------------------------------------------------
    def rmap_of(self, slot: Memslot) -> int:
        """The number of ``slot``'s rmap (``gfn_to_rmap``'s ``slot->arch.rmap``), registered on
        first use."""
        key = id(slot.rmap[0])
        k = self._rmap_number.get(key)
        if k is None:
            k = self._rmap_number[key] = len(self.rmaps)
            self.rmaps.append((slot.rmap, slot.base_gfn))
        return k

    def rmap_args(self, slot: Memslot | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """``slot``'s rmap as compiled code takes it: its three head arrays, its base gfn and its
        number (no slot: empty heads, for an MMIO fault that enters no rmap)."""
        if slot is None:
            return NO_HEADS, NO_HEADS, NO_HEADS, 0, -1
        return self._rmap_tuple(self.rmap_of(slot))

    def _rmap_tuple(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        heads, base = self.rmaps[k]
        return heads[0], heads[1], heads[2], base, k

    def reserve(self, tables: int, descs: int) -> None:
        """Room for ``tables`` new shadow pages and ``descs`` pte_list descriptors (before a compiled
        operation, which cannot grow the arrays)."""
        self.pool.reserve(tables)
        self.pages.fit_pool()
        self.descs.reserve(descs)

    def drop_or_unlink(self, status: int, table: int, idx: int, level: int, gfn: int, actor: int, t: int) -> int:
        """What a compiled ``mmu_set_spte``/``direct_map`` left to do before it is called again: drop
        a leaf (``drop_spte``, ``drop_large_spte``) or unlink a page table from the entry where a huge
        leaf goes (``drop_parent_pte``), then flush remote TLBs. Returns the time after the flush."""
        if status & MS_DROP:
            self.drop_spte(table, idx, level, gfn, actor, t)
        else:
            old = self.spt.item(table, idx)
            self.sp_of[(old & PFN_MASK) >> PFN_SHIFT].parent_ptes.remove((table, idx))
            self.set_spte(table, idx, level, gfn, old, 0, actor, t)
        return kvm_flush_remote_tlbs(self.vm, t, me=actor)

    def set_spte_done(self, v: KvmVcpu, status: int, slot: Memslot | None, gfn: int, level: int, t: int) -> int:
        """The end of ``mmu_set_spte``: count an MMIO SPTE, flush for an SPTE that lost W, recycle a
        head past ``RMAP_RECYCLE_THRESHOLD`` (then note the mapping). Returns the time."""
        if status & MS_MMIO_CREATED:
            v.stat.pf_mmio_spte_created += 1
        if status & MS_FLUSH:
            t = kvm_flush_remote_tlbs(self.vm, t, me=v.id)
        if status & MS_RECYCLE:
            assert slot is not None
            t = self.rmap_recycle(slot, gfn, level, v.id, t)
            self.note_mapped(gfn, level)
        return t

    def _head(self, k: int, gfn: int, level: int) -> tuple[np.ndarray, int]:
        heads, base = self.rmaps[k]
        return heads[level - 1], int(rmap_head_index(base, gfn, level))

    def rmap_remove(self, rmap: int, gfn: int, level: int, table: int, idx: int) -> None:
        """``rmap_remove``: take the leaf off ``gfn``'s head."""
        self.descs.remove(*self._head(rmap, gfn, level), table, idx)

    def set_leaf(self, rmap: int, table: int, idx: int, level: int, gfn: int, new: int, actor: int, t: int) -> int:
        """Install a leaf where none was and enter it in rmap number ``rmap`` (``set_leaf`` of
        ``vsim.mmu.direct_map``, run here as Python). Returns the head's length before the add."""
        self.descs.reserve(1)
        n = dm_set_leaf(self.pool.p, self.pages.s, self.descs.d, self._rmap_tuple(rmap), table, idx, level, gfn, new,
                        actor, t)  # fmt: skip
        self.replay_changes()
        return int(n)

    def drop_spte(self, table: int, idx: int, level: int, gfn: int, actor: int, t: int) -> None:
        """``drop_spte``: clear a leaf and take it off its rmap."""
        old = self.spt.item(table, idx)
        self.set_spte(table, idx, level, gfn, old, 0, actor, t)
        s = self.pages.s
        k = int(s.leaf_rmap[table, idx]) - 1
        s.leaf_rmap[table, idx] = 0
        self.rmap_remove(k, gfn, level, table, idx)
        if s.gfns.shape[0] and not self.sp_of[table].direct:
            s.gfns[table, idx] = NIL
        self.note_zapped(gfn, level)

    def leaf_rmap(self, table: int, idx: int) -> int:
        """The number of the rmap holding the leaf at ``(table, idx)``."""
        return int(self.pages.s.leaf_rmap[table, idx]) - 1

    def rmap_recycle(self, slot: Memslot, gfn: int, level: int, actor: int, t: int) -> int:
        """Past ``RMAP_RECYCLE_THRESHOLD`` SPTEs on one head: zap them all, then flush."""
        for table, idx in rmap_entries(self.descs, slot, gfn, level):
            self.drop_spte(table, idx, level, gfn, actor, t)
        self.vm.stat.mmu_recycled += 1
        return kvm_flush_remote_tlbs(self.vm, t, me=actor)

    # -- zapping -----------------------------------------------------------------------------------
    def kvm_mmu_prepare_zap_page(self, sp: KvmMmuPage, invalid_list: list[KvmMmuPage], actor: int, t: int) -> int:
        """``__kvm_mmu_prepare_zap_page``: clear ``sp``'s SPTEs, unlink it from its parents, and
        move it to ``invalid_list`` (a root in use stays, marked invalid). Returns entries visited."""
        vm = self.vm
        vm.mmu_lock.lockdep_assert_held(actor, write=True)
        vm.stat.mmu_shadow_zapped += 1
        visited = self.mmu_zap_unsync_children(sp, invalid_list, actor, t)
        for i in np.flatnonzero(self.spt[sp.table]).tolist():
            spte = self.spt.item(sp.table, i)
            visited += 1
            if not spte & SPTE_MMU_PRESENT or spte == REMOVED_SPTE:
                gfn = sp.gfn + i * pages_per_level(sp.level) if sp.gfns is None else sp.gfns.pop(i, sp.gfn)
                self.set_spte(sp.table, i, sp.level, gfn, spte, 0, actor, t)  # an MMIO SPTE
            elif is_last_spte(spte, sp.level):
                self.drop_spte(sp.table, i, sp.level, sp.get_gfn(i), actor, t)
            else:  # kvm_mmu_unlink_children: the child loses this parent
                child = self.sp_of[(spte & PFN_MASK) >> PFN_SHIFT]
                child.parent_ptes.remove((sp.table, i))
                self.set_spte(sp.table, i, sp.level, child.gfn, spte, 0, actor, t)
        for table, idx in sp.parent_ptes:  # kvm_mmu_unlink_parents
            old = self.spt.item(table, idx)
            self.set_spte(table, idx, sp.level + 1, sp.gfn, old, 0, actor, t)
            visited += 1
        sp.parent_ptes.clear()
        sp.unsync_child_bitmap.clear()
        sp.unsync_children = 0
        if sp.gfns is not None and not sp.role_invalid:  # a root zapped before was unaccounted then
            self.unaccount_shadowed(sp)
        sp.unsync = False  # kvm_unlink_unsync_page
        if sp.root_count:
            was_valid = not sp.invalid
            sp.role_invalid = True
            self.active.pop(sp)
            self.active[sp] = None  # moved to the head: not revisited by the tail walk
            if was_valid:  # its users must drop it before they enter again
                kvm_make_all_cpus_request(vm, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, t, me=actor)
        else:
            self._unhash(sp)
            invalid_list.append(sp)
        return visited

    def mmu_zap_unsync_children(self, sp: KvmMmuPage, invalid_list: list[KvmMmuPage], actor: int, t: int) -> int:
        """``mmu_zap_unsync_children``: nothing to do without shadow paging (no page is unsync)."""
        return 0

    def unaccount_shadowed(self, sp: KvmMmuPage) -> None:
        """``unaccount_shadowed``: only indirect pages (shadow paging) track their gfn."""
        raise AssertionError("only shadow paging creates indirect shadow pages")

    def _unhash(self, sp: KvmMmuPage) -> None:
        self.pages.unhash(sp.table)

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
            if sp.root_count or sp not in self.active:  # a root in use, or zapped with its parent
                continue
            visited += self.kvm_mmu_prepare_zap_page(sp, invalid, actor, t)
        self.vm.stat.mmu_recycled += len(invalid)
        t += visited * self.vm.costs.tdp_zap_spte
        return self.kvm_mmu_commit_zap_page(invalid, actor, t)

    # -- inspection --------------------------------------------------------------------------------
    def tlb_keys_of_gfn(self, gfn: int) -> list[tuple[int, int]]:
        """``(size_class, key)`` of every TLB entry that could translate to ``gfn`` (a direct MMU's
        key is the gfn at the leaf's size)."""
        return [(level - 1, gfn >> (9 * (level - 1))) for level in (1, 2, 3)]

    def check_rmaps(self) -> list[str]:
        """Every leaf SPTE is on its gfn's rmap exactly once and every rmap entry is a present
        leaf of that gfn; every ``parent_ptes`` entry points at its child (spec §13)."""
        problems = []
        s = self.pages.s
        n = self.n_tables
        leaves = np.argwhere(s.leaf_rmap[:n] != 0).tolist()
        seen = {(table, idx) for table, idx in leaves}
        for table, idx in leaves:
            sp = self.sp_of[table]
            gfn = sp.get_gfn(idx)
            spte = self.spt.item(table, idx)
            if not (spte & SPTE_MMU_PRESENT) or not is_last_spte(spte, sp.level):
                problems.append(f"rmap holds a non-leaf at table {table} index {idx}")
            if self.descs.entries(*self._head(self.leaf_rmap(table, idx), gfn, sp.level)).count((table, idx)) != 1:
                problems.append(f"gfn {gfn:#x} level {sp.level}: leaf not on its rmap once")
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
        n = self.n_tables
        per_table = np.count_nonzero(self.pages.s.leaf_rmap[:n], axis=1)
        levels = self.sp_level[:n]
        return {level: int(per_table[levels == level].sum()) for level in (1, 2, 3)}
