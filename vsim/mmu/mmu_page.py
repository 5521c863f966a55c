"""``struct kvm_mmu_page`` in arrays: the shadow pages' roles, counts, links, hash and LRU list.

Every shadow page owns one page table of the pool, so its fields are arrays indexed by that table
(``Sps``, owned by ``ShadowPages``): the packed role (``union kvm_mmu_page_role``: level, direct,
access, quadrant, has_4_byte_gpte), ``mmu_valid_gen``, ``root_count``, flags (live, on
``active_mmu_pages``, ``role.invalid``, unsync), ``unsync_children`` and ``unsync_child_bitmap``,
``write_flooding_count``, the PAE-root index, the ``parent_ptes`` head (a ``pte_list``, from the
same descriptor pool as the rmaps), and for indirect pages ``shadowed_translation``'s gfn per entry.
``mmu_page_hash`` (4096 buckets by gfn) and ``active_mmu_pages`` (oldest first) are doubly linked
lists through the same arrays. The level and gfn are the pool's (``Pool.sp_level/sp_gfn``).

Python code reaches a page through ``KvmMmuPage``, a view that reads and writes these arrays; the
views of live pages are cached in ``SpViews`` (``sptep_to_sp``). Compiled code works on ``Sps``
directly, so a page has one home whichever code made it.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from numba.extending import register_jitable

from vsim.mmu.pte_list import DescPool, iter_pte_list
from vsim.mmu.spte import pages_per_level
from vsim.stats import K_MAX_HASH_COLLISIONS

if TYPE_CHECKING:
    from vsim.mmu.sp_pool import SpPool

KVM_MMU_HASH_SHIFT = 12
GOLDEN_RATIO_64 = 0x61C8864680B583EB
# Flags.
SPF_LIVE, SPF_ACTIVE, SPF_ROLE_INVALID, SPF_UNSYNC = 1, 2, 4, 8
# The packed role: level in bits 0-3, direct 4, access 5-7, quadrant 8-9, has_4_byte_gpte 10.
ROLE_DIRECT, ROLE_ACCESS_SHIFT, ROLE_QUADRANT_SHIFT, ROLE_HAS_4_BYTE_GPTE = 1 << 4, 5, 8, 1 << 10
# The header: the oldest and newest page on active_mmu_pages (-1: none), n_used_mmu_pages, and
# kvm->arch.mmu_valid_gen.
S_ACT_OLDEST, S_ACT_NEWEST, S_N_USED, S_VALID_GEN = range(4)
NIL = -1
NO_ROLE = -1  # a packed role no page has

Role = tuple[int, bool, int, int, bool]  # (level, direct, access, quadrant, has_4_byte_gpte)


@register_jitable
def kvm_page_table_hashfn(gfn: int) -> int:
    """``hash_64(gfn, KVM_MMU_HASH_SHIFT)``: the top 12 bits of the low 64 of ``gfn * GOLDEN_RATIO_64``
    (the same with Python's exact product and compiled code's wrapping one)."""
    return ((gfn * GOLDEN_RATIO_64) >> (64 - KVM_MMU_HASH_SHIFT)) & ((1 << KVM_MMU_HASH_SHIFT) - 1)


def pack_role(role: Role) -> int:
    level, direct, access, quadrant, has4 = role
    return (level | (ROLE_DIRECT if direct else 0) | access << ROLE_ACCESS_SHIFT | quadrant << ROLE_QUADRANT_SHIFT
            | (ROLE_HAS_4_BYTE_GPTE if has4 else 0))  # fmt: skip


class Sps(NamedTuple):
    """The shadow pages' arrays (indexed by page table), as compiled code takes them."""

    role: np.ndarray
    valid_gen: np.ndarray
    root_count: np.ndarray
    flags: np.ndarray
    unsync_children: np.ndarray
    unsync_bits: np.ndarray  # (tables, 8) uint64: unsync_child_bitmap
    flood: np.ndarray  # write_flooding_count
    pae_index: np.ndarray  # a PAE root's entry in pae_root, or -1
    parents: np.ndarray  # parent_ptes: pte_list heads
    gfns: np.ndarray  # (tables, 512) shadowed gfns of indirect pages, -1 where none; (0, 512) without
    leaf_rmap: np.ndarray  # (tables, 512) int32: 1 + the rmap (ShadowMmu.rmaps) holding each leaf, 0 if none
    hash_head: np.ndarray  # (4096,) first page of each bucket
    hash_tail: np.ndarray  # (4096,) last page of each bucket
    hash_next: np.ndarray
    hash_prev: np.ndarray
    act_next: np.ndarray  # towards the newest
    act_prev: np.ndarray  # towards the oldest
    hdr: np.ndarray


