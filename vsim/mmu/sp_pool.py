"""The MMU's page tables in arrays: allocation, SPTE changes and their bookkeeping, in one place.

KVM allocates each page table as a ``kvm_mmu_page`` (``tdp_mmu_alloc_sp``,
``kvm_mmu_alloc_shadow_page``) and updates the page stats of every leaf that appears or goes in
``handle_changed_spte`` / ``mmu_spte_set`` (``kvm_update_page_stats``). vsim keeps every page table
of the VM's MMU in one ``(tables, 512)`` int64 array of SPTEs, with a table's level, base gfn and
reuse generation beside it, and a stack of freed tables reused first. ``SpPool`` owns the arrays;
``Pool`` is the bundle that compiled operations take.

The functions here are ``register_jitable``: Python calls them as plain functions on the same arrays,
and the compiled operations (``vsim.mmu.tdp_mmu_map``, the vCPU group's loop) compile them in. So
allocation, freeing, page stats and the refault count each exist once, and their state has one home
(``SpPool``; ``VmStat`` reads its counters from ``counts``).

An SPTE change made in compiled code is written to the change log (``chg``) when ``hdr[H_LOG]`` is
set (events at ``all``, or the invariant checker on); the caller replays the log through the same
hooks a Python change calls (``PageTables.spte_hooks``), so the tracepoint and the checker see
every change whichever code made it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from numba import njit, typeof, types
from numba.experimental import structref
from numba.extending import register_jitable

from vsim.mmu.spte import SPTE_ENT_PER_PAGE, is_present_leaf
from vsim.stats import K_PAGES_4K, K_REFAULTS, N_ARRAY_STATS

# The pool's header ``hdr``.
H_NTABLES = 0  # tables ever handed out (the high-water mark); table indices below it are in use or free
H_NFREE = 1  # entries on the free stack
H_NCHG = 2  # rows in the change log
H_LOG = 3  # log SPTE changes made in compiled code
H_ANY_ZAPPED = 4  # a zap has unmapped a test-region gfn (refaults are possible)
H_REGION_BASE = 5  # the first gfn of the test region (``zapped`` is indexed from it)
H_COLS = 6
# Columns of the change log ``chg``.
CHG_GFN, CHG_OLD, CHG_NEW, CHG_LEVEL, CHG_ACTOR, CHG_T = range(6)
CHG_COLS = 6
NO_STAT = -1  # a table no page stat counts (the shadow MMU's PAE root pages)


class Pool(NamedTuple):
    """The arrays of the page-table pool, as compiled operations take them."""

    spt: np.ndarray  # (tables, 512) int64 SPTEs; a non-leaf entry holds its child's index
    sp_level: np.ndarray  # (tables,) int8: each table's level
    sp_gfn: np.ndarray  # (tables,) int64: the first gfn each table maps
    sp_gen: np.ndarray  # (tables,) int64: bumped when a table is freed or reused
    free: np.ndarray  # (tables,) int64: the free stack, ``free[:hdr[H_NFREE]]``
    hdr: np.ndarray  # (H_COLS,) int64
    counts: np.ndarray  # VmStat's array-backed counters (``vsim.stats.ARRAY_STATS``)
    chg: np.ndarray  # (rows, CHG_COLS) int64: SPTE changes made in compiled code, to replay
    zapped: np.ndarray  # (region pages,) bool: test-region gfns a zap unmapped


class BundleRefType(types.StructRef):
    """The numba type of a StructRef that holds a bundle of arrays (``PoolRef``, ``SpsRef``, ...)."""

    def preprocess_fields(self, fields: Any) -> tuple[tuple[str, Any], ...]:
        return tuple((name, types.unliteral(t)) for name, t in fields)


@structref.register
class PoolRefType(BundleRefType):
    """The numba type of ``PoolRef``."""


if TYPE_CHECKING:
    PoolRef = Pool  # to the type checker the handle is the bundle it holds: the same fields
else:

    class PoolRef(structref.StructRefProxy):
        """``Pool``'s arrays as one object for compiled entry points: it unboxes as one pointer, and
        compiled code that takes it compiles several times faster than with the 9-array tuple. The
        helpers here read ``p.spt`` etc. either way, so they serve both. Made by ``new_pool_ref``
        (a cached compiled constructor: numba's generated one would compile in every process)."""

    structref.define_boxing(PoolRefType, PoolRef)
_DTYPES = (("spt", np.int64, 2), ("sp_level", np.int8, 1), ("sp_gfn", np.int64, 1), ("sp_gen", np.int64, 1),
           ("free", np.int64, 1), ("hdr", np.int64, 1), ("counts", np.int64, 1), ("chg", np.int64, 2),
           ("zapped", np.bool_, 1))  # fmt: skip
POOL_REF_TYPE = PoolRefType([(name, typeof(np.zeros((1,) * nd, dtype=dt))) for name, dt, nd in _DTYPES])


@njit(cache=True)
def new_pool_ref(spt: np.ndarray, sp_level: np.ndarray, sp_gfn: np.ndarray, sp_gen: np.ndarray, free: np.ndarray,
                 hdr: np.ndarray, counts: np.ndarray, chg: np.ndarray, zapped: np.ndarray) -> PoolRef:  # fmt: skip
    r: PoolRef = structref.new(POOL_REF_TYPE)  # type: ignore[call-arg]  # an intrinsic: numba passes the typing context
    r.spt = spt
    r.sp_level = sp_level
    r.sp_gfn = sp_gfn
    r.sp_gen = sp_gen
    r.free = free
    r.hdr = hdr
    r.counts = counts
    r.chg = chg
    r.zapped = zapped
    return r


@register_jitable
def sp_alloc(p: Pool, level: int, gfn: int, stat: int) -> int:
    """A zeroed page table for ``level`` mapping from ``gfn``: a freed one first, else the next
    new one; ``stat`` is the ``counts`` index that counts tables in use (``NO_STAT`` for none).
    Returns -1 when the arrays are full (``SpPool.grow``, then call again)."""
    hdr = p.hdr
    nfree = hdr[H_NFREE]
    if nfree:
        table = p.free[nfree - 1]
        hdr[H_NFREE] = nfree - 1
        p.sp_gen[table] += 1
    else:
        table = hdr[H_NTABLES]
        if table == p.spt.shape[0]:
            return -1
        hdr[H_NTABLES] = table + 1
    p.sp_level[table] = level
    p.sp_gfn[table] = gfn
    if stat >= 0:
        p.counts[stat] += 1
    return table


@register_jitable
def sp_free(p: Pool, table: int, stat: int) -> None:
    """Give a table back (its entries already cleared): it goes on the free stack, and a walk that
    remembers its generation can tell it is gone (where KVM's RCU-deferred free makes a late
    cmpxchg fail instead)."""
    hdr = p.hdr
    p.sp_gen[table] += 1
    p.free[hdr[H_NFREE]] = table
    hdr[H_NFREE] += 1
    if stat >= 0:
        p.counts[stat] -= 1


@register_jitable
def account_spte_change(counts: np.ndarray, old: int, new: int, level: int) -> None:
    """``kvm_update_page_stats`` for one SPTE change: a leaf of ``level`` appeared or went."""
    was = is_present_leaf(old, level)
    now = is_present_leaf(new, level)
    if was != now:
        counts[K_PAGES_4K + level - 1] += 1 if now else -1


@register_jitable
def change_spte(p: Pool, table: int, idx: int, level: int, gfn: int, old: int, new: int, actor: int, t: int) -> None:
    """Write an SPTE from compiled code (``tdp_mmu_set_spte`` or a successful cmpxchg), with
    ``handle_changed_spte``'s page stats, and log it for the tracepoint and the checker."""
    p.spt[table, idx] = new
    account_spte_change(p.counts, old, new, level)
    hdr = p.hdr
    if hdr[H_LOG]:
        n = hdr[H_NCHG]
        row = p.chg[n]
        row[CHG_GFN] = gfn
        row[CHG_OLD] = old
        row[CHG_NEW] = new
        row[CHG_LEVEL] = level
        row[CHG_ACTOR] = actor
        row[CHG_T] = t
        hdr[H_NCHG] = n + 1


@register_jitable
def note_zapped(p: Pool, gfn: int, level: int) -> None:
    """A zap unmapped a leaf of ``level`` at ``gfn``: a later fault that maps it again is a refault."""
    hdr = p.hdr
    hdr[H_ANY_ZAPPED] = 1
    lo = gfn - hdr[H_REGION_BASE]
    n = 1 << (9 * (level - 1))
    if lo + n > 0 and lo < p.zapped.shape[0]:
        p.zapped[max(lo, 0) : lo + n] = True


@register_jitable
def note_mapped(p: Pool, gfn: int, level: int) -> None:
    """A fault mapped a leaf of ``level`` at ``gfn``: count a refault (vsim's ``refaults``) if a
    zap had unmapped any of it."""
    hdr = p.hdr
    if not hdr[H_ANY_ZAPPED]:
        return  # nothing was ever unmapped: no fault can be a refault
    lo = gfn - hdr[H_REGION_BASE]
    n = 1 << (9 * (level - 1))
    if 0 <= lo < p.zapped.shape[0] and p.zapped[lo : lo + n].any():
        p.counts[K_REFAULTS] += 1
        p.zapped[lo : lo + n] = False


class SpPool:
    """Owner of the page-table pool's arrays (``Pool``); grows them when an allocation finds them
    full. Arrays are replaced when they grow: read them through ``p`` each time."""

    def __init__(self, counts: np.ndarray, region_base_gfn: int, region_pages: int, initial_tables: int = 64) -> None:
        assert counts.shape == (N_ARRAY_STATS,)
        n = max(initial_tables, 4)
        hdr = np.zeros(H_COLS, dtype=np.int64)
        hdr[H_REGION_BASE] = region_base_gfn
        self.p = Pool(
            spt=np.zeros((n, SPTE_ENT_PER_PAGE), dtype=np.int64),
            sp_level=np.zeros(n, dtype=np.int8),
            sp_gfn=np.zeros(n, dtype=np.int64),
            sp_gen=np.zeros(n, dtype=np.int64),
            free=np.zeros(n, dtype=np.int64),
            hdr=hdr,
            counts=counts,
            chg=np.zeros((64, CHG_COLS), dtype=np.int64),
            zapped=np.zeros(region_pages, dtype=np.bool_),
        )
        self.ref = new_pool_ref(*self.p)  # the same arrays, for compiled entry points

    def _replaced(self, p: Pool) -> None:
        self.p = p
        self.ref = new_pool_ref(*p)

    @property
    def n_tables(self) -> int:
        return int(self.p.hdr[H_NTABLES])

    @property
    def capacity(self) -> int:
        return int(self.p.spt.shape[0])

    def free_tables(self) -> np.ndarray:
        """The tables on the free stack (a copy)."""
        p = self.p
        return p.free[: p.hdr[H_NFREE]].copy()

    def alloc(self, level: int, gfn: int, stat: int) -> int:
        """``sp_alloc``, growing the arrays when they are full."""
        table = sp_alloc(self.p, level, gfn, stat)
        if table < 0:
            self.grow()
            table = sp_alloc(self.p, level, gfn, stat)
        return int(table)

    def grow(self, at_least: int = 0) -> None:
        """Make room for more tables (doubling, and at least ``at_least`` more)."""
        p = self.p
        add = max(64, len(p.spt), at_least)

        def more(a: np.ndarray) -> np.ndarray:
            return np.concatenate([a, np.zeros((add,) + a.shape[1:], dtype=a.dtype)])

        self._replaced(p._replace(spt=more(p.spt), sp_level=more(p.sp_level), sp_gfn=more(p.sp_gfn),
                                  sp_gen=more(p.sp_gen), free=more(p.free)))  # fmt: skip

    def reserve(self, tables: int) -> None:
        """Make sure ``tables`` more can be allocated without growing (before a compiled operation,
        which cannot grow the arrays)."""
        p = self.p
        room = int(p.hdr[H_NFREE]) + len(p.spt) - int(p.hdr[H_NTABLES])
        if room < tables:
            self.grow(tables - room)

    def reserve_changes(self, rows: int) -> None:
        """Room for ``rows`` more change-log rows (only while logging)."""
        p = self.p
        need = int(p.hdr[H_NCHG]) + rows
        if need > len(p.chg):
            chg = np.zeros((max(need, 2 * len(p.chg)), CHG_COLS), dtype=np.int64)
            chg[: len(p.chg)] = p.chg
            self._replaced(p._replace(chg=chg))

    def take_changes(self) -> list[list[int]]:
        """The logged changes, oldest first, and an empty log."""
        p = self.p
        n = int(p.hdr[H_NCHG])
        if not n:
            return []
        p.hdr[H_NCHG] = 0
        return p.chg[:n].tolist()
