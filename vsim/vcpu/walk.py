"""The hardware's 2D page walk (guest page tables × EPT), as the CPU does it on a TLB miss.

A 4-level guest walk makes one reference per guest level, and each guest page-table page's address
is itself translated through the EPT; the final guest-physical address is translated last. With
``g`` guest levels, ``e_pt`` EPT levels for the guest's page-table pages and ``e`` EPT levels for the
data page, the walk makes ``g * (e_pt + 1) + e`` memory references: 24 for 4K pages at both stages
(cost-anchors row 2.1). Paging-structure caches are not modelled, so this is the architectural
count. The guest's page-table pages sit in boot memory, which is mapped at 4K in the EPT before the
vCPUs start; only the test region's data pages fault.

This module is the plain reference; the batched walk is the same logic inside
``vsim.vcpu.batch.run_accesses``.
"""

from __future__ import annotations

import numpy as np

from vsim.mmu.spte import PFN_MASK, PFN_SHIFT, PT_PAGE_SIZE, PT_PRESENT_R, PT_WRITABLE, SPTE_DIRTY, TDP_ROOT_LEVEL

BOOT_PT_EPT_LEVELS = 4
"""EPT levels walked to translate a guest page-table page (boot memory, 4K EPT leaves)."""


def guest_walk_levels(guest_level: int) -> int:
    """Levels of a 4-level guest walk that ends at a leaf of ``guest_level`` (4, 3 or 2)."""
    return TDP_ROOT_LEVEL + 1 - guest_level


MISCONFIG = -1
"""``ept_walk``'s leaf level for an MMIO SPTE (RWX = 110b: an EPT misconfiguration)."""


def ept_walk(spt: np.ndarray, root_table: int, gfn: int) -> tuple[int, int, int]:
    """Walk the EPT for ``gfn``: ``(references, leaf_level, leaf_spte)``; the level is 0 for a
    non-present entry and ``MISCONFIG`` for an MMIO SPTE."""
    table = root_table
    level = TDP_ROOT_LEVEL
    refs = 0
    while True:
        refs += 1
        e = int(spt[table, (gfn >> (9 * (level - 1))) & 511])
        if e & 7 == 6:
            return refs, MISCONFIG, e
        if not e & PT_PRESENT_R:
            return refs, 0, 0
        if level == 1 or e & PT_PAGE_SIZE:
            return refs, level, e
        table = (e & PFN_MASK) >> PFN_SHIFT
        level -= 1


def guest_refs_2d(guest_level: int) -> int:
    """References a 2D walk makes besides the EPT walk of the data page: each guest level's entry,
    and the EPT walk that translates its table."""
    return guest_walk_levels(guest_level) * (BOOT_PT_EPT_LEVELS + 1)


def walk_2d(spt: np.ndarray, root_table: int, gfn: int, write: bool, guest_refs: int) -> tuple[bool, int, int, int]:
    """One hardware walk: ``(ok, references, leaf_level, write_state)``; ``ok`` is False on an EPT
    violation or misconfiguration (``leaf_level == MISCONFIG``). ``write_state`` is what a TLB entry
    caches: 0 read-only, 1 writable with D clear, 2 writable and dirty. ``guest_refs`` are the
    references besides the walk of ``root_table`` (``guest_refs_2d``; a shadow walk's own offset)."""
    refs, leaf_level, spte = ept_walk(spt, root_table, gfn)
    refs += guest_refs
    writable = bool(spte & PT_WRITABLE)
    ok = leaf_level > 0 and (writable or not write)
    return ok, refs, leaf_level, (2 if spte & SPTE_DIRTY else 1) if writable else 0
