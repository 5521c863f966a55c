"""The per-vCPU TLB: separate set-associative arrays for 4K, 2M and 1G translations, LRU per set.

A translation is cached at the size of the smaller of the guest page and the EPT leaf that map it
(a 4K guest page inside a 2M EPT leaf is a 4K entry), keyed by its page number at that size, with
its write permission. The set is ``key % sets``; within a set, replacement is exact LRU. With
``ways == entries`` a size class is fully associative. A write that hits a read-only entry re-walks,
as the CPU does.

``Tlb`` keeps each set as a recency-ordered row (way 0 = most recent) in arrays that the compiled
batch kernel (``vsim.vcpu.batch``) updates. ``RefTlb`` is the same policy written plainly with
Python lists, used by the reference mode; tests hold the two equal access by access.
"""

from __future__ import annotations

import numpy as np

NCLASSES = 3  # 4K, 2M, 1G
EMPTY = -1


class Tlb:
    """Array-backed TLB for the batch kernel: ``tags[class, set, way]``, MRU first."""

    def __init__(self, entries: tuple[int, int, int], ways: tuple[int, int, int]) -> None:
        self.ways = np.array(ways, dtype=np.int64)
        self.sets = np.array([e // w for e, w in zip(entries, ways, strict=True)], dtype=np.int64)
        shape = (NCLASSES, int(self.sets.max()), int(self.ways.max()))
        self.tags = np.full(shape, EMPTY, dtype=np.int64)
        self.wr = np.zeros(shape, dtype=np.int8)
        self.count = np.zeros(NCLASSES, dtype=np.int64)  # entries held per class

    def flush(self) -> None:
        """Drop every translation (a full flush of this vCPU's context)."""
        self.tags[:] = EMPTY
        self.wr[:] = 0
        self.count[:] = 0

    def peek(self, size_class: int, key: int) -> int:
        """The write state of the entry for ``key`` (-1 if absent), without touching LRU order."""
        row = key % int(self.sets[size_class])
        for i in range(int(self.ways[size_class])):
            k = int(self.tags[size_class, row, i])
            if k == EMPTY:
                break
            if k == key:
                return int(self.wr[size_class, row, i])
        return -1

    def invalidate(self, page: int) -> None:
        """Drop the translations of one page in every size class (INVLPG / INVVPID address)."""
        for c in range(NCLASSES):
            key = page >> (9 * c)
            row = key % int(self.sets[c])
            n = int(self.ways[c])
            tags, wr = self.tags[c, row], self.wr[c, row]
            for i in range(n):
                if tags[i] == EMPTY:
                    break
                if tags[i] == key:
                    tags[i : n - 1] = tags[i + 1 : n].copy()
                    wr[i : n - 1] = wr[i + 1 : n].copy()
                    tags[n - 1] = EMPTY
                    wr[n - 1] = 0
                    self.count[c] -= 1
                    break

    def entries(self) -> list[tuple[int, int, bool]]:
        """``(size_class, key, writable)`` for every cached translation, by set, MRU first."""
        out = []
        for c in range(NCLASSES):
            for s in range(int(self.sets[c])):
                for w in range(int(self.ways[c])):
                    key = int(self.tags[c, s, w])
                    if key == EMPTY:
                        break
                    out.append((c, key, bool(self.wr[c, s, w])))
        return out


class RefTlb:
    """The reference TLB: the same policy on lists (each set's list is MRU first)."""

    def __init__(self, entries: tuple[int, int, int], ways: tuple[int, int, int]) -> None:
        self.ways = ways
        self.nsets = tuple(e // w for e, w in zip(entries, ways, strict=True))
        self.sets: list[list[list[list[int]]]] = [[[] for _ in range(n)] for n in self.nsets]

    def lookup(self, gfn: int, write: bool) -> bool:
        """A hit moves the entry to the front of its set; a write to a read-only entry misses."""
        for c in range(NCLASSES):
            key = gfn >> (9 * c)
            row = self.sets[c][key % self.nsets[c]]
            for i, entry in enumerate(row):
                if entry[0] == key:
                    if write and entry[1] < 2:  # read-only, or D clear: the CPU walks
                        return False
                    row.insert(0, row.pop(i))
                    return True
        return False

    def insert(self, size_class: int, gfn: int, writable: int) -> None:
        """Cache a translation after a successful walk, evicting the set's LRU entry when full.
        ``writable``: 0 read-only, 1 writable with D clear, 2 writable and dirty."""
        key = gfn >> (9 * size_class)
        row = self.sets[size_class][key % self.nsets[size_class]]
        for i, entry in enumerate(row):
            if entry[0] == key:
                row.pop(i)
                break
        else:
            if len(row) == self.ways[size_class]:
                row.pop()
        row.insert(0, [key, writable])

    def peek(self, size_class: int, key: int) -> int:
        for entry in self.sets[size_class][key % self.nsets[size_class]]:
            if entry[0] == key:
                return int(entry[1])
        return -1

    def invalidate(self, page: int) -> None:
        for c in range(NCLASSES):
            key = page >> (9 * c)
            row = self.sets[c][key % self.nsets[c]]
            for i, entry in enumerate(row):
                if entry[0] == key:
                    row.pop(i)
                    break

    def flush(self) -> None:
        for sets in self.sets:
            for row in sets:
                row.clear()

    def entries(self) -> list[tuple[int, int, bool]]:
        return [(c, int(k), bool(w)) for c in range(NCLASSES) for row in self.sets[c] for k, w in row]
