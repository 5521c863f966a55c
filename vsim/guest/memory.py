"""Guest physical memory as far as the shadow MMU reads it: page-table pages, and free frames.

``GuestMemory`` holds the entries of every guest page that has ever been written as a page table
(other pages carry no state vsim reads; a page never written reads as zeros). KVM reads the same
entries through the memslot's host mapping (``FNAME(walk_addr)``, ``kvm_sync_page``, the emulated
write in ``kvm_mmu_track_write``).

``FramePool`` is one CPU's list of free guest frames, handed out and taken back last-in first-out,
as the guest kernel's per-CPU page lists do: a page-table page freed by an exiting process is the
next page allocated, which is what makes KVM's stale shadow pages meet writes (write flooding).
"""

from __future__ import annotations

import numpy as np


class GuestMemory:
    """The gptes of guest page-table pages, by gfn."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self.tables: dict[int, np.ndarray] = {}

    def read(self, gfn: int, idx: int) -> int:
        t = self.tables.get(gfn)
        return 0 if t is None else int(t[idx])

    def write(self, gfn: int, idx: int, value: int) -> None:
        t = self.tables.get(gfn)
        if t is None:
            if not value:
                return
            t = self.tables[gfn] = np.zeros(self.entries, dtype=np.int64)
        t[idx] = value

    def zero(self, gfn: int) -> None:
        """``clear_page``: every entry zero."""
        self.tables.pop(gfn, None)

    def present(self, gfn: int) -> list[int]:
        """Indices of the non-zero entries of a page, in order."""
        t = self.tables.get(gfn)
        return [] if t is None else np.flatnonzero(t).tolist()


class FramePool:
    """Free guest frames of one CPU, LIFO; initially in ascending order."""

    def __init__(self, first_gfn: int, npages: int) -> None:
        self.first = first_gfn
        self.npages = npages
        self._free = list(range(first_gfn + npages - 1, first_gfn - 1, -1))

    def alloc(self) -> int:
        if not self._free:
            raise MemoryError(f"guest frame pool at gfn {self.first:#x} ({self.npages} pages) is exhausted")
        return self._free.pop()

    def free(self, gfn: int) -> None:
        self._free.append(gfn)

    @property
    def available(self) -> int:
        return len(self._free)
