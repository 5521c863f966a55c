"""The reverse map (spec §3): for each memslot and level, the legacy SPTEs that map each gfn.

``slot->arch.rmap[level - 1]`` holds one head per huge page of that level in the slot. KVM encodes a
head as a ``pte_list``: a single SPTE pointer, or a chain of descriptors of ``PTE_LIST_EXT`` (14)
pointers. vsim keeps each head as a list of SPTE locations ``(table, index)`` and costs a walk by
the entries it visits. ``rmap_add`` reports the chain length: past ``RMAP_RECYCLE_THRESHOLD``
(1000) the caller zaps every SPTE on it and flushes (``rmap_recycle``). The TDP MMU has no rmaps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vsim.memslots import Memslot

PTE_LIST_EXT = 14
RMAP_RECYCLE_THRESHOLD = 1000

Loc = tuple[int, int]  # (page table, index): where KVM holds an sptep


def gfn_to_rmap_index(slot: Memslot, gfn: int, level: int) -> int:
    """``gfn_to_index``: the head for ``gfn`` at ``level`` within the slot."""
    shift = 9 * (level - 1)
    return (gfn >> shift) - (slot.base_gfn >> shift)


def rmap_add(slot: Memslot, gfn: int, level: int, loc: Loc) -> int:
    """``rmap_add`` / ``pte_list_add``: returns the number of SPTEs now on the head."""
    chain = slot.rmap[level - 1].setdefault(gfn_to_rmap_index(slot, gfn, level), [])
    chain.append(loc)
    return len(chain)


def rmap_remove(slot: Memslot, gfn: int, level: int, loc: Loc) -> None:
    """``rmap_remove`` / ``pte_list_remove``."""
    heads = slot.rmap[level - 1]
    i = gfn_to_rmap_index(slot, gfn, level)
    chain = heads[i]
    chain.remove(loc)
    if not chain:
        del heads[i]


def rmap_entries(slot: Memslot, gfn: int, level: int) -> list[Loc]:
    """The SPTEs on ``gfn``'s head at ``level`` (``for_each_rmap_spte``)."""
    return list(slot.rmap[level - 1].get(gfn_to_rmap_index(slot, gfn, level), ()))
