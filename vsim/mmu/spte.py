"""The SPTE state model of spec §0.2, with EPT bit positions (``arch/x86/kvm/mmu/spte.h``).

An SPTE is a 64-bit integer. vsim keeps the pre-6.11 encoding in which a non-present SPTE is 0 and a
frozen one is ``REMOVED_SPTE`` (0x5a0); ``SHADOW_NONPRESENT_VALUE`` (bit 63, for TDX #VE
suppression) changes nothing the MMU does. A non-leaf SPTE's address field holds the index of the
child page table in the MMU's page-table pool, where KVM holds the child's physical address.

Each helper is ``register_jitable``: Python calls it as a plain function, and compiled code (the
MMU's operations in ``vsim.mmu.sp_pool`` and ``vsim.mmu.tdp_mmu_map``) compiles the same source in,
so an SPTE rule exists once.
"""

from __future__ import annotations

from numba.extending import register_jitable

PT_PRESENT_R = 1 << 0  # EPT read
PT_WRITABLE = 1 << 1  # EPT write
PT_EXEC = 1 << 2  # EPT execute
EPT_MT_WB = 6 << 3  # memory type write-back
PT_PAGE_SIZE = 1 << 7  # huge leaf
SPTE_ACCESSED = 1 << 8  # EPT A bit (A/D enabled)
SPTE_DIRTY = 1 << 9  # EPT D bit
SPTE_MMU_PRESENT = 1 << 11  # SPTE_MMU_PRESENT_MASK: present to KVM (leaf or non-leaf)
SPTE_HOST_WRITABLE = 1 << 57  # EPT_SPTE_HOST_WRITABLE
SPTE_MMU_WRITABLE = 1 << 58  # EPT_SPTE_MMU_WRITABLE
PFN_SHIFT = 12
PFN_MASK = ((1 << 52) - 1) & ~((1 << 12) - 1)
REMOVED_SPTE = 0x5A0  # FROZEN_SPTE before SHADOW_NONPRESENT_VALUE
ACC_ALL = PT_PRESENT_R | PT_WRITABLE | PT_EXEC

PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G = 1, 2, 3
TDP_ROOT_LEVEL = 4
SPTE_ENT_PER_PAGE = 512
SPTE_LEVEL_BITS = 9


@register_jitable
def is_shadow_present_pte(spte: int) -> bool:
    """``is_shadow_present_pte``: present to KVM (not 0, not frozen, not MMIO)."""
    return bool(spte & SPTE_MMU_PRESENT) and spte != REMOVED_SPTE


@register_jitable
def is_last_spte(spte: int, level: int) -> bool:
    """``is_last_spte``: a leaf at this level (4K level, or a huge page)."""
    return level == PG_LEVEL_4K or bool(spte & PT_PAGE_SIZE)


@register_jitable
def is_present_leaf(spte: int, level: int) -> bool:
    """A present leaf at ``level`` (``is_shadow_present_pte`` and ``is_last_spte``): what
    ``kvm_update_page_stats`` counts."""
    present = bool(spte & SPTE_MMU_PRESENT) and spte != REMOVED_SPTE
    return present and (level == PG_LEVEL_4K or bool(spte & PT_PAGE_SIZE))


@register_jitable
def is_writable_pte(spte: int) -> bool:
    return bool(spte & PT_WRITABLE)


@register_jitable
def is_mmu_writable_spte(spte: int) -> bool:
    return bool(spte & SPTE_MMU_WRITABLE)


@register_jitable
def spte_to_pfn(spte: int) -> int:
    return (spte & PFN_MASK) >> PFN_SHIFT


@register_jitable
def pages_per_level(level: int) -> int:
    """``KVM_PAGES_PER_HPAGE``: 4K pages mapped by one leaf at ``level``."""
    return 1 << (SPTE_LEVEL_BITS * (level - 1))


@register_jitable
def spte_index(gfn: int, level: int) -> int:
    """``SPTE_INDEX``: the entry for ``gfn`` in a page table at ``level``."""
    return (gfn >> (SPTE_LEVEL_BITS * (level - 1))) & (SPTE_ENT_PER_PAGE - 1)


