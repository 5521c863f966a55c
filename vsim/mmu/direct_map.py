"""The shadow MMU's fault-time operations, compiled once (``arch/x86/kvm/mmu/mmu.c``).

``direct_map`` (the legacy MMU's fault under the write lock, and a non-paging shadow guest's),
``kvm_mmu_get_shadow_page`` for direct pages through the hash, ``link_shadow_page``,
``mmu_set_spte`` with ``rmap_add``, and ``direct_pte_prefetch``, over the pool's arrays
(``vsim.mmu.sp_pool``), the shadow pages' (``vsim.mmu.mmu_page``) and the rmaps' descriptors
(``vsim.mmu.pte_list``). ``LegacyMmu`` calls them in every mode; shadow paging's ``FNAME(fetch)``
calls ``mmu_set_spte``.

Where KVM drops an SPTE and flushes remote TLBs in the middle (``drop_large_spte``; a page table
or a changed pfn where the leaf goes), the operation changes nothing and returns ``MS_DROP`` with
the SPTE: the caller drops it (``ShadowMmu.drop_spte``, which knows every rmap), flushes, and calls
again, which then finds the entry empty and goes on as KVM does after its flush. A flush that KVM
issues at the end (an SPTE that lost W) is ``MS_FLUSH``, and a head past
``RMAP_RECYCLE_THRESHOLD`` is ``MS_RECYCLE`` (``rmap_recycle`` drops its SPTEs and flushes).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import register_jitable

from vsim.host_mm import host_pfn
from vsim.mmu.arch_mmu import ArchMmu
from vsim.mmu.mmu_page import (
    NIL,
    ROLE_ACCESS_SHIFT,
    ROLE_DIRECT,
    S_VALID_GEN,
    SPF_UNSYNC,
    Sps,
    find_valid_sp,
    kvm_page_table_hashfn,
    sp_init,
    sp_is_obsolete,
)
from vsim.mmu.page_fault import RET_PF_EMULATE, RET_PF_FIXED, RET_PF_SPURIOUS
from vsim.mmu.pte_list import Descs, pte_list_add
from vsim.mmu.rmap import rmap_head_index
from vsim.mmu.sp_pool import Pool, change_spte, note_mapped, sp_alloc
from vsim.mmu.spte import (
    ACC_ALL,
    PFN_MASK,
    PFN_SHIFT,
    PG_LEVEL_4K,
    PT_WRITABLE,
    SPTE_HOST_WRITABLE,
    SPTE_MMU_PRESENT,
    TDP_ROOT_LEVEL,
    is_last_spte,
    is_shadow_present_pte,
    make_nonleaf_spte,
    make_spte,
    pages_per_level,
    spte_index,
    spte_to_pfn,
)
from vsim.stats import K_MAX_HASH_COLLISIONS, K_MAX_RMAP_SIZE, K_MMU_CACHE_MISS, K_MMU_SHADOW_PAGES

RMAP_RECYCLE_THRESHOLD = 1000
PTE_PREFETCH_NUM = 8
# What the caller must do (bits of the returned status).
MS_DROP = 1  # drop the SPTE returned (and flush remote TLBs), then call again
MS_UNLINK = 2  # unlink the page table returned from its parent entry (and flush), then call again
MS_FLUSH = 4  # flush remote TLBs (an SPTE lost W)
MS_RECYCLE = 8  # the leaf's rmap head passed RMAP_RECYCLE_THRESHOLD: rmap_recycle
MS_MMIO_CREATED = 16  # an MMIO SPTE was installed (pf_mmio_spte_created)
MS_SCANNED = 32  # the hash was scanned for shadow pages of the gfn (do not again when called again)
MS_PREFETCHED = 64  # direct_map went on to direct_pte_prefetch


# An rmap as compiled code takes it: ``(heads_4k, heads_2m, heads_1g, base_gfn, number)``, the head
# arrays of the fault's memslot and its number in ``ShadowMmu.rmaps`` (leaves record number + 1).


@register_jitable
def _heads(rmap: tuple, level: int) -> np.ndarray:
    if level == 1:
        return rmap[0]
    if level == 2:
        return rmap[1]
    return rmap[2]


@register_jitable
def rmap_add(p: Pool, s: Sps, d: Descs, rmap: tuple, table: int, idx: int, level: int, gfn: int) -> int:
    """``rmap_add``: enter the leaf at ``(table, idx)`` on ``gfn``'s head, noting which rmap holds it;
    the head's count before the add (``max_mmu_rmap_size``)."""
    n = pte_list_add(d, _heads(rmap, level), rmap_head_index(rmap[3], gfn, level), table * 512 + idx)
    s.leaf_rmap[table, idx] = rmap[4] + 1
    if n > p.counts[K_MAX_RMAP_SIZE]:
        p.counts[K_MAX_RMAP_SIZE] = n
    return n