@register_jitable
def sp_active_push(s: Sps, table: int) -> None:
    """Put a page at the newest end (``list_add`` at the head of ``active_mmu_pages``)."""
    newest = s.hdr[S_ACT_NEWEST]
    s.act_prev[table] = newest
    s.act_next[table] = NIL
    if newest == NIL:
        s.hdr[S_ACT_OLDEST] = table
    else:
        s.act_next[newest] = table
    s.hdr[S_ACT_NEWEST] = table
    s.flags[table] |= SPF_ACTIVE


@register_jitable
def sp_active_pop(s: Sps, table: int) -> None:
    """Take a page off ``active_mmu_pages``."""
    prev, nxt = s.act_prev[table], s.act_next[table]
    if prev == NIL:
        s.hdr[S_ACT_OLDEST] = nxt
    else:
        s.act_next[prev] = nxt
    if nxt == NIL:
        s.hdr[S_ACT_NEWEST] = prev
    else:
        s.act_prev[nxt] = prev
    s.flags[table] &= ~SPF_ACTIVE


@register_jitable
def sp_init(s: Sps, table: int, gfn: int, role: int, valid_gen: int) -> None:
    """``kvm_mmu_alloc_shadow_page`` on a table fresh from the pool: the packed role, hashed at its
    bucket's end, the newest on ``active_mmu_pages``, counted in ``n_used_mmu_pages``."""
    s.role[table] = role
    s.valid_gen[table] = valid_gen
    s.root_count[table] = 0
    s.flags[table] = SPF_LIVE
    s.unsync_children[table] = 0
    s.unsync_bits[table] = 0
    s.flood[table] = 0
    s.pae_index[table] = NIL
    s.parents[table] = 0
    if s.gfns.shape[0]:
        s.gfns[table] = NIL
    b = kvm_page_table_hashfn(gfn)
    tail = s.hash_tail[b]
    s.hash_prev[table] = tail
    s.hash_next[table] = NIL
    if tail == NIL:
        s.hash_head[b] = table
    else:
        s.hash_next[tail] = table
    s.hash_tail[b] = table
    sp_active_push(s, table)
    s.hdr[S_N_USED] += 1


@register_jitable
def sp_unhash(s: Sps, table: int, gfn: int) -> None:
    """Off the hash and ``active_mmu_pages``, uncounted (``kvm_mmu_free_shadow_page``'s first half)."""
    b = kvm_page_table_hashfn(gfn)
    prev, nxt = s.hash_prev[table], s.hash_next[table]
    if prev == NIL:
        s.hash_head[b] = nxt
    else:
        s.hash_next[prev] = nxt
    if nxt == NIL:
        s.hash_tail[b] = prev
    else:
        s.hash_prev[nxt] = prev
    sp_active_pop(s, table)
    s.hdr[S_N_USED] -= 1


@register_jitable
def sp_is_obsolete(s: Sps, table: int) -> bool:
    """``is_obsolete_sp`` (or ``role.invalid``): zapped, or from before the last fast zap."""
    return bool(s.flags[table] & SPF_ROLE_INVALID) or s.valid_gen[table] != s.hdr[S_VALID_GEN]


@register_jitable
def find_valid_sp(s: Sps, sp_gfn: np.ndarray, counts: np.ndarray, gfn: int, role: int) -> int:
    """``for_each_valid_sp`` over ``gfn``'s bucket: the valid page of ``gfn`` with this packed role
    (-1 if none; ``role`` -1 matches none). Obsolete pages are skipped; every valid page of another
    gfn is a collision (``max_mmu_page_hash_collisions``)."""
    found = NIL
    collisions = 0
    t = s.hash_head[kvm_page_table_hashfn(gfn)]
    while t != NIL:
        if not sp_is_obsolete(s, t):
            if sp_gfn[t] != gfn:
                collisions += 1
            elif found == NIL and s.role[t] == role:
                found = t
        t = s.hash_next[t]
    if collisions > counts[K_MAX_HASH_COLLISIONS]:
        counts[K_MAX_HASH_COLLISIONS] = collisions
    return int(found)


