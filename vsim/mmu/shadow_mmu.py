"""Shadow paging (``mmu.mode = "shadow"``, EPT off): KVM builds the page tables the CPU really walks,
translating guest virtual addresses to host pages, from the guest's own page tables (spec §1.7,
§1.8, §2, §4).

A #PF exit enters ``FNAME(page_fault)`` (``page_fault``): ``FNAME(walk_addr)`` walks the guest's
tables (``vsim.mmu.paging_tmpl``); a translation the guest does not have injects a #PF into the
guest. A present write to a write-tracked gfn goes to the emulator (``page_fault_handle_page_track``).
Otherwise, after ``kvm_faultin_pfn``, ``FNAME(fetch)`` runs under the **write** lock: it finds or
creates one indirect shadow page per guest table on the path (the hash gives one page per gfn and
role, so processes share the kernel's), direct pages below a guest huge page the host maps
smaller, and the leaf, then prefetches neighbouring gptes. There is no ``fast_page_fault``.

Roots follow the guest's CR3 (``mmu_alloc_shadow_roots``). A paging64 guest's root is the shadow
page of its PML4; a PAE or paging32 guest is shadowed with PAE tables, whose four root pages hang
off KVM's ``pae_root`` (here under a 4-level stand-in, so every walk has the same shape).
``kvm_mmu_new_pgd`` keeps three previous roots for 4-level guests (``fast_pgd_switch``).

A non-paging guest is shadowed by a direct MMU over ``gva == gpa`` (``nonpaging_page_fault``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vsim.guest.paging import ACC_ALL, ACC_WRITE_MASK, gpte_access, gpte_to_gfn
from vsim.mmu.direct_map import prefetch_may_be_writable
from vsim.mmu.hugepage import kvm_mmu_hugepage_adjust
from vsim.mmu.legacy_mmu import PTE_PREFETCH_NUM, LegacyMmu
from vsim.mmu.mmu_page_view import KvmMmuPage
from vsim.mmu.page_fault import RET_PF_EMULATE, RET_PF_RETRY, KvmPageFault
from vsim.mmu.page_tables import Root
from vsim.mmu.paging_tmpl import (
    GuestWalker,
    gpte_index,
    prefetch_invalid_gpte,
    protect_clean_gpte,
    sp_quadrant,
    walk_addr,
)
from vsim.mmu.shadow_checks import ShadowChecks
from vsim.mmu.spte import (
    PG_LEVEL_4K,
    PT_WRITABLE,
    SPTE_MMU_PRESENT,
    is_last_spte,
    is_shadow_present_pte,
    make_nonleaf_spte,
    make_spte,
    pages_per_level,
    spte_index,
)
from vsim.sched import Proc

if TYPE_CHECKING:
    from vsim.vcpu.kvm_vcpu import KvmVcpu

KVM_MMU_NUM_PREV_ROOTS = 3


@dataclass(eq=False)
class ShadowRoot:
    """A vCPU's root for one guest CR3: the table the CPU walks and the shadow pages it pins."""

    table: int
    pgd: int  # the guest CR3's gfn
    sps: list[KvmMmuPage | None] = field(default_factory=list)  # the root pages (PAE: four)
    pae_tables: tuple[int, int] | None = None  # the 4-level stand-in and pae_root, owned by the root

    @property
    def invalid(self) -> bool:
        return any(sp is not None and sp.invalid for sp in self.sps)


