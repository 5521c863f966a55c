"""The host side of guest memory: the userspace mapping behind a memslot (the primary MMU).

A mapping has a page size (4K anonymous/shmem, 2M or 1G hugetlb/THP) and remembers which of its
pages the host has populated. The first touch of a host page allocates and zeroes the whole page;
later faults on it find it resident. The host may move a page to a new pfn (NUMA balancing, KSM,
compaction) or free it (``MADV_DONTNEED``; the next touch allocates a new zeroed page): both change
the pfn behind the address, after the MMU notifiers have told KVM (``vsim.mmu_notifier``).
"""

from __future__ import annotations

import numpy as np
from numba.extending import register_jitable

from vsim.mmu.spte import pages_per_level

FRESH_PFN_BASE = 1 << 37  # replacement pages, far from every mapping's own pfns (52-bit physical)


@register_jitable
def host_pfn(new_base: np.ndarray, pfn_base: int, span_shift: int, offset: int) -> int:
    """The host pfn behind the 4K page at ``offset`` of a mapping whose pages are ``1 << span_shift``
    4K pages: its own, or within the page a move gave it (``new_base``, 0 if never moved)."""
    new = new_base[offset >> span_shift]
    if new == 0:
        return pfn_base + offset
    return new + (offset & ((1 << span_shift) - 1))


class HostMapping:
    """The VMA backing one memslot: host pfns ``[pfn_base, pfn_base + npages)``."""

    def __init__(self, pfn_base: int, npages: int, page_level: int) -> None:
        span = pages_per_level(page_level)
        if pfn_base % span:
            raise ValueError("host mapping must be aligned to its page size")
        self.pfn_base = pfn_base
        self.npages = npages
        self.page_level = page_level
        self.span_shift = 9 * (page_level - 1)
        self.resident = np.zeros(-(-npages // span), dtype=np.uint8)
        self.moved = np.zeros(len(self.resident), dtype=np.uint8)  # host pages with a new pfn
        self.populated_pages = 0
        self.new_base = np.zeros(len(self.resident), dtype=np.int64)  # a moved host page's new first pfn, or 0
        self._next_free = FRESH_PFN_BASE  # where replacement pages come from (aligned)

    def pfn(self, offset: int) -> int:
        """The host pfn now backing the 4K page at ``offset`` (the primary MMU's PTE)."""
        return int(host_pfn(self.new_base, self.pfn_base, self.span_shift, offset))

    def replace_page(self, idx: int, free: bool) -> None:
        """Host page ``idx`` moves to a new pfn (migration keeps its contents; ``free`` drops it, so
        the next touch allocates and zeroes)."""
        self.new_base[idx] = self._next_free
        self.moved[idx] = 1
        self._next_free += 1 << self.span_shift
        if free and self.resident[idx]:
            self.resident[idx] = 0
            self.populated_pages -= 1

    def faultin(self, offset: int) -> int:
        """``get_user_pages`` for the 4K page at ``offset``: the number of 4K pages the host had to
        zero (0 if the backing page was already resident)."""
        idx = offset >> self.span_shift
        if self.resident[idx]:
            return 0
        self.resident[idx] = 1
        self.populated_pages += 1
        return 1 << self.span_shift

    def is_resident(self, offset: int) -> bool:
        return bool(self.resident[offset >> self.span_shift])

    def host_pfn_mapping_level(self) -> int:
        """``host_pfn_mapping_level``: the host page size bounds the mapping level."""
        return self.page_level
