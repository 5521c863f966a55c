"""The TDP MMU fault as a vCPU group member takes it, in compiled code.

``kvm_tdp_mmu_page_fault`` for an EPT violation on a not-present SPTE of a memslot backed by 4K host
pages, in the steps a member takes at its keys (``vsim.vcpu.group_kernel``): the exit and
``kvm_faultin_pfn`` (``fault_begin``), ``read_lock(mmu_lock)`` with ``is_page_fault_stale`` and the
walk (``fault_lock``), and the cmpxchg install with ``read_unlock`` (``fault_install``). The walk,
``make_spte`` and the install are the TDP MMU's own compiled operations (``vsim.mmu.tdp_mmu_map``),
the same ones ``TdpMmu.page_fault`` calls; what is here is the choreography around them, step for
step ``VcpuExits.handle_ept_violation``, ``PageTables.kvm_faultin_pfn`` and ``TdpMmu.page_fault``
(the equivalence tests hold the two equal).
"""

from __future__ import annotations

from numba import njit

from vsim.mmu.mmu_lock import GRANT_PYTHON, Q_ACTOR, Q_T, Q_WRITE, lock_acquire, lock_grant_next, lock_release
from vsim.mmu.sp_pool import change_spte
from vsim.mmu.spte import (
    PT_WRITABLE,
    REMOVED_SPTE,
    SPTE_MMU_PRESENT,
    make_spte,
)
from vsim.mmu.tdp_mmu_map import tdp_mmu_map_install, tdp_walk_to
from vsim.sched import GRANT_PRIO
from vsim.stats import K_TDP_MMU_PAGES
from vsim.vcpu.group_exits import vm_exit
from vsim.vcpu.group_state import (
    C_FAST,
    C_FAULTIN,
    C_HOST,
    C_MAP,
    C_REF,
    C_SP,
    C_SPLIT,
    C_ZERO,
    EV_PAGE_FAULT,
    EV_PAGE_FAULT_RET,
    F_ROOT_INVALID,
    G_EV_KIND,
    G_EVENTS,
    G_GRANT_T,
    G_INV_END,
    G_INV_IN_PROGRESS,
    G_INV_START,
    G_LOCKED_CHECK,
    G_MMU_SEQ,
    G_NEV,
    G_NLW,
    G_PFN_BASE,
    G_POPULATED,
    G_PRE_LOCK,
    G_RET_NAME,
    G_ROOT_CHECK,
    GS_GRANT,
    HANDED,
    M_FAULT_SEQ,
    M_FLAGS,
    M_GFN,
    M_IDX,
    M_KEYP,
    M_LEVEL,
    M_MMU_SEQ,
    M_NOW,
    M_OLD,
    M_PFN,
    M_PHASE,
    M_RET,
    M_ROOT,
    M_TABLE,
    M_TABLE_GEN,
    M_WRITE,
    PFERR_GUEST_FINAL_MASK,
    PFERR_PRESENT_MASK,
    PFERR_WRITE_MASK,
    PH_ENTRY,
    PH_INSTALL,
    PH_LOCK,
    PH_LOCKED,
    RET_PF_FIXED,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    S_HOST_ALLOCS,
    S_PF_FAST,
    S_PF_FIXED,
    S_PF_RETRY,
    S_PF_SPURIOUS,
    S_PF_TAKEN,
)


@njit(cache=True)
def retry_gfn(g, mmu_seq, gfn):
    """``mmu_invalidate_retry_gfn``."""
    if g[G_INV_IN_PROGRESS] and g[G_INV_START] <= gfn < g[G_INV_END]:
        return True
    return g[G_MMU_SEQ] != mmu_seq


@njit(cache=True)
def find_slot(slots, gfn):
    for s in range(slots.shape[0]):
        if slots[s, 0] <= gfn < slots[s, 0] + slots[s, 1]:
            return s
    return -1


