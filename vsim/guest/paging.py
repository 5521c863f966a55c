"""Guest paging modes and guest page-table entries, as KVM's shadow MMU sees them.

``shadow_mmu_init_context`` picks the guest walker from CR0.PG, EFER.LMA and CR4.PAE, the way KVM
does: no paging (a direct MMU over gva == gpa), ``paging64`` (long mode, 4 levels), ``paging32E``
(PAE: four PDPTEs loaded at CR3 time, then 2 levels of 8-byte entries) or ``paging32`` (2 levels of
4-byte entries, 1024 per page, 4 MiB PSE pages). KVM shadows every mode but paging64 with PAE page
tables (``root_role.level = PT32E_ROOT_LEVEL``), so a 32-bit guest page table is shadowed by two
PAE page tables (quadrants 0 and 1) and its page directory by four (quadrants 0..3).

Addresses here are page numbers: a guest virtual page ``gvpn`` is ``gva >> 12``.
"""

from __future__ import annotations

from dataclasses import dataclass

X86_CR0_PG = 1 << 31
X86_CR4_PSE = 1 << 4
X86_CR4_PAE = 1 << 5
EFER_LMA = 1 << 10

# x86 page-table entry bits (both 4- and 8-byte formats).
PT_PRESENT_MASK = 1 << 0
PT_WRITABLE_MASK = 1 << 1
PT_USER_MASK = 1 << 2
PT_ACCESSED_MASK = 1 << 5
PT_DIRTY_MASK = 1 << 6
PT_PAGE_SIZE_MASK = 1 << 7

# KVM's access bits (ACC_*_MASK), accumulated as the AND over the walk.
ACC_EXEC_MASK = 1
ACC_WRITE_MASK = 2
ACC_USER_MASK = 4
ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK

PT64_ROOT_4LEVEL = 4
PT32E_ROOT_LEVEL = 3


@dataclass(frozen=True)
class PagingMode:
    """One guest paging mode: its walk geometry and the shadow root KVM builds for it."""

    name: str
    levels: int  # guest page-table levels walked (0: no paging)
    pte_bytes: int  # 8, or 4 for paging32
    index_bits: int  # bits of the virtual page number per level: 9, or 10 for paging32
    root_level: int  # root_role.level of the shadow (PAE for every mode but paging64)
    max_leaf_level: int  # the largest guest page: 1G (paging64), 2M (PAE), 4M (paging32 PSE)
    phys_bits: int  # guest physical address bits the entries can hold
    page_offset: int  # the guest kernel's direct map (Linux PAGE_OFFSET)
    user_base: int  # where the guest maps its processes' memory

    @property
    def entries(self) -> int:
        """gptes per guest page-table page."""
        return 4096 // self.pte_bytes

    @property
    def has_4_byte_gpte(self) -> bool:
        return self.pte_bytes == 4

    def index(self, gvpn: int, level: int) -> int:
        """The gpte index for ``gvpn`` in a table at ``level`` (PAE's top level: the PDPTE)."""
        if self.levels == 3 and level == 3:
            return (gvpn >> 18) & 3
        return (gvpn >> (self.index_bits * (level - 1))) & (self.entries - 1)

    def pages_per_gpte(self, level: int) -> int:
        """4K pages mapped by one gpte at ``level`` (a 4 MiB PSE page is 1024 for paging32)."""
        return 1 << (self.index_bits * (level - 1))


NONPAGING = PagingMode("nonpaging", 0, 8, 9, PT32E_ROOT_LEVEL, 1, 32, 0, 0)
PAGING32 = PagingMode("paging32", 2, 4, 10, PT32E_ROOT_LEVEL, 2, 32, 0xC0000000 >> 12, 0x08000000 >> 12)
PAGING32E = PagingMode("pae", 3, 8, 9, PT32E_ROOT_LEVEL, 2, 52, 0xC0000000 >> 12, 0x08000000 >> 12)
PAGING64 = PagingMode("paging64", 4, 8, 9, PT64_ROOT_4LEVEL, 3, 52, 0xFFFF888000000000 >> 12, 0x400000000 >> 12)

LOWMEM_PAGES_32 = (896 << 20) >> 12
"""A 32-bit guest kernel's direct map (lowmem) holds at most 896 MiB above PAGE_OFFSET."""

REGISTERS = {
    "nonpaging": (0, 0, 0),
    "paging32": (X86_CR0_PG, X86_CR4_PSE, 0),
    "pae": (X86_CR0_PG, X86_CR4_PAE, 0),
    "paging64": (X86_CR0_PG, X86_CR4_PAE, EFER_LMA),
}
"""The (CR0, CR4, EFER) bits a guest in each mode runs with."""


def shadow_mmu_init_context(cr0: int, cr4: int, efer: int) -> PagingMode:
    """``shadow_mmu_init_context``: the walker for the guest's paging registers."""
    if not cr0 & X86_CR0_PG:
        return NONPAGING
    if efer & EFER_LMA:
        return PAGING64
    if cr4 & X86_CR4_PAE:
        return PAGING32E
    return PAGING32


def gpte_to_gfn(gpte: int, level: int, mode: PagingMode) -> int:
    """The first gfn a gpte maps (``gpte_to_gfn_lvl``); a paging32 PSE entry's address is 4M-aligned."""
    if mode.has_4_byte_gpte:
        gpte &= 0xFFFFFFFF
        if level == 2 and gpte & PT_PAGE_SIZE_MASK:
            return (gpte >> 22) << 10
        return gpte >> 12
    return (gpte & ((1 << 52) - 1)) >> 12


def is_last_gpte(gpte: int, level: int) -> bool:
    """``FNAME(is_last_gpte)``: a 4K entry, or a huge page (PS) above it."""
    return level == 1 or bool(gpte & PT_PAGE_SIZE_MASK)


def gpte_access(gpte: int) -> int:
    """``FNAME(gpte_access)``: W and U from the entry; X always (NX is not modelled)."""
    access = ACC_EXEC_MASK
    if gpte & PT_WRITABLE_MASK:
        access |= ACC_WRITE_MASK
    if gpte & PT_USER_MASK:
        access |= ACC_USER_MASK
    return access


def make_gpte(gfn: int, writable: bool, user: bool, huge: bool = False, mode: PagingMode = PAGING64) -> int:
    """A present gpte as the guest kernel writes it (A and D clear: the CPU or KVM sets them)."""
    addr = (gfn >> 10) << 22 if mode.has_4_byte_gpte and huge else gfn << 12
    return (addr | PT_PRESENT_MASK | (PT_WRITABLE_MASK if writable else 0) | (PT_USER_MASK if user else 0)
            | (PT_PAGE_SIZE_MASK if huge else 0))  # fmt: skip
