"""The host side of guest memory: the userspace mapping behind a memslot (the primary MMU).

A mapping has a page size (4K anonymous/shmem, 2M or 1G hugetlb/THP) and remembers which of its
pages the host has populated. The first touch of a host page allocates and zeroes the whole page;
later faults on it find it resident. Host pages are never reclaimed in this version (host-MM
invalidations come with the MMU-notifier work).
"""

from __future__ import annotations

from vsim.mmu.spte import pages_per_level


class HostMapping:
    """The VMA backing one memslot: host pfns ``[pfn_base, pfn_base + npages)``."""

    def __init__(self, pfn_base: int, npages: int, page_level: int) -> None:
        span = pages_per_level(page_level)
        if pfn_base % span:
            raise ValueError("host mapping must be aligned to its page size")
        self.pfn_base = pfn_base
        self.npages = npages
        self.page_level = page_level
        self._span_shift = 9 * (page_level - 1)
        self.resident = bytearray(-(-npages // span))
        self.populated_pages = 0

    def faultin(self, offset: int) -> int:
        """``get_user_pages`` for the 4K page at ``offset``: the number of 4K pages the host had to
        zero (0 if the backing page was already resident)."""
        idx = offset >> self._span_shift
        if self.resident[idx]:
            return 0
        self.resident[idx] = 1
        self.populated_pages += 1
        return 1 << self._span_shift

    def host_pfn_mapping_level(self) -> int:
        """``host_pfn_mapping_level``: the host page size bounds the mapping level."""
        return self.page_level
