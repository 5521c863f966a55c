"""The TDP MMU's page-table operations, compiled once (``arch/x86/kvm/mmu/tdp_mmu.c``).

Every path that walks, installs into, splits or tears down TDP MMU page tables calls these: the
Python fault (``TdpMmu.page_fault``, in every mode), the vCPU group's compiled fault
(``vsim.vcpu.group_fault``), eager splitting (``TdpRangeOps``) and the root zap (fast zap). They
work on the pool's arrays (``vsim.mmu.sp_pool.Pool``) and change SPTEs only through
``change_spte``, which keeps the page stats and logs each change for the tracepoint and the
invariant checker; a Python caller replays the log (``PageTables.replay_changes``) when it is on.

* ``tdp_walk_to``: the walk of ``kvm_tdp_mmu_map`` / ``tdp_mmu_for_each_pte`` down to a level.
* ``tdp_range_entries``: ``for_each_tdp_pte`` over a gfn range in each root, for the range operations.
* ``tdp_split_huge_page``: ``tdp_mmu_split_huge_page``'s new child table, filled before it is linked.
* ``tdp_mmu_map_install``: the cmpxchg half of ``kvm_tdp_mmu_map``: ``tdp_mmu_link_sp`` for each
  missing level, then ``tdp_mmu_map_handle_target_level``.
* ``handle_removed_pt``: clear an unlinked page table and everything under it, free the tables.
* ``tdp_zap_table``: ``tdp_mmu_zap_root``'s bottom-up clearing of a root's tables.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from vsim.mmu.page_fault import RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS
from vsim.mmu.sp_pool import Pool, change_spte, note_mapped, note_zapped, sp_alloc, sp_free
from vsim.mmu.spte import (
    PFN_MASK,
    PFN_SHIFT,
    PT_PAGE_SIZE,
    PT_WRITABLE,
    REMOVED_SPTE,
    SPTE_ENT_PER_PAGE,
    SPTE_MMU_PRESENT,
    TDP_ROOT_LEVEL,
    is_last_spte,
    is_shadow_present_pte,
    make_huge_page_split_spte,
    make_nonleaf_spte,
    pages_per_level,
    spte_index,
)
from vsim.stats import K_PAGES_4K

MAX_DEPTH = TDP_ROOT_LEVEL + 1  # frames of the explicit stacks below (a root and its levels)


@njit(cache=True)
def tdp_range_entries(spt: np.ndarray, roots: np.ndarray, start: int, end: int) -> np.ndarray:
    """``for_each_tdp_pte`` over ``[start, end)`` in each root of ``roots`` (valid roots, in order):
    a row ``(table, index, level, gfn, spte)`` for every present entry overlapping the range,
    each parent before the entries under it and entries in index order (pre-order)."""
    out = np.empty((64, 5), dtype=np.int64)
    n = 0
    # The explicit stack of tables being walked: table, level, first gfn, next index, end index.
    st = np.empty((MAX_DEPTH, 5), dtype=np.int64)
    for r in range(roots.shape[0]):
        depth = 0
        span = pages_per_level(TDP_ROOT_LEVEL)
        st[0, 0], st[0, 1], st[0, 2] = roots[r], TDP_ROOT_LEVEL, 0
        st[0, 3], st[0, 4] = max(0, start // span), min(SPTE_ENT_PER_PAGE, -(-end // span))
        while depth >= 0:
            table, level, base, i, hi = st[depth, 0], st[depth, 1], st[depth, 2], st[depth, 3], st[depth, 4]
            if i >= hi:
                depth -= 1
                continue
            st[depth, 3] = i + 1
            spte = spt[table, i]
            if not spte & SPTE_MMU_PRESENT or spte == REMOVED_SPTE:
                continue
            span = pages_per_level(level)
            gfn = base + i * span
            if n == out.shape[0]:
                grown = np.empty((2 * n, 5), dtype=np.int64)
                grown[:n] = out
                out = grown
            out[n, 0], out[n, 1], out[n, 2], out[n, 3], out[n, 4] = table, i, level, gfn, spte
            n += 1
            if level > 1 and not spte & PT_PAGE_SIZE:
                child_span = pages_per_level(level - 1)
                depth += 1
                st[depth, 0], st[depth, 1], st[depth, 2] = (spte & PFN_MASK) >> PFN_SHIFT, level - 1, gfn
                st[depth, 3] = max(0, (start - gfn) // child_span)
                st[depth, 4] = min(SPTE_ENT_PER_PAGE, -(-(end - gfn) // child_span))
    return out[:n]


@njit(cache=True)
def tdp_walk_to(spt: np.ndarray, root: int, gfn: int, goal: int) -> tuple[int, int, int, int]:
    """From ``root`` down to ``goal`` at most, stopping early at a leaf, a non-present or a frozen
    entry: ``(table, index, level, old_spte)`` of the last entry visited."""
    table = root
    level = TDP_ROOT_LEVEL
    while True:
        idx = spte_index(gfn, level)
        old = spt[table, idx]
        if level == goal or not (old & SPTE_MMU_PRESENT) or old == REMOVED_SPTE or old & PT_PAGE_SIZE:
            return table, idx, level, old
        table = (old & PFN_MASK) >> PFN_SHIFT
        level -= 1


@njit(cache=True)
def tdp_split_huge_page(p: Pool, huge: int, level: int, gfn: int, stat: int) -> int:
    """``tdp_mmu_split_huge_page``: a new table one level down whose leaves map what the huge leaf
    ``huge`` at ``level`` (based at ``gfn``) maps, with the same permissions, counted in the page
    stats before it is linked. The caller links it in place of the huge leaf, whose page stat
    goes then. Returns the table, or -1 if the pool is full (reserve first)."""
    child = sp_alloc(p, level - 1, gfn, stat)
    if child < 0:
        return -1
    row = p.spt[child]
    for k in range(SPTE_ENT_PER_PAGE):
        row[k] = make_huge_page_split_spte(huge, level, k)
    p.counts[K_PAGES_4K + level - 2] += SPTE_ENT_PER_PAGE
    return child


@njit(cache=True)
def tdp_mmu_map_install(p: Pool, stat: int, table: int, idx: int, level: int, old: int, gfn: int, goal: int,
                        new: int, mmio: bool, bitmap: np.ndarray, bit: int, actor: int,
                        t: int) -> tuple[int, int]:  # fmt: skip
    """The cmpxchg half of ``kvm_tdp_mmu_map`` against the entry its walk ended at earlier
    (``table``/``idx`` at ``level``, holding ``old`` then): link a new table for each level above
    ``goal`` (splitting a huge leaf there), then install ``new`` at ``goal``. A writable leaf marks
    the page dirty (``bitmap[bit]``, none when ``bit`` < 0) as ``make_spte`` does, once the target
    level is reached. Returns ``(RET_PF_*, leaves)``: ``leaves`` counts the translations of a page
    table that a huge leaf replaced (``handle_removed_pt``); the caller flushes if there are any.
    The pool must have room for ``level - goal`` tables."""
    if old == REMOVED_SPTE:
        return RET_PF_RETRY, 0
    spt = p.spt
    while level > goal:
        if spt[table, idx] != old:
            return RET_PF_RETRY, 0  # tdp_mmu_link_sp's cmpxchg would fail; the SP goes back
        base = gfn & ~(pages_per_level(level) - 1)
        if old & SPTE_MMU_PRESENT:  # a huge leaf above the goal: split it first
            child = tdp_split_huge_page(p, old, level, base, stat)
        else:
            child = sp_alloc(p, level - 1, base, stat)
        change_spte(p, table, idx, level, base, old, make_nonleaf_spte(child), actor, t)
        table = child
        level -= 1
        idx = spte_index(gfn, level)
        old = spt[table, idx]
    # tdp_mmu_map_handle_target_level
    base = gfn & ~(pages_per_level(goal) - 1)
    if bit >= 0 and new & PT_WRITABLE:
        bitmap[bit] = 1  # mark_page_dirty_in_slot
    if new == old:
        return RET_PF_SPURIOUS, 0
    if spt[table, idx] != old:
        return RET_PF_RETRY, 0
    change_spte(p, table, idx, goal, base, old, new, actor, t)
    leaves = 0
    if is_shadow_present_pte(old) and not is_last_spte(old, goal):
        # A page table replaced by a huge leaf.
        leaves = handle_removed_pt(p, (old & PFN_MASK) >> PFN_SHIFT, base, stat, actor, t)
    if mmio:
        return RET_PF_EMULATE, leaves
    note_mapped(p, base, goal)
    return RET_PF_FIXED, leaves


@njit(cache=True)
def handle_removed_pt(p: Pool, table: int, gfn: int, stat: int, actor: int, t: int) -> int:
    """``handle_removed_pt``: clear an unlinked page table (mapping from ``gfn``) and the tables
    under it, each entry before its child's, and return them to the pool. Returns the present
    leaves it held (translations a TLB may cache)."""
    spt = p.spt
    tables = np.empty(MAX_DEPTH, dtype=np.int64)
    gfns = np.empty(MAX_DEPTH, dtype=np.int64)
    nexts = np.zeros(MAX_DEPTH, dtype=np.int64)
    tables[0] = table
    gfns[0] = gfn
    depth = 0
    leaves = 0
    while depth >= 0:
        tb = tables[depth]
        i = nexts[depth]
        if i == SPTE_ENT_PER_PAGE:
            sp_free(p, tb, stat)
            depth -= 1
            continue
        nexts[depth] = i + 1
        old = spt[tb, i]
        if not old:
            continue
        level = p.sp_level[tb]
        child_gfn = gfns[depth] + i * pages_per_level(level)
        change_spte(p, tb, i, level, child_gfn, old, 0, actor, t)
        if is_shadow_present_pte(old):
            if is_last_spte(old, level):
                leaves += 1
            else:
                depth += 1
                tables[depth] = (old & PFN_MASK) >> PFN_SHIFT
                gfns[depth] = child_gfn
                nexts[depth] = 0
    return leaves


@njit(cache=True)
def tdp_zap_table(p: Pool, table: int, stat: int, free_top: bool, actor: int, t: int) -> int:
    """``tdp_mmu_zap_root``: clear every SPTE under ``table`` (a root, mapping from gfn 0) bottom-up,
    each page table's entries before the entry that links it, noting every leaf zapped (no flush:
    every vCPU flushes when it loads a new root). The tables below go back to the pool, and
    ``table`` too with ``free_top``. Returns the entries visited."""
    spt = p.spt
    tables = np.empty(MAX_DEPTH, dtype=np.int64)
    gfns = np.empty(MAX_DEPTH, dtype=np.int64)
    nexts = np.zeros(MAX_DEPTH, dtype=np.int64)
    tables[0] = table
    gfns[0] = 0
    depth = 0
    visited = 0
    while depth >= 0:
        tb = tables[depth]
        i = nexts[depth]
        while i < SPTE_ENT_PER_PAGE and not spt[tb, i]:
            i += 1
        level = p.sp_level[tb]
        if i == SPTE_ENT_PER_PAGE:
            if depth or free_top:
                sp_free(p, tb, stat)
            depth -= 1
            if depth >= 0:  # the entry that linked this table goes now
                ptb = tables[depth]
                pi = nexts[depth] - 1
                plevel = p.sp_level[ptb]
                change_spte(p, ptb, pi, plevel, gfns[depth] + pi * pages_per_level(plevel), spt[ptb, pi], 0, actor, t)
            continue
        nexts[depth] = i + 1
        old = spt[tb, i]
        child_gfn = gfns[depth] + i * pages_per_level(level)
        visited += 1
        if is_shadow_present_pte(old) and not is_last_spte(old, level):
            depth += 1
            tables[depth] = (old & PFN_MASK) >> PFN_SHIFT
            gfns[depth] = child_gfn
            nexts[depth] = 0
            continue
        if is_shadow_present_pte(old):
            note_zapped(p, child_gfn, level)
        change_spte(p, tb, i, level, child_gfn, old, 0, actor, t)
    return visited


@njit(cache=True)
def count_entries(p: Pool, table: int) -> int:
    """The non-zero entries in ``table`` and the tables under it: the most SPTE changes tearing it
    down makes (the size of the change log a caller reserves)."""
    spt = p.spt
    n = 0
    stack = np.empty(SPTE_ENT_PER_PAGE * MAX_DEPTH, dtype=np.int64)
    stack[0] = table
    top = 1
    while top:
        top -= 1
        tb = stack[top]
        level = p.sp_level[tb]
        for i in range(SPTE_ENT_PER_PAGE):
            e = spt[tb, i]
            if e:
                n += 1
                if is_shadow_present_pte(e) and not is_last_spte(e, level):
                    stack[top] = (e & PFN_MASK) >> PFN_SHIFT
                    top += 1
    return n