@register_jitable
def set_leaf(p: Pool, s: Sps, d: Descs, rmap: tuple, table: int, idx: int, level: int, gfn: int, new: int,
             actor: int, t: int) -> int:  # fmt: skip
    """A leaf where none was (``mmu_set_spte``'s install and ``rmap_add``); the head's count before."""
    change_spte(p, table, idx, level, gfn, p.spt[table, idx], new, actor, t)
    if s.gfns.shape[0] and not s.role[table] & ROLE_DIRECT:
        s.gfns[table, idx] = gfn
    return rmap_add(p, s, d, rmap, table, idx, level, gfn)


@register_jitable
def get_direct_sp(p: Pool, s: Sps, gfn: int, level: int, access: int) -> tuple[int, int]:
    """``kvm_mmu_get_shadow_page`` for a direct page: the valid page of ``gfn`` and the role, else a
    new one (``mmu_cache_miss``). Returns ``(table, 1 if it is new)``; the pool has room."""
    role = level | ROLE_DIRECT | access << ROLE_ACCESS_SHIFT
    table = find_valid_sp(s, p.sp_gfn, p.counts, gfn, role)
    if table != NIL:
        return table, 0
    p.counts[K_MMU_CACHE_MISS] += 1
    table = sp_alloc(p, level, gfn, K_MMU_SHADOW_PAGES)
    sp_init(s, table, gfn, role, s.hdr[S_VALID_GEN])
    return table, 1


@register_jitable
def link_shadow_page(p: Pool, s: Sps, d: Descs, table: int, idx: int, child: int, actor: int, t: int) -> None:
    """``link_shadow_page``: point the parent SPTE at ``child`` and enter it in its ``parent_ptes``."""
    level = p.sp_level[child]
    change_spte(p, table, idx, level + 1, p.sp_gfn[child], p.spt[table, idx], make_nonleaf_spte(child), actor, t)
    pte_list_add(d, s.parents, child, table * 512 + idx)


@register_jitable
def sp_entry_gfn(p: Pool, s: Sps, table: int, idx: int) -> int:
    """``kvm_mmu_page_get_gfn``: the gfn entry ``idx`` maps (linear for direct pages)."""
    if s.role[table] & ROLE_DIRECT or not s.gfns.shape[0]:
        return p.sp_gfn[table] + idx * pages_per_level(p.sp_level[table])
    return s.gfns[table, idx]


