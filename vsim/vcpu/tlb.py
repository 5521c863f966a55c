"""The per-vCPU TLB: separate fully-associative LRU arrays for 4K, 2M and 1G translations.

A translation is cached at the size of the smaller of the guest page and the EPT leaf that map it
(a 4K guest page inside a 2M EPT leaf is a 4K entry), keyed by the page number at that size, with
its write permission. A write that hits a read-only entry re-walks, as the CPU does.

``Tlb`` keeps the state in arrays that the compiled batch kernel (``vsim.vcpu.batch``) updates:
per size class a key array, a doubly linked LRU list and an open-addressing hash index. ``RefTlb``
is the same policy written plainly with ``OrderedDict``s, used by the reference mode; tests hold
the two equal access by access.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

NCLASSES = 3  # 4K, 2M, 1G


class Tlb:
    """Array-backed LRU TLB for the batch kernel."""

    def __init__(self, entries_4k: int, entries_2m: int, entries_1g: int) -> None:
        self.cap = np.array([entries_4k, entries_2m, entries_1g], dtype=np.int64)
        capmax = int(self.cap.max())
        hsize = 1
        while hsize < 2 * capmax:
            hsize <<= 1
        self.hmask = hsize - 1
        self.keys = np.full((NCLASSES, capmax), -1, dtype=np.int64)
        self.wr = np.zeros((NCLASSES, capmax), dtype=np.int8)
        self.prv = np.full((NCLASSES, capmax), -1, dtype=np.int64)
        self.nxt = np.full((NCLASSES, capmax), -1, dtype=np.int64)
        # head (MRU), tail (LRU), count per class
        self.lru = np.zeros((NCLASSES, 3), dtype=np.int64)
        self.lru[:, :2] = -1
        self.ht = np.zeros((NCLASSES, hsize), dtype=np.int64)  # slot + 1; 0 = empty

    def flush(self) -> None:
        """Drop every translation (a full flush of this vCPU's context)."""
        self.keys[:] = -1
        self.wr[:] = 0
        self.prv[:] = -1
        self.nxt[:] = -1
        self.lru[:, :2] = -1
        self.lru[:, 2] = 0
        self.ht[:] = 0

    def entries(self) -> list[tuple[int, int, bool]]:
        """``(size_class, key, writable)`` for every cached translation, MRU first per class."""
        out = []
        for c in range(NCLASSES):
            s = int(self.lru[c, 0])
            while s >= 0:
                out.append((c, int(self.keys[c, s]), bool(self.wr[c, s])))
                s = int(self.nxt[c, s])
        return out


class RefTlb:
    """The reference TLB: the same LRU policy on ``OrderedDict``s (last = most recent)."""

    def __init__(self, entries_4k: int, entries_2m: int, entries_1g: int) -> None:
        self.cap = (entries_4k, entries_2m, entries_1g)
        self.sets: tuple[OrderedDict[int, bool], ...] = (OrderedDict(), OrderedDict(), OrderedDict())

    def lookup(self, gfn: int, write: bool) -> bool:
        """A hit touches the entry; a write to a read-only entry is a miss (re-walk)."""
        for c in range(NCLASSES):
            key = gfn >> (9 * c)
            d = self.sets[c]
            if key in d:
                if write and not d[key]:
                    return False
                d.move_to_end(key)
                return True
        return False

    def insert(self, size_class: int, gfn: int, writable: bool) -> None:
        """Cache a translation after a successful walk, evicting the LRU entry when full."""
        key = gfn >> (9 * size_class)
        d = self.sets[size_class]
        if key in d:
            d[key] = writable
            d.move_to_end(key)
            return
        if len(d) >= self.cap[size_class]:
            d.popitem(last=False)
        d[key] = writable

    def flush(self) -> None:
        for d in self.sets:
            d.clear()

    def entries(self) -> list[tuple[int, int, bool]]:
        return [(c, k, w) for c in range(NCLASSES) for k, w in reversed(self.sets[c].items())]
