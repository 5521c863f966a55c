"""The reverse map (spec §3): for each memslot and level, the legacy SPTEs that map each gfn.

``slot->arch.rmap[level - 1]`` holds one head per huge page of that level in the slot, an int64
``pte_list`` head (``vsim.mmu.pte_list``) whose descriptors come from the MMU's pool. Iteration
visits the head descriptor first, so the order in which walks meet SPTEs is KVM's.
``pte_list_add`` returns the count before the add: ``max_mmu_rmap_size`` and the
``RMAP_RECYCLE_THRESHOLD`` (1000) test use it, and past the threshold the caller zaps every SPTE on
the head and flushes (``rmap_recycle``). A walk costs time per entry it visits. The TDP MMU has no
rmaps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numba.extending import register_jitable

from vsim.mmu.pte_list import DescPool
from vsim.mmu.spte import PG_LEVEL_1G

if TYPE_CHECKING:
    from vsim.memslots import Memslot

RMAP_RECYCLE_THRESHOLD = 1000

Loc = tuple[int, int]  # (page table, index): where KVM holds an sptep


def alloc_rmap(base_gfn: int, npages: int) -> list[np.ndarray]:
    """``memslot_rmap_alloc``: one empty head per page of each level the slot overlaps."""
    heads = []
    for level in range(1, PG_LEVEL_1G + 1):
        shift = 9 * (level - 1)
        heads.append(np.zeros(((base_gfn + npages - 1) >> shift) - (base_gfn >> shift) + 1, dtype=np.int64))
    return heads


@register_jitable
def rmap_head_index(base_gfn: int, gfn: int, level: int) -> int:
    """``gfn_to_index``: the head for ``gfn`` at ``level`` in a slot starting at ``base_gfn``."""
    shift = 9 * (level - 1)
    return (gfn >> shift) - (base_gfn >> shift)


def gfn_to_rmap_index(slot: Memslot, gfn: int, level: int) -> int:
    """``gfn_to_index`` within ``slot``."""
    return int(rmap_head_index(slot.base_gfn, gfn, level))


def rmap_entries(descs: DescPool, slot: Memslot, gfn: int, level: int) -> list[Loc]:
    """The SPTEs on ``gfn``'s head at ``level`` (``for_each_rmap_spte``)."""
    return descs.entries(slot.rmap[level - 1], gfn_to_rmap_index(slot, gfn, level))