@register_jitable
def make_spte(pfn: int, level: int, host_writable: bool, prefetch: bool = False) -> int:
    """``make_spte`` for a direct (TDP) mapping with ``ACC_ALL`` access and A/D bits enabled.

    Sets A unless prefetching; W and MMU-writable when the host page is writable; D whenever the
    result is writable (KVM sets D up front on writable SPTEs); PS on huge leaves.
    """
    spte = SPTE_MMU_PRESENT | PT_PRESENT_R | PT_EXEC | EPT_MT_WB | (pfn << PFN_SHIFT)
    if not prefetch:
        spte |= SPTE_ACCESSED
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE
    if host_writable:
        spte |= SPTE_HOST_WRITABLE | SPTE_MMU_WRITABLE | PT_WRITABLE | SPTE_DIRTY
    return spte


@register_jitable
def make_nonleaf_spte(child_table: int) -> int:
    """``make_nonleaf_spte``: a present entry pointing to a child page table."""
    return SPTE_MMU_PRESENT | ACC_ALL | SPTE_ACCESSED | (child_table << PFN_SHIFT)


@register_jitable
def make_huge_page_split_spte(huge_spte: int, huge_level: int, index: int) -> int:
    """``make_huge_page_split_spte``: child ``index`` of a split huge leaf, same permissions."""
    child_level = huge_level - 1
    pfn = spte_to_pfn(huge_spte) + index * pages_per_level(child_level)
    spte = (huge_spte & ~PFN_MASK) | (pfn << PFN_SHIFT)
    if child_level == PG_LEVEL_4K:
        spte &= ~PT_PAGE_SIZE
    return spte


# Access tracking without A/D bits (kvm_intel.ept_ad=0): the RWX bits are cleared so the next access
# faults, with R and X saved higher up (W is dropped; fast_page_fault gives it back on a write).
SHADOW_ACC_TRACK_SAVED_BITS_MASK = PT_PRESENT_R | PT_EXEC
SHADOW_ACC_TRACK_SAVED_BITS_SHIFT = 54
RWX_MASK = ACC_ALL


@register_jitable
def is_access_track_spte(spte: int) -> bool:
    """``is_access_track_spte``: present to KVM, no RWX for the hardware."""
    return bool(spte & SPTE_MMU_PRESENT) and spte != REMOVED_SPTE and not spte & RWX_MASK


@register_jitable
def mark_spte_for_access_track(spte: int) -> int:
    """``mark_spte_for_access_track``: save R and X, clear RWX."""
    if is_access_track_spte(spte):
        return spte
    saved = (spte & SHADOW_ACC_TRACK_SAVED_BITS_MASK) << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    return (spte & ~RWX_MASK) | saved


@register_jitable
def restore_acc_track_spte(spte: int) -> int:
    """``restore_acc_track_spte``: put R and X back."""
    saved = (spte >> SHADOW_ACC_TRACK_SAVED_BITS_SHIFT) & SHADOW_ACC_TRACK_SAVED_BITS_MASK
    return (spte & ~(SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)) | saved


@register_jitable
def spte_is_young(spte: int, ad: bool) -> bool:
    """Accessed since it was last aged: A set (A/D bits on), or not access-tracked (off)."""
    return bool(spte & SPTE_ACCESSED) if ad else not is_access_track_spte(spte)


@register_jitable
def age_spte(spte: int, ad: bool) -> int:
    """``kvm_age_gfn`` on one leaf: clear A, or mark it for access tracking without A/D bits."""
    return spte & ~SPTE_ACCESSED if ad else mark_spte_for_access_track(spte)


@register_jitable
def spte_is_legal(spte: int) -> bool:
    """The write-permission lattice of §0.2: (Host-writable, MMU-writable, W) ∈ {111, 110, 100, 000};
    and W only with R."""
    if not is_shadow_present_pte(spte):
        return True
    h = bool(spte & SPTE_HOST_WRITABLE)
    m = bool(spte & SPTE_MMU_WRITABLE)
    w = bool(spte & PT_WRITABLE)
    # ...and W without R is an EPT misconfiguration, never a leaf KVM installs.
    return (not w or m) and (not m or h) and (not w or bool(spte & PT_PRESENT_R))
