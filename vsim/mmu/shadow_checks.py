"""What the invariant checker asks of shadow paging (spec §13.3, §13.8), a layer of
``ShadowPagingMmu``: which TLB entries could translate to a gfn (from the gfn's rmaps up the
``parent_ptes`` chains to the roots), role discipline, and write tracking against the SPTEs.
"""

from __future__ import annotations

from vsim.mmu.rmap import rmap_entries
from vsim.mmu.spte import PG_LEVEL_4K, PT_WRITABLE
from vsim.mmu.unsync import UnsyncOps


class ShadowChecks(UnsyncOps):
    """Inspection for the checker; nothing here changes state."""

    def tlb_keys_of_gfn(self, gfn: int) -> list[tuple[int, int]]:
        """``(size_class, key)`` of the guest virtual pages whose shadow leaves map ``gfn``: from
        each leaf on the gfn's rmaps up its ``parent_ptes`` to the roots."""
        keys: list[tuple[int, int]] = []
        slot = self.vm.memslots.gfn_to_memslot(gfn)
        if slot is None:
            return keys
        for level in (1, 2, 3):
            for table, idx in rmap_entries(self.descs, slot, gfn, level):
                for gvpn in self._gvpns_of(table, idx << (9 * (level - 1))):
                    keys.append((level - 1, gvpn >> (9 * (level - 1))))
        return keys

    def _gvpns_of(self, table: int, low: int) -> list[int]:
        """The virtual pages reaching entry bits ``low`` of page ``table`` from a root."""
        sp = self.sp_of[table]
        if sp.pae_index is not None:  # a PAE root: its place in pae_root gives gva bits 31:30
            return [low | sp.pae_index << 18]
        if not sp.parent_ptes:  # a 4-level root: canonical addresses above the lower half
            return [low | (0xFFFF << 36 if low >> 35 & 1 else 0)]
        out = []
        for ptable, pidx in sp.parent_ptes:
            out += self._gvpns_of(ptable, low | pidx << (9 * sp.level))
        return out

    def check_shadow(self) -> list[tuple[str, str]]:
        """Role discipline (§13.8): only indirect 4K pages are unsync, and each unsync page is
        marked in its parents' ``unsync_child_bitmap`` up to a root. Write tracking (§13.3): no
        writable SPTE maps a gfn that a synced indirect page shadows."""
        problems = []
        for sp in self.sp_of.values():
            if sp.invalid:
                continue
            if sp.unsync and (sp.level != PG_LEVEL_4K or sp.direct):
                problems.append(("role_discipline", f"unsync page at gfn {sp.gfn:#x} level {sp.level}"))
            if sp.unsync or sp.unsync_children:
                for table, idx in sp.parent_ptes:
                    if idx not in self.sp_of[table].unsync_child_bitmap:
                        problems.append(("role_discipline", f"gfn {sp.gfn:#x} level {sp.level}: unsync below "
                                         "a parent that does not mark it"))  # fmt: skip
            if sp.gfns is not None and not sp.unsync:
                others_unsync = any(o.unsync for o in self.valid_sps(sp.gfn) if o.gfns is not None)
                if others_unsync:
                    continue
                slot = self.vm.memslots.gfn_to_memslot(sp.gfn)
                if slot is None:
                    continue
                for level in (1, 2, 3):
                    for table, idx in rmap_entries(self.descs, slot, sp.gfn, level):
                        if self.spt.item(table, idx) & PT_WRITABLE:
                            problems.append(("write_tracking", f"gfn {sp.gfn:#x} is shadowed but an SPTE maps "
                                             "it writable"))  # fmt: skip
        return problems