@njit(cache=True)
def fault_exit(m, ms, ss, counters, g, c, evbuf, gfn, write, refs, present):
    """``VcpuExits._exit`` for an EPT violation, then ``kvm_mmu_do_page_fault``'s count and
    tracepoint; returns the time the fault handling starts."""
    now = ms[m, M_NOW]
    counters[m, 2] += 1  # the walk that ended in the violation
    counters[m, 3] += refs
    vm_exit(m, ms, ss, g, c, now, now + refs * c[C_REF], 1)
    now = ms[m, M_NOW]
    ms[m, M_FAULT_SEQ] += 1
    ms[m, M_GFN] = gfn
    ms[m, M_WRITE] = 1 if write else 0
    ss[m, S_PF_TAKEN] += 1
    if g[G_EVENTS]:
        code = PFERR_GUEST_FINAL_MASK | (PFERR_WRITE_MASK if write else 0) | (PFERR_PRESENT_MASK if present else 0)
        record_event(g, evbuf, EV_PAGE_FAULT, now, m, ms[m, M_FAULT_SEQ], gfn << 12, code)
    return now


@njit(cache=True)
def fast_fault(m, ms, ss, counters, pool, g, c, evbuf, bitmap, gfn, refs, table, idx, level, old, new, bit):
    """``fast_page_fault`` when ``fast_pf_fix`` said it fixes the fault with ``new`` (a write to a
    write-protected, MMU-writable leaf: dirty logging): the lockless cmpxchg, and the page marked
    dirty (``bitmap[bit]``, or no bitmap when ``bit`` < 0)."""
    fault_exit(m, ms, ss, counters, g, c, evbuf, gfn, True, refs, True)
    change_spte(pool, table, idx, level, gfn & ~((1 << (9 * (level - 1))) - 1), old, new, m, ms[m, M_NOW])
    ss[m, S_PF_FAST] += 1
    if bit >= 0 and new & PT_WRITABLE and not old & PT_WRITABLE:
        bitmap[bit] = 1  # mark_page_dirty_in_slot
    ms[m, M_NOW] += c[C_FAST]
    fault_end(m, ms, ss, g, evbuf, RET_PF_FIXED)


@njit(cache=True)
def fault_begin(m, ms, ss, counters, g, c, resident, evbuf, gfn, write, refs, hidx):
    """``VcpuExits._exit`` + ``kvm_mmu_do_page_fault`` + ``kvm_faultin_pfn``, up to ``mmu_lock``."""
    now = fault_exit(m, ms, ss, counters, g, c, evbuf, gfn, write, refs, False)
    # kvm_faultin_pfn (fast_page_fault cannot serve a not-present fault with A/D bits on).
    seq = g[G_MMU_SEQ]
    ms[m, M_MMU_SEQ] = seq
    now += c[C_FAULTIN]
    ms[m, M_NOW] = now
    if g[G_PRE_LOCK] and retry_gfn(g, seq, gfn):
        fault_end(m, ms, ss, g, evbuf, RET_PF_RETRY)
        return
    if not resident[hidx]:  # first touch: the host allocates and zeroes the 4K page
        resident[hidx] = 1
        g[G_POPULATED] += 1
        now += c[C_HOST] + c[C_ZERO]
        ss[m, S_HOST_ALLOCS] += 1
        ms[m, M_NOW] = now
    ms[m, M_PFN] = g[G_PFN_BASE] + hidx
    if g[G_PRE_LOCK] and retry_gfn(g, seq, gfn):
        fault_end(m, ms, ss, g, evbuf, RET_PF_RETRY)
        return
    ms[m, M_PHASE] = PH_LOCK


@njit(cache=True)
def fault_lock(m, ms, ss, pool, lk, q, g, c, evbuf):
    """``read_lock(mmu_lock)`` (uncontended: the caller checked), ``is_page_fault_stale``, then
    ``kvm_tdp_mmu_map``'s walk and map work, up to the install."""
    lock_acquire(lk, q, False, m, ms[m, M_NOW], True)
    gfn = ms[m, M_GFN]
    stale = g[G_ROOT_CHECK] and ms[m, M_FLAGS] & F_ROOT_INVALID
    if stale or (g[G_LOCKED_CHECK] and retry_gfn(g, ms[m, M_MMU_SEQ], gfn)):
        lock_release(lk, False)  # nobody waits (the lock was not busy): no hand-over
        fault_end(m, ms, ss, g, evbuf, RET_PF_RETRY)
        return
    table, idx, level, old = tdp_walk_to(pool.spt, ms[m, M_ROOT], gfn, 1)
    ms[m, M_TABLE] = table
    ms[m, M_IDX] = idx
    ms[m, M_LEVEL] = level
    ms[m, M_OLD] = old
    ms[m, M_TABLE_GEN] = pool.sp_gen[table]
    new_tables = level - 1 if level > 1 and old != REMOVED_SPTE else 0
    ms[m, M_NOW] += c[C_MAP] + c[C_SP] * new_tables
    if new_tables and old & SPTE_MMU_PRESENT:  # splitting a huge leaf fills each new table
        ms[m, M_NOW] += c[C_SPLIT] * 512 * new_tables
    ms[m, M_PHASE] = PH_INSTALL


