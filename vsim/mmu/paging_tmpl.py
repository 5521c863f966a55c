"""The guest page-table walker of shadow paging (``arch/x86/kvm/mmu/paging_tmpl.h``, spec §1.8).

``walk_addr`` is ``FNAME(walk_addr_generic)``: it reads each gpte of the guest's walk from guest
memory, ANDs the access rights over the levels, stops at the leaf, checks permissions, and sets the
Accessed bits (and Dirty on a write) in the gptes it used (``FNAME(update_accessed_dirty_bits)``),
which KVM writes into guest memory and marks dirty (``kvm_vcpu_mark_page_dirty``: the caller).
A failed walk reports the #PF error code the guest must see. PAE starts from the four PDPTEs
loaded at CR3 time; a paging32 walk reads 4-byte entries, 1024 per table.

The other ``FNAME()`` helpers here turn gptes into shadow SPTEs: the index of the gpte behind a
shadow entry (quadrants for 4-byte gptes), ``protect_clean_gpte`` and ``prefetch_invalid_gpte``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vsim.guest.paging import (
    ACC_ALL,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PRESENT_MASK,
    PagingMode,
    gpte_access,
    gpte_to_gfn,
    is_last_gpte,
)
from vsim.mmu.page_fault import PFERR_PRESENT_MASK, PFERR_USER_MASK, PFERR_WRITE_MASK

if TYPE_CHECKING:
    from vsim.guest.memory import GuestMemory
    from vsim.mmu.mmu_page_view import KvmMmuPage


@dataclass
class GuestWalker:
    """``struct guest_walker``: what the walk found, level by level."""

    level: int = 0  # the leaf's level
    gfn: int = 0  # the 4K gfn the address translates to
    pte_access: int = ACC_ALL  # access of the leaf (AND over every level)
    fault: int = 0  # the #PF error code when the walk failed, else 0
    reads: int = 0  # gptes read from guest memory (PAE's PDPTE comes from the PDPTRs)
    ad_updates: int = 0  # gptes whose A/D bits the walk set
    written: list[int] = field(default_factory=list)  # gfns of the tables whose gptes it wrote (A/D)
    table_gfn: dict[int, int] = field(default_factory=dict)  # level -> gfn of the table read there
    pte_index: dict[int, int] = field(default_factory=dict)  # level -> index of the gpte used
    pt_access: dict[int, int] = field(default_factory=dict)  # level -> access after that level's gpte


def walk_addr(mem: GuestMemory, mode: PagingMode, cr3_gfn: int, gvpn: int, write: bool, user: bool) -> GuestWalker:
    """``FNAME(walk_addr)`` for an access to guest virtual page ``gvpn``."""
    w = GuestWalker()
    access = ACC_ALL
    table = cr3_gfn
    used: list[tuple[int, int, int]] = []  # (table, index, gpte) of each level, for A/D
    level = mode.levels
    while True:
        idx = mode.index(gvpn, level)
        gpte = mem.read(table, idx)
        pdpte = mode.levels == 3 and level == 3  # PAE: from the PDPTRs loaded with CR3, not memory
        w.reads += not pdpte
        w.table_gfn[level] = table
        w.pte_index[level] = idx
        if not gpte & PT_PRESENT_MASK:
            w.fault = (PFERR_WRITE_MASK if write else 0) | (PFERR_USER_MASK if user else 0)
            return w
        if not pdpte:  # PAE PDPTEs carry no access bits
            access &= gpte_access(gpte)
            used.append((table, idx, gpte))
        w.pt_access[level] = access
        if is_last_gpte(gpte, level):
            break
        table = gpte_to_gfn(gpte, level, mode)
        level -= 1
    w.level = level
    w.gfn = gpte_to_gfn(gpte, level, mode) + (gvpn & (mode.pages_per_gpte(level) - 1))
    w.pte_access = access
    if (write and not access & ACC_WRITE_MASK) or (user and not access & ACC_USER_MASK):
        w.fault = PFERR_PRESENT_MASK | (PFERR_WRITE_MASK if write else 0) | (PFERR_USER_MASK if user else 0)
        return w
    for i, (t, idx, gpte) in enumerate(used):  # FNAME(update_accessed_dirty_bits)
        new = gpte | PT_ACCESSED_MASK
        if write and i == len(used) - 1:
            new |= PT_DIRTY_MASK
        if new != gpte:
            mem.write(t, idx, new)
            w.ad_updates += 1
            if t not in w.written:
                w.written.append(t)
    return w


def gpte_index(sp: KvmMmuPage, idx: int) -> int:
    """The gpte behind shadow entry ``idx`` of ``sp``: the same index for 8-byte gptes; for a
    paging32 guest, a PAE page table holds half a guest table (quadrant 0/1) and a PAE page
    directory a quarter of the guest's, two PAE entries per 4 MiB guest entry."""
    if not sp.has_4_byte_gpte:
        return idx
    if sp.level == 1:
        return sp.quadrant * 512 + idx
    return sp.quadrant * 256 + (idx >> 1)


def sp_quadrant(mode: PagingMode, gvpn: int, level: int) -> int:
    """``role.quadrant`` of the shadow page at ``level`` for an address (paging32 only)."""
    if not mode.has_4_byte_gpte:
        return 0
    return (gvpn >> 9) & 1 if level == 1 else (gvpn >> 18) & 3


def protect_clean_gpte(access: int, gpte: int) -> int:
    """``FNAME(protect_clean_gpte)``: no W in the shadow until the guest's D bit is set, so the
    first write faults and the walk sets D."""
    if not gpte & PT_DIRTY_MASK:
        access &= ~ACC_WRITE_MASK
    return access


def prefetch_invalid_gpte(gpte: int) -> bool:
    """``FNAME(prefetch_invalid_gpte)``: not present, or not accessed (A/D bits are in use)."""
    return not gpte & PT_PRESENT_MASK or not gpte & PT_ACCESSED_MASK