class ShadowPagingMmu(ShadowChecks):
    """The shadow MMU: indirect shadow pages from the guest's page tables, faults under the write lock."""

    # -- roots ---------------------------------------------------------------------------------------
    def alloc_vcpu_root(self, v: KvmVcpu) -> ShadowRoot:
        """``mmu_alloc_shadow_roots`` (``mmu_alloc_direct_roots`` for a non-paging guest) for the
        vCPU's CR3; advances ``v.now`` by any flush ``account_shadowed`` needed."""
        mode = self.guest_mode
        cr3 = v.cr3  # type: ignore[attr-defined]
        if mode.root_level == 4:
            sp, v.now = self.get_indirect_sp(v.id, cr3, 4, ACC_ALL, 0, v.now)
            sp.root_count += 1
            sp.write_flooding_count = 0
            return ShadowRoot(sp.table, cr3, [sp])
        pml4 = self.alloc_sp(4, 0, counted=False)
        pae = self.alloc_sp(3, 0, counted=False)
        self.spt[pml4, 0] = make_nonleaf_spte(pae)
        sps: list[KvmMmuPage | None] = []
        for i in range(4):
            if mode.levels == 0:
                sp = self.kvm_mmu_get_shadow_page(i << 18, 2, True)
            elif mode.levels == 3:
                pdpte = self.guest_mem.read(cr3, i)  # the PDPTRs loaded with CR3
                if not pdpte & 1:
                    sps.append(None)
                    continue
                sp, v.now = self.get_indirect_sp(v.id, gpte_to_gfn(pdpte, 3, mode), 2, ACC_ALL, 0, v.now)
            else:
                sp, v.now = self.get_indirect_sp(v.id, cr3, 2, ACC_ALL, i, v.now)
            sp.root_count += 1
            sp.pae_index = i
            self.spt[pae, i] = make_nonleaf_spte(sp.table)
            sps.append(sp)
        return ShadowRoot(pml4, cr3, sps, (pml4, pae))

    def put_root(self, root: Root, vid: int, t: int) -> int:
        """``mmu_free_root_page`` for each root page (an invalid one goes with its last user), and
        the PAE root pages."""
        assert isinstance(root, ShadowRoot)
        invalid: list[KvmMmuPage] = []
        for sp in root.sps:
            if sp is None:
                continue
            sp.root_count -= 1
            if not sp.root_count and sp.invalid:
                self.kvm_mmu_prepare_zap_page(sp, invalid, vid, t)
        if root.pae_tables is not None:
            for table in root.pae_tables:
                self.spt[table] = 0
                self._free_sp(table, counted=False)
        return self.kvm_mmu_commit_zap_page(invalid, vid, t)

    def get_indirect_sp(self, actor: int, gfn: int, level: int, access: int, quadrant: int,
                        t: int) -> tuple[KvmMmuPage, int]:  # fmt: skip
        """``kvm_mmu_get_shadow_page`` for an indirect page: ``kvm_mmu_find_shadow_page`` (an
        unsync page of another role is zapped when an upper-level page is wanted; a match that is
        unsync is synced transiently), else ``kvm_mmu_alloc_shadow_page`` + ``account_shadowed``."""
        role = (level, False, access, quadrant, self.guest_mode.has_4_byte_gpte)
        invalid: list[KvmMmuPage] = []
        found = None
        for sp in self.valid_sps(gfn):
            if sp.role() != role:
                if level > PG_LEVEL_4K and sp.unsync:
                    self.kvm_mmu_prepare_zap_page(sp, invalid, actor, t)
                continue
            if sp.unsync:  # synced in place but left unsync and writable (no write protection)
                v = self.vm.vcpus[actor]  # only vCPUs look shadow pages up
                v.now = t
                if self.kvm_sync_page(v, sp, invalid):
                    v.now = self.flush_remote(actor, v.now)
                t = v.now
                if sp not in self.active or sp.role_invalid:
                    continue
            sp.write_flooding_count = 0
            found = sp
        t = self.kvm_mmu_commit_zap_page(invalid, actor, t)
        if found is not None:
            return found, t
        self.vm.stat.mmu_cache_miss += 1
        sp = self.kvm_mmu_alloc_shadow_page(gfn, role)
        return sp, self.account_shadowed(sp, actor, t)

    # -- the fault ---------------------------------------------------------------------------------
    def page_fault(self, v: KvmVcpu, fault: KvmPageFault) -> Proc[int]:
        """``FNAME(page_fault)`` (``nonpaging_page_fault`` for a non-paging guest)."""
        mode = self.guest_mode
        if mode.levels == 0:
            return (yield from LegacyMmu.page_fault(self, v, fault))
        gvpn = fault.addr >> 12
        w = walk_addr(self.guest_mem, mode, v.cr3, gvpn, fault.write, fault.user)  # type: ignore[attr-defined]
        v.now += (w.reads + w.ad_updates) * self._c_gpte
        v.stat.gpte_reads += w.reads
        for table in w.written:  # update_accessed_dirty_bits: KVM wrote the gptes
            v.kvm_vcpu_mark_page_dirty(table)  # type: ignore[attr-defined]
        if w.fault:  # kvm_inject_emulated_page_fault: the guest's own #PF
            v.inject_page_fault(gvpn, w.fault)  # type: ignore[attr-defined]
            return RET_PF_RETRY
        fault.gfn = w.gfn
        fault.max_level = w.level
        slot = v.gfn_to_memslot(w.gfn)
        if fault.write and fault.present and self.kvm_gfn_is_write_tracked(slot, w.gfn):
            # page_fault_handle_page_track: emulate the write to a shadowed upper-level table
            self.shadow_page_table_clear_flood(v, gvpn)
            fault.slot = slot
            return RET_PF_EMULATE
        r = self.kvm_faultin_pfn(v, fault)
        if r is not None:
            return r
        if not (yield from self.lock_for_fault(v, fault, write=True)):
            return RET_PF_RETRY
        v.now = self.make_mmu_pages_available(v.id, v.now)
        ret = yield from self.fetch(v, w, fault)
        yield from self.unlock_write(v)
        return ret

    def shadow_page_table_clear_flood(self, v: KvmVcpu, gvpn: int) -> None:
        """``shadow_page_table_clear_flood``: the pages on the address's shadow walk are in use."""
        for table, _ in self._shadow_path(v.root, gvpn):  # type: ignore[arg-type]
            sp = self.sp_of.get(table)
            if sp is not None:
                sp.write_flooding_count = 0

    def _shadow_path(self, root: ShadowRoot, gvpn: int) -> list[tuple[int, int]]:
        """The ``(table, index)`` of each shadow entry on the address's walk, root first."""
        path = []
        table, level = root.table, 4
        while True:
            idx = spte_index(gvpn, level)
            path.append((table, idx))
            spte = self.spt.item(table, idx)
            if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
                return path
            table, level = self.child_table(spte), level - 1

    def fetch(self, v: KvmVcpu, w: GuestWalker, fault: KvmPageFault) -> Proc[int]:
        """``FNAME(fetch)`` under the write lock: link the shadow pages down to the leaf, map it."""
        vm = self.vm
        mode = self.guest_mode
        vid = v.id
        gvpn = fault.addr >> 12
        root: ShadowRoot = v.root  # type: ignore[assignment]
        if mode.root_level == 4:
            table, level = root.table, 4
        else:
            top = root.sps[(gvpn >> 18) & 3]
            assert top is not None  # the walk found the PDPTE present
            table, level = top.table, 2
        misses = vm.stat.mmu_cache_miss
        while level > w.level:  # the guest's tables: indirect pages
            idx = spte_index(gvpn, level)
            self.sp_of[table].write_flooding_count = 0  # clear_sp_write_flooding_count
            spte = self.spt.item(table, idx)
            if is_shadow_present_pte(spte) and not is_last_spte(spte, level):
                table, level = self.child_table(spte), level - 1
                continue
            if is_shadow_present_pte(spte):
                v.now = self._drop_large_spte(table, idx, level, vid, v.now)
            access = w.pt_access[level]
            sp, v.now = self.get_indirect_sp(vid, w.table_gfn[level - 1], level - 1, access,
                                             sp_quadrant(mode, gvpn, level - 1), v.now)  # fmt: skip
            if sp.unsync_children and not (yield from self.mmu_sync_children(v, sp, can_yield=False)):
                return RET_PF_RETRY
            self._link(table, idx, sp, vid, v.now)
            table, level = sp.table, level - 1
        leaf = self.guest_mem.read(w.table_gfn[w.level], w.pte_index[w.level])
        pte_access = protect_clean_gpte(w.pte_access, leaf)
        kvm_mmu_hugepage_adjust(fault)
        goal = fault.goal_level
        while level > goal:  # a guest huge page mapped smaller: direct pages
            idx = spte_index(gvpn, level)
            spte = self.spt.item(table, idx)
            if is_shadow_present_pte(spte) and not is_last_spte(spte, level):
                child = self.sp_of[self.child_table(spte)]
                if child.access == pte_access:  # validate_direct_spte
                    table, level = child.table, level - 1
                    continue
                self.mmu_page_zap_pte(self.sp_of[table], idx, vid, v.now)
                v.now = self.flush_remote(vid, v.now)
            elif is_shadow_present_pte(spte):
                v.now = self._drop_large_spte(table, idx, level, vid, v.now)
            base = w.gfn & ~(pages_per_level(level) - 1)
            sp = self.kvm_mmu_get_shadow_page(base, level - 1, True, pte_access)
            self._link(table, idx, sp, vid, v.now)
            table, level = sp.table, level - 1
        work = self._c_map + self._c_sp * (vm.stat.mmu_cache_miss - misses)
        idx = spte_index(gvpn, goal)
        ret, v.now = self.set_spte_at(v, table, idx, goal, w.gfn, fault.slot, fault.pfn,
                                      bool(pte_access & ACC_WRITE_MASK), fault.write, v.now)  # fmt: skip
        if ret != RET_PF_EMULATE and goal == PG_LEVEL_4K:
            work += self.pte_prefetch(v, table, idx)
        v.now += work
        return ret

    def _link(self, table: int, idx: int, sp: KvmMmuPage, actor: int, t: int) -> None:
        """``link_shadow_page``; an unsync child marks its new parent."""
        self.link_shadow_page(table, idx, sp, actor, t)
        if sp.unsync or sp.unsync_children:
            parent = self.sp_of[table]
            if idx not in parent.unsync_child_bitmap:
                parent.unsync_child_bitmap.add(idx)
                parent.unsync_children += 1
                if parent.unsync_children == 1:
                    self.kvm_mmu_mark_parents_unsync(parent)

    def _drop_large_spte(self, table: int, idx: int, level: int, actor: int, t: int) -> int:
        """``drop_large_spte``: a huge leaf where a page table must go; flush."""
        self.drop_spte(table, idx, level, self.sp_of[table].get_gfn(idx), actor, t)
        return self.flush_remote(actor, t)

    def kvm_mmu_invalidate_addr(self, v: KvmVcpu, root: ShadowRoot, gvpn: int, t: int) -> int:
        """``__kvm_mmu_invalidate_addr`` on one root: on the address's path, sync the entry of each
        unsync page (zapping it if its gpte is gone, with a flush), down to the last page with
        unsync children. Returns the time."""
        for table, idx in self._shadow_path(root, gvpn):
            sp = self.sp_of.get(table)
            if sp is None:
                continue  # the PAE stand-in levels
            if sp.unsync and self.spt.item(table, idx) & SPTE_MMU_PRESENT and self.sync_spte(v, sp, idx):
                t = self.flush_remote(v.id, t)  # kvm_flush_remote_tlbs_sptep
            if not sp.unsync_children:
                break
        return t + self._c_sync

    def make_spte_writable(self, v: KvmVcpu, gfn: int, level: int, old: int, t: int) -> bool:
        """``make_spte``: an SPTE that was writable stays so; else ``mmu_try_to_unsync_pages``."""
        if old & SPTE_MMU_PRESENT and old & PT_WRITABLE:
            return True
        return self.mmu_try_to_unsync_pages(v.gfn_to_memslot(gfn), gfn, True)

    def pte_prefetch(self, v: KvmVcpu, table: int, idx: int) -> int:
        """``FNAME(pte_prefetch)``: map the empty neighbours in the leaf's group of 8 from their
        gptes, stopping at the first that cannot be (invalid gpte, no slot, host page absent, or a
        write-logged slot). Returns the ns spent."""
        vm = self.vm
        sp = self.sp_of[table]
        if vm.mmu_invalidate_in_progress:
            return 0
        if sp.direct:
            return self.direct_pte_prefetch(v, table, idx, v.gfn_to_memslot(sp.gfn), v.now)
        done = 0
        first = idx & ~(PTE_PREFETCH_NUM - 1)
        for i in range(first, first + PTE_PREFETCH_NUM):
            if i == idx or self.spt.item(table, i) & SPTE_MMU_PRESENT:
                continue
            gpte = self.guest_mem.read(sp.gfn, gpte_index(sp, i))
            if prefetch_invalid_gpte(gpte):
                break
            gfn = gpte_to_gfn(gpte, 1, self.guest_mode)
            access = protect_clean_gpte(sp.access & gpte_access(gpte), gpte)
            slot = v.gfn_to_memslot(gfn)
            if slot is None or not slot.resident(gfn) or (access & ACC_WRITE_MASK and slot.dirty_bitmap is not None):
                break
            writable = bool(access & ACC_WRITE_MASK) and prefetch_may_be_writable(
                self.pages.s, self.pool.p, slot.write_track, slot.base_gfn, gfn
            )  # mmu_try_to_unsync_pages
            new = make_spte(slot.gfn_to_pfn(gfn), 1, writable, prefetch=True)
            self.set_leaf(self.rmap_of(slot), table, i, PG_LEVEL_4K, gfn, new, v.id, v.now)
            self.note_mapped(gfn, PG_LEVEL_4K)
            done += 1
        return done * self._c_prefetch