@njit(cache=True)
def fault_install(m, ms, ss, pool, lk, q, lwbuf, g, bitmap, evbuf):
    """The cmpxchg half of ``kvm_tdp_mmu_map`` (``tdp_mmu_map_install``), then ``read_unlock``;
    returns ``hand_over``'s code."""
    table = ms[m, M_TABLE]
    now = ms[m, M_NOW]
    if pool.sp_gen[table] != ms[m, M_TABLE_GEN]:
        ret = RET_PF_RETRY  # the table was freed since the walk (TdpMmu.page_fault_locked)
    else:
        new = make_spte(ms[m, M_PFN], 1, True)
        ret, _ = tdp_mmu_map_install(pool, K_TDP_MMU_PAGES, table, ms[m, M_IDX], ms[m, M_LEVEL], ms[m, M_OLD],
                                     ms[m, M_GFN], 1, new, False, bitmap, -1, m, now)  # fmt: skip
    r = hand_over(ms, lk, q, lwbuf, g, now) if lock_release(lk, False) else 0
    fault_end(m, ms, ss, g, evbuf, ret)
    return r


@njit(cache=True)
def hand_over(ms, lk, q, lwbuf, g, t):
    """``mmu_lock`` was released at ``t`` with waiters: hand it to the members queued at the head
    (each resumes at ``(t, GRANT_PRIO)``, holding it). Returns ``HANDED`` if a member got it (an
    action now comes before the releaser's key), ``GS_GRANT`` if a Python waiter is next (the
    driver hands it over, ``MmuLock.grant``), else 0."""
    r = 0
    while True:
        k = lock_grant_next(lk, q, t, True)
        if k == GRANT_PYTHON:
            g[G_GRANT_T] = t
            return GS_GRANT
        if k < 0:
            return r
        m = q[k, Q_ACTOR]
        waited = t - q[k, Q_T]
        if waited:
            n = g[G_NLW]
            lwbuf[n, 0] = q[k, Q_WRITE]
            lwbuf[n, 1] = m
            lwbuf[n, 2] = waited
            g[G_NLW] = n + 1
        ms[m, M_NOW] = t
        ms[m, M_KEYP] = GRANT_PRIO
        ms[m, M_PHASE] = PH_LOCKED  # (only the legacy MMU's writers queue in the loop)
        r = HANDED
        if q[k, Q_WRITE]:
            return r


@njit(cache=True)
def fault_end(m, ms, ss, g, evbuf, ret):
    """``kvm_mmu_do_page_fault``'s outcome count and tracepoint; the member goes on to entry."""
    if ret == RET_PF_FIXED:
        ss[m, S_PF_FIXED] += 1
    elif ret == RET_PF_SPURIOUS:
        ss[m, S_PF_SPURIOUS] += 1
    else:
        ss[m, S_PF_RETRY] += 1
    ms[m, M_RET] = ret
    if g[G_EVENTS]:
        record_event(g, evbuf, EV_PAGE_FAULT_RET, ms[m, M_NOW], m, ms[m, M_FAULT_SEQ], g[G_RET_NAME + ret], 1)
    ms[m, M_PHASE] = PH_ENTRY


@njit(cache=True, inline="always")
def record_event(g, evbuf, kind, t, m, fid, a, b):
    """A record in the sink's row format (``vsim.events.rows``)."""
    k = g[G_NEV]
    evbuf[k, 0] = g[G_EV_KIND + kind]
    evbuf[k, 1] = t
    evbuf[k, 2] = m
    evbuf[k, 3] = fid
    evbuf[k, 4] = a
    evbuf[k, 5] = b
    g[G_NEV] = k + 1