@register_jitable
def _mmu_set_spte(p: Pool, s: Sps, d: Descs, rmap: tuple, table: int, idx: int, level: int, gfn: int,
                 mmio_spte: int, pfn: int, writable: bool, wrprot: bool, write_fault: bool, bitmap: np.ndarray,
                 bit: int, scan: bool, actor: int, t: int) -> tuple[int, int, int, int, int, int]:  # fmt: skip
    """``mmu_set_spte``: make the leaf at ``(table, idx)`` map ``gfn`` (``mmio_spte``, an MMIO SPTE,
    when non-zero). ``writable`` is what the host page and the guest's access allow; ``wrprot``
    is ``make_spte``'s refusal of W (the page is shadowed, or may not be unsync): the SPTE is then
    read-only but host-writable, and a write fault emulates. Returns ``(RET_PF_*, status, table,
    index, level, gfn)``, the last four naming the SPTE or page table of ``MS_DROP``/``MS_UNLINK``.
    With ``scan`` (a non-paging shadow guest), ``make_spte`` first looks for shadow pages of the gfn
    unless the SPTE is already writable, as ``mmu_try_to_unsync_pages`` does (there are none)."""
    base = gfn & ~(pages_per_level(level) - 1)
    old = p.spt[table, idx]
    scanned = 0
    if scan and writable and not mmio_spte and not (old & SPTE_MMU_PRESENT and old & PT_WRITABLE):
        find_valid_sp(s, p.sp_gfn, p.counts, gfn, -1)
        scanned = MS_SCANNED
    if mmio_spte:  # mark_mmio_spte
        status = 0
        if mmio_spte != old:
            change_spte(p, table, idx, level, base, old, mmio_spte, actor, t)
            if s.gfns.shape[0] and not s.role[table] & ROLE_DIRECT:
                s.gfns[table, idx] = gfn
            status = MS_MMIO_CREATED
        return RET_PF_EMULATE, status, 0, 0, 0, 0
    new = make_spte(pfn & ~(pages_per_level(level) - 1), level, writable and not wrprot)
    if wrprot:  # the host page is writable; KVM may make the SPTE writable later
        new |= SPTE_HOST_WRITABLE
    was_rmapped = False
    if is_shadow_present_pte(old):
        if not is_last_spte(old, level):  # a page table where a huge leaf goes
            return 0, MS_UNLINK | scanned, table, idx, level, base
        if spte_to_pfn(old) != spte_to_pfn(new) or sp_entry_gfn(p, s, table, idx) != base:
            return 0, MS_DROP | scanned, table, idx, level, sp_entry_gfn(p, s, table, idx)
        was_rmapped = True
    ret = RET_PF_EMULATE if wrprot and write_fault else RET_PF_FIXED
    if old == new:
        return (ret if ret == RET_PF_EMULATE else RET_PF_SPURIOUS), scanned, 0, 0, 0, 0
    if new & PT_WRITABLE and bit >= 0:
        bitmap[bit] = 1  # mark_page_dirty_in_slot
    if was_rmapped:
        change_spte(p, table, idx, level, base, old, new, actor, t)
        note_mapped(p, base, level)
        if old & PT_WRITABLE and not new & PT_WRITABLE:  # mmu_spte_update says flush
            return ret, MS_FLUSH | scanned, 0, 0, 0, 0
        return ret, scanned, 0, 0, 0, 0
    if set_leaf(p, s, d, rmap, table, idx, level, base, new, actor, t) > RMAP_RECYCLE_THRESHOLD:
        return ret, MS_RECYCLE | scanned, 0, 0, 0, 0  # the caller recycles, then notes the mapping
    note_mapped(p, base, level)
    return ret, scanned, 0, 0, 0, 0


@register_jitable
def prefetch_may_be_writable(s: Sps, p: Pool, write_track: np.ndarray, slot_base: int, gfn: int) -> bool:
    """``mmu_try_to_unsync_pages`` for a prefetch: ``gfn`` may be mapped writable unless it is
    write-tracked or a valid indirect shadow page of it is not unsync (a prefetch never unsyncs)."""
    if write_track[gfn - slot_base]:
        return False
    found = True
    t = s.hash_head[kvm_page_table_hashfn(gfn)]
    collisions = 0
    while t != NIL:  # for_each_valid_sp, as find_valid_sp counts it
        if not sp_is_obsolete(s, t):
            if p.sp_gfn[t] != gfn:
                collisions += 1
            elif not s.role[t] & ROLE_DIRECT and not s.flags[t] & SPF_UNSYNC:
                found = False
        t = s.hash_next[t]
    if collisions > p.counts[K_MAX_HASH_COLLISIONS]:
        p.counts[K_MAX_HASH_COLLISIONS] = collisions
    return found


@register_jitable
def _direct_pte_prefetch(p: Pool, s: Sps, d: Descs, rmap: tuple, table: int, idx: int, slot_base: int,
                         slot_end: int, host_off: int, resident: np.ndarray, new_base: np.ndarray, pfn_base: int,
                         span_shift: int, write_track: np.ndarray, shadowing: bool, actor: int,
                         t: int) -> int:  # fmt: skip
    """``direct_pte_prefetch``: map the non-present neighbours in the faulting SPTE's aligned block
    of 8 whose host pages are resident (each run stops at the first that is not). Under shadow
    paging (``shadowing``) each is writable only if ``prefetch_may_be_writable``; a direct MMU
    shadows nothing. Returns the SPTEs mapped."""
    done = 0
    run_ok = True
    first = idx & ~(PTE_PREFETCH_NUM - 1)
    sp_gfn = p.sp_gfn[table]
    for i in range(first, first + PTE_PREFETCH_NUM):
        if i == idx or p.spt[table, i] & SPTE_MMU_PRESENT:
            run_ok = True  # a run of non-present entries ends here
            continue
        gfn = sp_gfn + i
        off = host_off + gfn - slot_base
        if not run_ok or not slot_base <= gfn < slot_end or not resident[off >> span_shift]:
            run_ok = False
            continue
        writable = prefetch_may_be_writable(s, p, write_track, slot_base, gfn) if shadowing else True
        new = make_spte(host_pfn(new_base, pfn_base, span_shift, off), PG_LEVEL_4K, writable, True)
        set_leaf(p, s, d, rmap, table, i, PG_LEVEL_4K, gfn, new, actor, t)
        note_mapped(p, gfn, PG_LEVEL_4K)
        done += 1
    return done