class ShadowPages:
    """Owner of ``Sps``; grows the arrays with the page-table pool."""

    def __init__(self, pool: SpPool, descs: DescPool, indirect: bool) -> None:
        self.pool = pool
        self.descs = descs
        self._indirect = indirect
        n = pool.capacity
        buckets = 1 << KVM_MMU_HASH_SHIFT
        hdr = np.zeros(4, dtype=np.int64)
        hdr[S_ACT_OLDEST] = hdr[S_ACT_NEWEST] = NIL
        self.s = Sps(
            role=np.zeros(n, dtype=np.int64), valid_gen=np.zeros(n, dtype=np.int64),
            root_count=np.zeros(n, dtype=np.int64), flags=np.zeros(n, dtype=np.int64),
            unsync_children=np.zeros(n, dtype=np.int64), unsync_bits=np.zeros((n, 8), dtype=np.uint64),
            flood=np.zeros(n, dtype=np.int64), pae_index=np.full(n, NIL, dtype=np.int64),
            parents=np.zeros(n, dtype=np.int64), gfns=np.full((n if indirect else 0, 512), NIL, dtype=np.int64),
            leaf_rmap=np.zeros((n, 512), dtype=np.int32),
            hash_head=np.full(buckets, NIL, dtype=np.int64), hash_tail=np.full(buckets, NIL, dtype=np.int64),
            hash_next=np.full(n, NIL, dtype=np.int64), hash_prev=np.full(n, NIL, dtype=np.int64),
            act_next=np.full(n, NIL, dtype=np.int64), act_prev=np.full(n, NIL, dtype=np.int64), hdr=hdr,
        )  # fmt: skip

    def fit_pool(self) -> None:
        """Grow the arrays to the pool's capacity (after the pool grew)."""
        s = self.s
        add = self.pool.capacity - len(s.role)
        if add <= 0:
            return

        def more(a: np.ndarray, fill: int = 0) -> np.ndarray:
            if a.shape[0] == 0:
                return a
            return np.concatenate([a, np.full((add,) + a.shape[1:], fill, dtype=a.dtype)])

        self.s = s._replace(
            role=more(s.role), valid_gen=more(s.valid_gen), root_count=more(s.root_count), flags=more(s.flags),
            unsync_children=more(s.unsync_children), unsync_bits=more(s.unsync_bits), flood=more(s.flood),
            pae_index=more(s.pae_index, NIL), parents=more(s.parents), gfns=more(s.gfns, NIL),
            leaf_rmap=more(s.leaf_rmap),
            hash_next=more(s.hash_next, NIL), hash_prev=more(s.hash_prev, NIL), act_next=more(s.act_next, NIL),
            act_prev=more(s.act_prev, NIL),
        )  # fmt: skip

    # -- creating and unhashing ------------------------------------------------------------------
    def init_page(self, table: int, role: Role, valid_gen: int) -> None:
        """``sp_init`` for a page of this role on ``table``."""
        sp_init(self.s, table, int(self.pool.p.sp_gfn[table]), pack_role(role), valid_gen)

    def unhash(self, table: int) -> None:
        sp_unhash(self.s, table, int(self.pool.p.sp_gfn[table]))

    def bucket(self, gfn: int) -> list[int]:
        """The pages in ``gfn``'s hash bucket, in order."""
        s = self.s
        out = []
        t = int(s.hash_head[kvm_page_table_hashfn(gfn)])
        while t != NIL:
            out.append(t)
            t = int(s.hash_next[t])
        return out

    # -- active_mmu_pages --------------------------------------------------------------------------
    def active_push(self, table: int) -> None:
        sp_active_push(self.s, table)

    def active_pop(self, table: int) -> None:
        sp_active_pop(self.s, table)

    def active_tables(self) -> list[int]:
        """``active_mmu_pages`` from the oldest."""
        s = self.s
        out = []
        t = int(s.hdr[S_ACT_OLDEST])
        while t != NIL:
            out.append(t)
            t = int(s.act_next[t])
        return out


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
