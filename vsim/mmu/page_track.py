"""Write tracking of shadowed guest page tables and emulated gpte writes (``page_track.c`` and
``kvm_mmu_track_write`` in ``mmu.c``; spec §2.3, §4.1, §4.2).

When shadow paging creates an indirect shadow page (``account_shadowed``) the guest page it
shadows is write-protected in every SPTE that maps it, and huge mappings over it are disallowed. An
upper-level page also raises the gfn's ``gfn_write_track`` count: such a gfn is never made writable
again while tracked, so every guest write to it faults and is emulated. A 4K-level page only
write-protects; a write fault on it may unsync the page instead (``vsim.mmu.unsync``).

The emulated write reaches ``kvm_mmu_track_write`` under the write lock: a shadow page whose write
is misaligned, or an upper-level page written three times without being used in between, is zapped
(``mmu_flooded``); otherwise the SPTEs shadowing the written gpte are zapped (modern KVM does not
re-install the new gpte) and flushed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsim.mmu.shadow_context import ShadowContext
from vsim.mmu.spte import PG_LEVEL_4K, SPTE_MMU_PRESENT, is_last_spte
from vsim.sched import Proc

if TYPE_CHECKING:
    from vsim.memslots import Memslot
    from vsim.mmu.mmu_page_view import KvmMmuPage
    from vsim.vcpu.kvm_vcpu import KvmVcpu

WRITE_FLOOD_THRESHOLD = 3


class PageTrack(ShadowContext):
    """Write tracking and the emulated-write path (the layer of ``ShadowPagingMmu`` after its context)."""

    def account_shadowed(self, sp: KvmMmuPage, actor: int, t: int) -> int:
        """``account_shadowed``: track (upper levels), disallow huge pages, write-protect the gfn and
        flush if an SPTE lost W. Returns the time the caller goes on."""
        slot = self.vm.memslots.gfn_to_memslot(sp.gfn)
        self.indirect_shadow_pages += 1
        self.accounted[sp.gfn] = self.accounted.get(sp.gfn, 0) + 1
        self.track_slot[sp] = slot
        if slot is None:
            return t
        if sp.level > PG_LEVEL_4K:
            slot.write_track[sp.gfn - slot.base_gfn] += 1  # __kvm_write_track_add_gfn
        slot.disallow_lpage_at(sp.gfn, 1)
        visited, flush = self.wrprot_range(sp.gfn, sp.gfn + 1, PG_LEVEL_4K, True, actor, t)
        t += visited * self.vm.costs.tdp_wrprot_spte
        if flush:
            t = self.flush_remote(actor, t)
        if self.vm.checker is not None:
            self.vm.checker.on_write_tracked(sp.gfn, t)
        return t

    def unaccount_shadowed(self, sp: KvmMmuPage) -> None:
        """``unaccount_shadowed``: drop the tracking; the SPTEs stay read-only until re-faulted."""
        self.indirect_shadow_pages -= 1
        n = self.accounted[sp.gfn] - 1
        if n:
            self.accounted[sp.gfn] = n
        else:
            del self.accounted[sp.gfn]
        slot = self.track_slot.pop(sp)
        if slot is None:
            return
        if sp.level > PG_LEVEL_4K:
            slot.write_track[sp.gfn - slot.base_gfn] -= 1  # __kvm_write_track_remove_gfn
        slot.disallow_lpage_at(sp.gfn, -1)

    @staticmethod
    def kvm_gfn_is_write_tracked(slot: Memslot | None, gfn: int) -> bool:
        return slot is not None and bool(slot.write_track[gfn - slot.base_gfn])

    # -- the emulated write ------------------------------------------------------------------------
    def kvm_mmu_track_write(self, v: KvmVcpu, gfn: int, offset: int, nbytes: int,
                            writes: int = 1) -> Proc[None]:  # fmt: skip
        """``kvm_mmu_track_write`` for ``writes`` emulated writes of ``nbytes`` at byte ``offset`` of
        guest page ``gfn`` (a string instruction writes consecutive units in one exit)."""
        vm = self.vm
        if not self.indirect_shadow_pages:
            return  # nothing is shadowed: the lockless early exit
        yield from self.lock_write(v)
        for k in range(writes):
            vm.stat.mmu_pte_write += 1
            sps = [sp for sp in self.valid_sps(gfn) if sp.gfns is not None]
            if not sps:  # the rest find nothing to update: each still takes the lock and looks
                vm.stat.mmu_pte_write += writes - k - 1
                v.now += (writes - k - 1) * self._c_track
                break
            v.now += self._c_track
            invalid: list[KvmMmuPage] = []
            flush = False
            at = offset + k * nbytes
            for sp in sps:
                if self.detect_write_misaligned(sp, at, nbytes) or self.detect_write_flooding(sp):
                    self.kvm_mmu_prepare_zap_page(sp, invalid, v.id, v.now)
                    vm.stat.mmu_flooded += 1
                    continue
                for i in self.get_written_sptes(sp, at, nbytes):
                    spte = self.spt.item(sp.table, i)
                    if spte & SPTE_MMU_PRESENT:
                        self.mmu_page_zap_pte(sp, i, v.id, v.now)
                        vm.stat.mmu_pte_updated += 1
                        flush = True
            # kvm_mmu_remote_flush_or_zap
            if invalid:
                v.now = self.kvm_mmu_commit_zap_page(invalid, v.id, v.now)
            elif flush:
                v.now = self.flush_remote(v.id, v.now)
        yield from self.unlock_write(v)

    def kvm_mmu_unprotect_page(self, v: KvmVcpu, gfn: int) -> Proc[None]:
        """``kvm_mmu_unprotect_gfn_and_retry``: zap every shadow page with gptes at ``gfn``, so the
        retried instruction writes the page natively."""
        yield from self.lock_write(v)
        invalid: list[KvmMmuPage] = []
        for sp in self.valid_sps(gfn):
            if sp.gfns is not None:
                v.now += self.kvm_mmu_prepare_zap_page(sp, invalid, v.id, v.now) * self.vm.costs.tdp_zap_spte
        v.now = self.kvm_mmu_commit_zap_page(invalid, v.id, v.now)
        yield from self.unlock_write(v)

    def mmu_page_zap_pte(self, sp: KvmMmuPage, i: int, actor: int, t: int) -> None:
        """``mmu_page_zap_pte``: drop a leaf, or unlink a child page table."""
        spte = self.spt.item(sp.table, i)
        if is_last_spte(spte, sp.level):
            self.drop_spte(sp.table, i, sp.level, sp.get_gfn(i), actor, t)
            return
        child = self.sp_of[self.child_table(spte)]
        child.parent_ptes.remove((sp.table, i))
        sp.unsync_child_bitmap.discard(i)
        self.set_spte(sp.table, i, sp.level, child.gfn, spte, 0, actor, t)

    @staticmethod
    def detect_write_misaligned(sp: KvmMmuPage, offset: int, nbytes: int) -> bool:
        """``detect_write_misaligned``: a write that is not a whole, aligned gpte (a PTE-aligned
        single byte is allowed: it updates status bits)."""
        pte_size = 4 if sp.has_4_byte_gpte else 8
        if not offset & (pte_size - 1) and nbytes == 1:
            return False
        return bool((offset ^ (offset + nbytes - 1)) & ~(pte_size - 1)) or nbytes < 4

    @staticmethod
    def detect_write_flooding(sp: KvmMmuPage) -> bool:
        """``detect_write_flooding``: 4K-level pages can go unsync instead and never flood."""
        if sp.level == PG_LEVEL_4K:
            return False
        sp.write_flooding_count += 1
        return sp.write_flooding_count >= WRITE_FLOOD_THRESHOLD

    @staticmethod
    def get_written_sptes(sp: KvmMmuPage, offset: int, nbytes: int) -> list[int]:
        """``get_written_sptes``: the shadow entries behind the written gpte (two for a paging32
        page-directory entry, none if the write is in another quadrant)."""
        npte = 1
        if sp.has_4_byte_gpte:
            offset <<= 1  # 32-bit gptes become 64-bit SPTEs
            if sp.level == 2:
                offset = (offset & ~7) << 1
                npte = 2
            if offset >> 12 != sp.quadrant:
                return []
            offset &= 4095
        first = offset // 8
        return list(range(first, first + npte))
