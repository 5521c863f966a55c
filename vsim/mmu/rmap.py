"""The reverse map (spec §3): for each memslot and level, the legacy SPTEs that map each gfn.

``slot->arch.rmap[level - 1]`` holds one head per huge page of that level in the slot. A head is a
``pte_list``, encoded as KVM encodes it (``PteList``): empty, a single SPTE, or a chain of
``pte_list_desc`` descriptors of up to ``PTE_LIST_EXT`` (14) SPTEs. New entries go into the head
descriptor, a full head gets a new head in front of it (so tail descriptors are always full), and a
removal moves the head's last entry into the vacated place. Iteration visits the head descriptor
first, so the order in which walks meet SPTEs is KVM's. ``pte_list_add`` returns the count before
the add: ``max_mmu_rmap_size`` and the ``RMAP_RECYCLE_THRESHOLD`` (1000) test use it, and past the
threshold the caller zaps every SPTE on the head and flushes (``rmap_recycle``). A walk costs time
per entry it visits. The TDP MMU has no rmaps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vsim.memslots import Memslot

PTE_LIST_EXT = 14
RMAP_RECYCLE_THRESHOLD = 1000

Loc = tuple[int, int]  # (page table, index): where KVM holds an sptep


class PteList:
    """``struct kvm_rmap_head``: one SPTE, or descriptors (``descs[0]`` is the head)."""

    __slots__ = ("single", "descs")

    def __init__(self) -> None:
        self.single: Loc | None = None
        self.descs: list[list[Loc]] = []

    def add(self, loc: Loc) -> int:
        """``pte_list_add``: returns how many entries the list held before."""
        if self.single is None and not self.descs:
            self.single = loc
            return 0
        if self.single is not None:  # the second entry: a descriptor holds both
            self.descs = [[self.single, loc]]
            self.single = None
            return 1
        head = self.descs[0]
        count = len(head) + (len(self.descs) - 1) * PTE_LIST_EXT  # tail_count + spte_count
        if len(head) == PTE_LIST_EXT:
            head = []
            self.descs.insert(0, head)
        head.append(loc)
        return count

    def remove(self, loc: Loc) -> None:
        """``pte_list_remove``: the head's last entry fills the hole; an empty head is freed."""
        if self.single is not None:
            if self.single != loc:
                raise KeyError(loc)
            self.single = None
            return
        for desc in self.descs:
            for i, entry in enumerate(desc):
                if entry == loc:
                    head = self.descs[0]
                    desc[i] = head[-1]
                    head.pop()
                    if not head:
                        self.descs.pop(0)
                    return
        raise KeyError(loc)

    def entries(self) -> list[Loc]:
        """``for_each_rmap_spte``: the head descriptor first, each in index order."""
        if self.single is not None:
            return [self.single]
        return [loc for desc in self.descs for loc in desc]

    def __bool__(self) -> bool:
        return self.single is not None or bool(self.descs)

    def __len__(self) -> int:
        return 1 if self.single is not None else sum(len(d) for d in self.descs)


def gfn_to_rmap_index(slot: Memslot, gfn: int, level: int) -> int:
    """``gfn_to_index``: the head for ``gfn`` at ``level`` within the slot."""
    shift = 9 * (level - 1)
    return (gfn >> shift) - (slot.base_gfn >> shift)


def rmap_add(slot: Memslot, gfn: int, level: int, loc: Loc) -> int:
    """``rmap_add`` → ``pte_list_add``: the number of SPTEs the head held before this one."""
    heads = slot.rmap[level - 1]
    i = gfn_to_rmap_index(slot, gfn, level)
    head = heads.get(i)
    if head is None:
        head = heads[i] = PteList()
    return head.add(loc)


def rmap_remove(slot: Memslot, gfn: int, level: int, loc: Loc) -> None:
    """``rmap_remove`` / ``pte_list_remove``."""
    heads = slot.rmap[level - 1]
    i = gfn_to_rmap_index(slot, gfn, level)
    head = heads[i]
    head.remove(loc)
    if not head:
        del heads[i]


def rmap_entries(slot: Memslot, gfn: int, level: int) -> list[Loc]:
    """The SPTEs on ``gfn``'s head at ``level`` (``for_each_rmap_spte``)."""
    head = slot.rmap[level - 1].get(gfn_to_rmap_index(slot, gfn, level))
    return head.entries() if head is not None else []
