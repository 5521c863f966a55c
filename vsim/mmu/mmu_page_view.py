"""Python's views of the shadow pages in arrays (``vsim.mmu.mmu_page``).

``KvmMmuPage`` reads and writes one page's fields in ``Sps``; ``ParentPtes``,
``UnsyncChildBitmap`` and ``ShadowedGfns`` are its list-, set- and dict-shaped fields;
``SpViews`` (``sptep_to_sp``) caches the views of live pages and ``ActivePages`` shows
``active_mmu_pages``. None of them holds state of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import numpy as np

from vsim.mmu.mmu_page import (
    NIL,
    ROLE_ACCESS_SHIFT,
    ROLE_DIRECT,
    ROLE_HAS_4_BYTE_GPTE,
    ROLE_QUADRANT_SHIFT,
    SPF_ACTIVE,
    SPF_LIVE,
    SPF_ROLE_INVALID,
    SPF_UNSYNC,
    Role,
    ShadowPages,
    sp_is_obsolete,
)
from vsim.mmu.pte_list import iter_pte_list
from vsim.mmu.spte import pages_per_level


class KvmMmuPage:
    """A view of one shadow page (``struct kvm_mmu_page``) in ``ShadowPages``'s arrays."""

    __slots__ = ("table", "_sp")

    def __init__(self, pages: ShadowPages, table: int) -> None:
        self.table = table
        self._sp = pages

    def __repr__(self) -> str:
        return f"KvmMmuPage(table={self.table}, gfn={self.gfn:#x}, role={self.role()})"

    def _role(self) -> int:
        return int(self._sp.s.role[self.table])

    @property
    def gfn(self) -> int:
        return int(self._sp.pool.p.sp_gfn[self.table])

    @property
    def level(self) -> int:
        return self._role() & 15

    @property
    def direct(self) -> bool:
        return bool(self._role() & ROLE_DIRECT)

    @property
    def access(self) -> int:
        return (self._role() >> ROLE_ACCESS_SHIFT) & 7

    @property
    def quadrant(self) -> int:
        return (self._role() >> ROLE_QUADRANT_SHIFT) & 3

    @property
    def has_4_byte_gpte(self) -> bool:
        return bool(self._role() & ROLE_HAS_4_BYTE_GPTE)

    def role(self) -> Role:
        return (self.level, self.direct, self.access, self.quadrant, self.has_4_byte_gpte)

    def _flag(self, bit: int) -> bool:
        return bool(self._sp.s.flags[self.table] & bit)

    def _set_flag(self, bit: int, on: bool) -> None:
        if on:
            self._sp.s.flags[self.table] |= bit
        else:
            self._sp.s.flags[self.table] &= ~bit

    @property
    def role_invalid(self) -> bool:
        """``role.invalid``: zapped while still in use as a root."""
        return self._flag(SPF_ROLE_INVALID)

    @role_invalid.setter
    def role_invalid(self, on: bool) -> None:
        self._set_flag(SPF_ROLE_INVALID, on)

    @property
    def unsync(self) -> bool:
        return self._flag(SPF_UNSYNC)

    @unsync.setter
    def unsync(self, on: bool) -> None:
        self._set_flag(SPF_UNSYNC, on)

    @property
    def invalid(self) -> bool:
        """Obsolete (``is_obsolete_sp``): zapped, or from before the last fast zap."""
        return sp_is_obsolete(self._sp.s, self.table)

    @property
    def mmu_valid_gen(self) -> int:
        return int(self._sp.s.valid_gen[self.table])

    root_count = property(lambda self: int(self._sp.s.root_count[self.table]),
                          lambda self, v: self._sp.s.root_count.__setitem__(self.table, v))  # fmt: skip
    unsync_children = property(lambda self: int(self._sp.s.unsync_children[self.table]),
                               lambda self, v: self._sp.s.unsync_children.__setitem__(self.table, v))  # fmt: skip
    write_flooding_count = property(lambda self: int(self._sp.s.flood[self.table]),
                                    lambda self, v: self._sp.s.flood.__setitem__(self.table, v))  # fmt: skip

    @property
    def pae_index(self) -> int | None:
        i = int(self._sp.s.pae_index[self.table])
        return None if i == NIL else i

    @pae_index.setter
    def pae_index(self, i: int | None) -> None:
        self._sp.s.pae_index[self.table] = NIL if i is None else i

    @property
    def parent_ptes(self) -> ParentPtes:
        return ParentPtes(self._sp, self.table)

    @property
    def unsync_child_bitmap(self) -> UnsyncChildBitmap:
        return UnsyncChildBitmap(self._sp.s.unsync_bits, self.table)

    @property
    def gfns(self) -> ShadowedGfns | None:
        """Indirect pages only: ``shadowed_translation``'s gfn per entry (None for direct pages)."""
        return None if self.direct else ShadowedGfns(self._sp.s.gfns[self.table])

    def get_gfn(self, idx: int) -> int:
        """``kvm_mmu_page_get_gfn``: the gfn entry ``idx`` maps (linear for direct pages)."""
        if self.direct:
            return self.gfn + idx * pages_per_level(self.level)
        g = int(self._sp.s.gfns[self.table, idx])
        if g == NIL:
            raise KeyError(idx)
        return g


