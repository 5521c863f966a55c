"""Guest memory in memslots (``struct kvm_memory_slot`` / ``struct kvm_memslots``).

Each slot covers ``[base_gfn, base_gfn + npages)`` and is backed by a host mapping whose page size
caps the mapping level. A slot owns its per-slot MMU metadata (``slot->arch``): ``lpage_info``
(``disallow_lpage`` counters for 2M and 1G, raised at misaligned slot edges by
``kvm_alloc_memslot_metadata``), and it is the home of the rmap heads, write-track counters and dirty
bitmap that the legacy MMU, write tracking and dirty logging fill in. The VMM (``vsim.vmm``)
publishes new sets under SRCU; a set is never changed once published, except for its generation.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

import numpy as np

from vsim.host_mm import HostMapping
from vsim.mmu.rmap import alloc_rmap
from vsim.mmu.spte import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, pages_per_level

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEMSLOT_INVALID = 1 << 16


@dataclass(eq=False)
class Memslot:
    """``struct kvm_memory_slot`` plus its ``slot->arch`` metadata."""

    id: int
    base_gfn: int
    npages: int
    host: HostMapping
    host_offset: int = 0  # first host page of this slot within the mapping (userspace_addr)
    flags: int = 0
    # lpage_info[level - 2][index].disallow_lpage, for PG_LEVEL_2M and PG_LEVEL_1G.
    disallow_lpage: list[np.ndarray] = field(default_factory=list)
    # dirty_bitmap, one byte per page, while KVM_MEM_LOG_DIRTY_PAGES is set.
    dirty_bitmap: np.ndarray | None = None
    # slot->arch.rmap[level - 1]: the pte_list heads of the legacy SPTEs mapping each page of a level.
    rmap: list[np.ndarray] = field(default_factory=list)
    # gfn_write_track: per page, the upper-level shadow pages shadowing it (shadow paging).
    write_track: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))

    def __post_init__(self) -> None:
        if not self.disallow_lpage:
            self.disallow_lpage = [self._alloc_lpage_info(lvl) for lvl in (PG_LEVEL_2M, PG_LEVEL_1G)]
        if not self.rmap:
            self.rmap = alloc_rmap(self.base_gfn, self.npages)
        if len(self.write_track) != self.npages:
            self.write_track = np.zeros(self.npages, dtype=np.int32)  # kvm_page_track_write_tracking_alloc

    def _alloc_lpage_info(self, level: int) -> np.ndarray:
        """``kvm_alloc_memslot_metadata``: one counter per huge page; misaligned edges disallowed."""
        shift = 9 * (level - 1)
        first = self.base_gfn >> shift
        last = (self.base_gfn + self.npages - 1) >> shift
        info = np.zeros(last - first + 1, dtype=np.int32)
        span = pages_per_level(level)
        if self.base_gfn & (span - 1):
            info[0] += 1
        if (self.base_gfn + self.npages) & (span - 1):
            info[-1] += 1
        # Host virtual and guest physical addresses must agree modulo the huge-page size.
        if (self.base_gfn ^ (self.host.pfn_base + self.host_offset)) & (span - 1):
            info[:] += 1
        return info

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def gfn_to_pfn(self, gfn: int) -> int:
        """The host pfn backing ``gfn`` (``__gfn_to_hva_memslot`` plus the host page tables)."""
        return self.host.pfn(self.host_offset + gfn - self.base_gfn)

    def resident(self, gfn: int) -> bool:
        """Is the host page behind ``gfn`` present (so that ``gfn_to_page_many_atomic`` gets it)?"""
        return self.host.is_resident(self.host_offset + gfn - self.base_gfn)

    def moved_to(self, base_gfn: int) -> Memslot:
        """The slot after ``KVM_MR_MOVE``: same host memory, new guest frames, fresh metadata."""
        bitmap = None if self.dirty_bitmap is None else np.zeros_like(self.dirty_bitmap)
        return Memslot(id=self.id, base_gfn=base_gfn, npages=self.npages, host=self.host,
                       host_offset=self.host_offset, flags=self.flags & ~KVM_MEMSLOT_INVALID,
                       dirty_bitmap=bitmap)  # fmt: skip

    def faultin(self, gfn: int) -> int:
        """The host side of ``kvm_faultin_pfn``: 4K pages the host zeroed to back ``gfn`` (0 if resident)."""
        return self.host.faultin(self.host_offset + gfn - self.base_gfn)

    def disallow_lpage_at(self, gfn: int, delta: int) -> None:
        """``kvm_mmu_gfn_disallow_lpage`` (+1) / ``kvm_mmu_gfn_allow_lpage`` (-1) at every huge level."""
        for level in (PG_LEVEL_2M, PG_LEVEL_1G):
            shift = 9 * (level - 1)
            self.disallow_lpage[level - 2][(gfn >> shift) - (self.base_gfn >> shift)] += delta

    def lpage_allowed_level(self, gfn: int, max_level: int) -> int:
        """The highest level ≤ ``max_level`` whose ``disallow_lpage`` counter is zero at ``gfn``."""
        level = max_level
        while level > PG_LEVEL_4K:
            shift = 9 * (level - 1)
            if not self.disallow_lpage[level - 2][(gfn >> shift) - (self.base_gfn >> shift)]:
                return level
            level -= 1
        return PG_LEVEL_4K


class Memslots:
    """``struct kvm_memslots`` for one address space: slots sorted by gfn, and the generation."""

    def __init__(self, slots: list[Memslot], generation: int = 0) -> None:
        self.slots = sorted(slots, key=lambda s: s.base_gfn)
        self._bases = [s.base_gfn for s in self.slots]
        self.generation = generation
        for a, b in zip(self.slots, self.slots[1:], strict=False):
            if a.end_gfn > b.base_gfn:
                raise ValueError(f"memslots {a.id} and {b.id} overlap")

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        """``__gfn_to_memslot``: the slot holding ``gfn``, or ``None`` (an MMIO gfn)."""
        i = bisect_right(self._bases, gfn) - 1
        if i >= 0:
            slot = self.slots[i]
            if gfn < slot.end_gfn:
                return slot
        return None

    @property
    def total_pages(self) -> int:
        return sum(s.npages for s in self.slots)


def build_test_memslots(base_gfn: int, total_pages: int, nslots: int, backing_level: int) -> Memslots:
    """Split the test region evenly into ``nslots`` slots carved from one host mapping, as
    dirty_log_perf_test ``-x`` does (so guest and host addresses stay congruent)."""
    per = total_pages // nslots
    host = HostMapping(pfn_base=1 << 18, npages=total_pages, page_level=backing_level)  # 1 GiB-aligned
    slots = [
        Memslot(id=i, base_gfn=base_gfn + i * per, npages=per, host=host, host_offset=i * per) for i in range(nslots)
    ]
    return Memslots(slots)
