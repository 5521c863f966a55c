"""``struct kvm_mmu_page`` in arrays: the shadow pages' roles, counts, links, hash and LRU list.

Every shadow page owns one page table of the pool, so its fields are arrays indexed by that table
(``Sps``, owned by ``ShadowPages``): the packed role (``union kvm_mmu_page_role``: level, direct,
access, quadrant, has_4_byte_gpte), ``mmu_valid_gen``, ``root_count``, flags (live, on
``active_mmu_pages``, ``role.invalid``, unsync), ``unsync_children`` and ``unsync_child_bitmap``,
``write_flooding_count``, the PAE-root index, the ``parent_ptes`` head (a ``pte_list``, from the
same descriptor pool as the rmaps), and for indirect pages ``shadowed_translation``'s gfn per entry.
``mmu_page_hash`` (4096 buckets by gfn) and ``active_mmu_pages`` (oldest first) are doubly linked
lists through the same arrays. The level and gfn are the pool's (``Pool.sp_level/sp_gfn``).

Python code reaches a page through ``KvmMmuPage`` (``vsim.mmu.mmu_page_view``), a view that reads
and writes these arrays. Compiled code works on ``Sps`` directly, so a page has one home whichever
code made it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from numba import njit, typeof
from numba.experimental import structref
from numba.extending import register_jitable

from vsim.mmu.pte_list import DescPool
from vsim.mmu.sp_pool import BundleRefType
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
# make_mmu_pages_available: below this many free pages (of n_max_mmu_pages) a fault zaps the oldest
# until KVM_REFILL_PAGES are free.
KVM_MIN_FREE_MMU_PAGES = 5
KVM_REFILL_PAGES = 25
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


# The dtype and dimensions of each array of ``Sps``.
SPS_DTYPES = {f: (np.uint64, 2) if f == "unsync_bits" else (np.int32, 2) if f == "leaf_rmap"
              else (np.int64, 2) if f == "gfns" else (np.int64, 1) for f in Sps._fields}  # fmt: skip


@structref.register
class SpsRefType(BundleRefType):
    """The numba type of ``SpsRef``."""


if TYPE_CHECKING:
    SpsRef = Sps  # to the type checker the handle is the bundle it holds: the same fields
else:

    class SpsRef(structref.StructRefProxy):
        """``Sps``'s arrays as one object for compiled code (``ArchMmu.s``): passing the NamedTuple
        from one compiled function to another reference-counts each of its 18 arrays, this one
        pointer. The helpers here read ``s.role`` etc. either way. Made by ``new_sps_ref``."""

    structref.define_boxing(SpsRefType, SpsRef)
SPS_REF_TYPE = SpsRefType([(f, typeof(np.zeros((1,) * nd, dtype=dt))) for f, (dt, nd) in SPS_DTYPES.items()])


@njit(cache=True)
def new_sps_ref(role: np.ndarray, valid_gen: np.ndarray, root_count: np.ndarray, flags: np.ndarray,
                unsync_children: np.ndarray, unsync_bits: np.ndarray, flood: np.ndarray, pae_index: np.ndarray,
                parents: np.ndarray, gfns: np.ndarray, leaf_rmap: np.ndarray, hash_head: np.ndarray,
                hash_tail: np.ndarray, hash_next: np.ndarray, hash_prev: np.ndarray, act_next: np.ndarray,
                act_prev: np.ndarray, hdr: np.ndarray) -> SpsRef:  # fmt: skip
    r: SpsRef = structref.new(SPS_REF_TYPE)  # type: ignore[call-arg]  # an intrinsic: numba passes the typing context
    r.role = role
    r.valid_gen = valid_gen
    r.root_count = root_count
    r.flags = flags
    r.unsync_children = unsync_children
    r.unsync_bits = unsync_bits
    r.flood = flood
    r.pae_index = pae_index
    r.parents = parents
    r.gfns = gfns
    r.leaf_rmap = leaf_rmap
    r.hash_head = hash_head
    r.hash_tail = hash_tail
    r.hash_next = hash_next
    r.hash_prev = hash_prev
    r.act_next = act_next
    r.act_prev = act_prev
    r.hdr = hdr
    return r


@register_jitable
def _list_append(nxt: np.ndarray, prev: np.ndarray, first: np.ndarray, fi: int, last: np.ndarray, li: int,
                 t: int) -> None:  # fmt: skip
    """Append ``t`` to a doubly linked list threaded through ``nxt``/``prev`` whose ends are
    ``first[fi]`` and ``last[li]`` (an ``hlist`` bucket, or ``active_mmu_pages``)."""
    tail = last[li]
    prev[t] = tail
    nxt[t] = NIL
    if tail == NIL:
        first[fi] = t
    else:
        nxt[tail] = t
    last[li] = t


@register_jitable
def _list_del(nxt: np.ndarray, prev: np.ndarray, first: np.ndarray, fi: int, last: np.ndarray, li: int,
              t: int) -> None:  # fmt: skip
    """Unlink ``t`` from that list."""
    p, n = prev[t], nxt[t]
    if p == NIL:
        first[fi] = n
    else:
        nxt[p] = n
    if n == NIL:
        last[li] = p
    else:
        prev[n] = p


@register_jitable
def sp_active_push(s: Sps, table: int) -> None:
    """Put a page at the newest end (``list_add`` at the head of ``active_mmu_pages``)."""
    _list_append(s.act_next, s.act_prev, s.hdr, S_ACT_OLDEST, s.hdr, S_ACT_NEWEST, table)
    s.flags[table] |= SPF_ACTIVE


@register_jitable
def sp_active_pop(s: Sps, table: int) -> None:
    """Take a page off ``active_mmu_pages``."""
    _list_del(s.act_next, s.act_prev, s.hdr, S_ACT_OLDEST, s.hdr, S_ACT_NEWEST, table)
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
    _list_append(s.hash_next, s.hash_prev, s.hash_head, b, s.hash_tail, b, table)
    sp_active_push(s, table)
    s.hdr[S_N_USED] += 1


@register_jitable
def sp_unhash(s: Sps, table: int, gfn: int) -> None:
    """Off the hash and ``active_mmu_pages``, uncounted (``kvm_mmu_free_shadow_page``'s first half)."""
    b = kvm_page_table_hashfn(gfn)
    _list_del(s.hash_next, s.hash_prev, s.hash_head, b, s.hash_tail, b, table)
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
        self._set(Sps(
            role=np.zeros(n, dtype=np.int64), valid_gen=np.zeros(n, dtype=np.int64),
            root_count=np.zeros(n, dtype=np.int64), flags=np.zeros(n, dtype=np.int64),
            unsync_children=np.zeros(n, dtype=np.int64), unsync_bits=np.zeros((n, 8), dtype=np.uint64),
            flood=np.zeros(n, dtype=np.int64), pae_index=np.full(n, NIL, dtype=np.int64),
            parents=np.zeros(n, dtype=np.int64), gfns=np.full((n if indirect else 0, 512), NIL, dtype=np.int64),
            leaf_rmap=np.zeros((n, 512), dtype=np.int32),
            hash_head=np.full(buckets, NIL, dtype=np.int64), hash_tail=np.full(buckets, NIL, dtype=np.int64),
            hash_next=np.full(n, NIL, dtype=np.int64), hash_prev=np.full(n, NIL, dtype=np.int64),
            act_next=np.full(n, NIL, dtype=np.int64), act_prev=np.full(n, NIL, dtype=np.int64), hdr=hdr,
        ))  # fmt: skip

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

        self._set(s._replace(
            role=more(s.role), valid_gen=more(s.valid_gen), root_count=more(s.root_count), flags=more(s.flags),
            unsync_children=more(s.unsync_children), unsync_bits=more(s.unsync_bits), flood=more(s.flood),
            pae_index=more(s.pae_index, NIL), parents=more(s.parents), gfns=more(s.gfns, NIL),
            leaf_rmap=more(s.leaf_rmap),
            hash_next=more(s.hash_next, NIL), hash_prev=more(s.hash_prev, NIL), act_next=more(s.act_next, NIL),
            act_prev=more(s.act_prev, NIL),
        ))  # fmt: skip

    def _set(self, s: Sps) -> None:
        self.s = s
        self.ref = new_sps_ref(*s)  # the same arrays, for compiled code

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