class ParentPtes:
    """``sp->parent_ptes`` as a sequence of ``(table, index)``, over its ``pte_list`` head."""

    __slots__ = ("_sp", "_t")

    def __init__(self, pages: ShadowPages, table: int) -> None:
        self._sp, self._t = pages, table

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(iter_pte_list(self._sp.descs.d, self._sp.s.parents, self._t)))

    def __bool__(self) -> bool:
        return bool(self._sp.s.parents[self._t])

    def __len__(self) -> int:
        return len(list(iter(self)))

    def append(self, loc: tuple[int, int]) -> None:
        self._sp.descs.add(self._sp.s.parents, self._t, *loc)

    def remove(self, loc: tuple[int, int]) -> None:
        self._sp.descs.remove(self._sp.s.parents, self._t, *loc)

    def clear(self) -> None:
        for loc in list(self):
            self.remove(loc)


class UnsyncChildBitmap:
    """``sp->unsync_child_bitmap`` as a set of entry indices, over 8 words."""

    __slots__ = ("_w",)

    def __init__(self, bits: np.ndarray, table: int) -> None:
        self._w = bits[table]

    def __contains__(self, i: object) -> bool:
        assert isinstance(i, int)
        return bool(int(self._w[i >> 6]) >> (i & 63) & 1)

    def add(self, i: int) -> None:
        self._w[i >> 6] = int(self._w[i >> 6]) | (1 << (i & 63))

    def discard(self, i: int) -> None:
        self._w[i >> 6] = int(self._w[i >> 6]) & ~(1 << (i & 63))

    def clear(self) -> None:
        self._w[:] = 0

    def __iter__(self) -> Iterator[int]:
        for w, word in enumerate(self._w.tolist()):
            while word:
                low = word & -word
                yield w * 64 + low.bit_length() - 1
                word ^= low

    def __len__(self) -> int:
        return sum(bin(w).count("1") for w in self._w.tolist())


class ShadowedGfns(MutableMapping[int, int]):
    """An indirect page's shadowed gfn per entry (-1 in the row where it has none)."""

    __slots__ = ("_row",)

    def __init__(self, row: np.ndarray) -> None:
        self._row = row

    def __getitem__(self, i: int) -> int:
        g = int(self._row[i])
        if g == NIL:
            raise KeyError(i)
        return g

    def __setitem__(self, i: int, gfn: int) -> None:
        self._row[i] = gfn

    def __delitem__(self, i: int) -> None:
        if self._row[i] == NIL:
            raise KeyError(i)
        self._row[i] = NIL

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self._row != NIL).tolist())

    def __len__(self) -> int:
        return int((self._row != NIL).sum())


class SpViews(MutableMapping[int, KvmMmuPage]):
    """``sptep_to_sp``: the live shadow page of each page table, as cached views."""

    def __init__(self, pages: ShadowPages) -> None:
        self._pages = pages
        self._views: dict[int, KvmMmuPage] = {}

    def __getitem__(self, table: int) -> KvmMmuPage:
        view = self._views.get(table)
        if view is None:
            if not self._pages.s.flags[table] & SPF_LIVE:
                raise KeyError(table)
            view = self._views[table] = KvmMmuPage(self._pages, table)
        return view

    def __setitem__(self, table: int, sp: KvmMmuPage) -> None:
        self._views[table] = sp

    def __delitem__(self, table: int) -> None:
        """The page is freed: no longer live."""
        self._pages.s.flags[table] = 0
        self._views.pop(table, None)

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self._pages.s.flags & SPF_LIVE).tolist())

    def __len__(self) -> int:
        return int(np.count_nonzero(self._pages.s.flags & SPF_LIVE))


class ActivePages:
    """``active_mmu_pages`` as an ordered set of views, oldest first (``in``, iteration, ``pop``,
    and ``active[sp] = None`` to put a page at the newest end)."""

    def __init__(self, pages: ShadowPages, views: SpViews) -> None:
        self._pages, self._views = pages, views

    def __contains__(self, sp: object) -> bool:
        assert isinstance(sp, KvmMmuPage)
        return bool(self._pages.s.flags[sp.table] & SPF_ACTIVE) and self._views.get(sp.table) is sp

    def __iter__(self) -> Iterator[KvmMmuPage]:
        return iter([self._views[t] for t in self._pages.active_tables()])

    def __len__(self) -> int:
        return len(self._pages.active_tables())

    def __setitem__(self, sp: KvmMmuPage, _: None) -> None:
        self._pages.active_push(sp.table)

    def pop(self, sp: KvmMmuPage) -> None:
        self._pages.active_pop(sp.table)