# -- entry points (``h`` is the MMU's ``ArchMmu`` handle) ----------------------------------------------


@njit(cache=True)
def mmu_set_spte(h: ArchMmu, rmap: tuple, table: int, idx: int, level: int, gfn: int, mmio_spte: int, pfn: int,
                 writable: bool, wrprot: bool, write_fault: bool, bitmap: np.ndarray, bit: int, actor: int,
                 t: int) -> tuple[int, int, int, int, int, int]:  # fmt: skip
    """``mmu_set_spte`` (``_mmu_set_spte``) for shadow paging's ``FNAME(fetch)``."""
    return _mmu_set_spte(h.p, h.s, h.d, rmap, table, idx, level, gfn, mmio_spte, pfn, writable, wrprot,
                         write_fault, bitmap, bit, False, actor, t)  # fmt: skip


@njit(cache=True)
def direct_pte_prefetch(h: ArchMmu, rmap: tuple, table: int, idx: int, slot_base: int, slot_end: int,
                        host_off: int, resident: np.ndarray, new_base: np.ndarray, pfn_base: int, span_shift: int,
                        write_track: np.ndarray, shadowing: bool, actor: int, t: int) -> int:  # fmt: skip
    """``direct_pte_prefetch`` (``_direct_pte_prefetch``) on its own."""
    return _direct_pte_prefetch(h.p, h.s, h.d, rmap, table, idx, slot_base, slot_end, host_off, resident,
                                new_base, pfn_base, span_shift, write_track, shadowing, actor, t)  # fmt: skip


@njit(cache=True)
def direct_map(h: ArchMmu, rmap: tuple, root: int, gfn: int, goal: int, mmio_spte: int, pfn: int, writable: bool,
               write_fault: bool, bitmap: np.ndarray, bit: int, scan: bool, prefetch: bool, slot_base: int,
               slot_end: int, host_off: int, resident: np.ndarray, new_base: np.ndarray, pfn_base: int,
               span_shift: int, write_track: np.ndarray, actor: int,
               t: int) -> tuple[int, int, int, int, int, int, int, int, int]:  # fmt: skip
    """``direct_map`` under the write lock: walk from ``root``, create and link the missing direct
    pages, then ``mmu_set_spte`` at ``goal`` (the page is never shadowed: no ``wrprot``), then, if
    that mapped a 4K page and needs no flush first, ``direct_pte_prefetch`` (with ``prefetch``: a
    slot that is not dirty-logged, no invalidation in progress). Returns ``mmu_set_spte``'s six
    values (``MS_PREFETCHED`` in the status when it prefetched), the pages created, the leaf's
    table and the SPTEs prefetched."""
    p, s, d = h.p, h.s, h.d
    table = root
    level = TDP_ROOT_LEVEL
    created = 0
    while level > goal:
        idx = spte_index(gfn, level)
        spte = p.spt[table, idx]
        if is_shadow_present_pte(spte) and not is_last_spte(spte, level):
            table = (spte & PFN_MASK) >> PFN_SHIFT
            level -= 1
            continue
        if is_shadow_present_pte(spte):  # drop_large_spte: a huge leaf above the goal
            return 0, MS_DROP, table, idx, level, gfn & ~(pages_per_level(level) - 1), created, table, 0
        child, new = get_direct_sp(p, s, gfn & ~(pages_per_level(level) - 1), level - 1, ACC_ALL)
        created += new
        link_shadow_page(p, s, d, table, idx, child, actor, t)
        table = child
        level -= 1
    idx = spte_index(gfn, goal)
    ret, status, dt, di, dl, dg = _mmu_set_spte(p, s, d, rmap, table, idx, goal, gfn, mmio_spte, pfn, writable,
                                                False, write_fault, bitmap, bit, scan, actor, t)  # fmt: skip
    done = 0
    if ret == RET_PF_FIXED and goal == PG_LEVEL_4K and prefetch and not status & (MS_FLUSH | MS_RECYCLE):
        done = _direct_pte_prefetch(p, s, d, rmap, table, idx, slot_base, slot_end, host_off, resident, new_base,
                                    pfn_base, span_shift, write_track, scan, actor, t)  # fmt: skip
        status |= MS_PREFETCHED
    return ret, status, dt, di, dl, dg, created, table, done
