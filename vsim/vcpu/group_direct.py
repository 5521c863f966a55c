"""The legacy MMU's fault as a vCPU group member takes it, in compiled code.

``direct_page_fault`` for an EPT violation on a not-present SPTE of a memslot backed by 4K host
pages. The exit and ``kvm_faultin_pfn`` are the TDP MMU's (``group_fault.fault_begin``); then, at
the member's keys (``vsim.vcpu.group_kernel``):

- ``direct_lock``: ``write_lock(mmu_lock)``, taken at once or queued FIFO behind the holder and the
  earlier waiters (``MmuLock``'s own arrays and rules, ``vsim.mmu.mmu_lock``);
- ``direct_locked``, holding it: ``is_page_fault_stale``, ``make_mmu_pages_available`` and
  ``direct_map`` with ``direct_pte_prefetch``, the legacy MMU's own compiled operation
  (``vsim.mmu.direct_map``, which ``LegacyMmu.direct_map`` calls in every mode);
- ``direct_unlock``: ``write_unlock``, handing the lock to the next waiter (``hand_over``).

What is here is the choreography around ``direct_map``, step for step ``LegacyMmu.page_fault`` and
``page_fault_held`` (the equivalence tests hold the two equal). A locked section that would zap
shadow pages (``make_mmu_pages_available`` below ``KVM_MIN_FREE_MMU_PAGES``) or drop an SPTE on the
path (a huge leaf, a leaf of another pfn) goes on in Python, holding the lock (``LEAVE_LOCKED``).
"""

from __future__ import annotations

from numba import njit, types
from numba.extending import overload
from numba.typed import List

from vsim.mmu.direct_map import (
    MS_DROP,
    MS_FLUSH,
    MS_MMIO_CREATED,
    MS_PREFETCHED,
    MS_RECYCLE,
    MS_UNLINK,
    PTE_PREFETCH_NUM,
    direct_map,
)
from vsim.mmu.mmu_lock import lock_acquire, lock_release
from vsim.mmu.mmu_page import KVM_MIN_FREE_MMU_PAGES, S_N_USED, sp_is_obsolete
from vsim.mmu.pte_list import D_NDESC, D_NFREE
from vsim.mmu.sp_pool import H_NFREE, H_NTABLES
from vsim.mmu.spte import (
    PFN_MASK,
    PFN_SHIFT,
    TDP_ROOT_LEVEL,
    is_last_spte,
    is_shadow_present_pte,
    spte_index,
    spte_to_pfn,
)
from vsim.vcpu.group_fault import fault_end, find_slot, hand_over, retry_gfn
from vsim.vcpu.group_state import (
    C_LEGACY_MAP,
    C_PREFETCH,
    C_SP,
    G_CHECKER,
    G_INV_IN_PROGRESS,
    G_LOCKED_CHECK,
    G_N_MAX,
    G_NLW,
    G_PFN_BASE,
    G_ROOT_CHECK,
    G_SPAN_SHIFT,
    GS_FLUSH,
    GS_GROW,
    GS_LEAVE,
    M_GFN,
    M_KEYP,
    M_MMU_SEQ,
    M_NOW,
    M_PFN,
    M_PHASE,
    M_PRIO,
    M_RET,
    M_ROOT,
    M_WRITE,
    PH_LOCKED,
    PH_LOCKWAIT,
    PH_UNLOCK,
    RET_PF_RETRY,
    SL_BASE,
    SL_HOST_OFF,
    SL_NPAGES,
)

# Room a direct_map needs: a table per level below the root, and a descriptor for the leaf's rmap,
# each link's parent_ptes and each prefetched SPTE (``LegacyMmu.direct_map``'s reserve).
DIRECT_MAP_TABLES = TDP_ROOT_LEVEL - 1
DIRECT_MAP_DESCS = 1 + TDP_ROOT_LEVEL + PTE_PREFETCH_NUM
MS_PYTHON = MS_DROP | MS_UNLINK | MS_FLUSH | MS_RECYCLE | MS_MMIO_CREATED


@njit(cache=True)
def direct_lock(m, ms, lk, q):
    """``write_lock(mmu_lock)`` at the member's key: True if taken at once (the locked section runs
    now), else the member is queued (``PH_LOCKWAIT``) until a release hands it the lock."""
    if lock_acquire(lk, q, True, m, ms[m, M_NOW], True):
        ms[m, M_PHASE] = PH_LOCKED
        return True
    ms[m, M_PHASE] = PH_LOCKWAIT
    return False


@njit(cache=True)
def _needs_python(h, ms, m, g):
    """The locked section would zap shadow pages (``make_mmu_pages_available``), drop an SPTE on the
    path (``direct_map``'s ``MS_DROP``: a huge leaf above 4K, or a leaf of another pfn), or, with the
    checker on, map into an obsolete root (which it checks)."""
    if g[G_N_MAX] - h.s.hdr[S_N_USED] < KVM_MIN_FREE_MMU_PAGES:
        return True
    if g[G_CHECKER] and sp_is_obsolete(h.s, ms[m, M_ROOT]):
        return True  # the checker checks an install into an obsolete root
    spt = h.p.spt
    gfn = ms[m, M_GFN]
    table = ms[m, M_ROOT]
    for level in range(TDP_ROOT_LEVEL, 0, -1):
        spte = spt[table, spte_index(gfn, level)]
        if not is_shadow_present_pte(spte):
            return False
        if level == 1:
            return spte_to_pfn(spte) != ms[m, M_PFN]
        if is_last_spte(spte, level):
            return True
        table = (spte & PFN_MASK) >> PFN_SHIFT
    return False


@njit(cache=True)
def direct_locked(m, ms, ss, h, lk, q, lwbuf, g, c, slots, rmaps, wtracks, resident, new_base, bitmap, evbuf):
    """``page_fault_held``: the locked section at the member's key. Returns ``GS_GROW`` or
    ``GS_FLUSH`` before doing anything when the arrays need room, ``GS_LEAVE`` when Python must go
    on from here, else ``hand_over``'s code (a stale fault drops the lock at once)."""
    p, d = h.p, h.d
    if p.hdr[H_NFREE] + p.spt.shape[0] - p.hdr[H_NTABLES] < DIRECT_MAP_TABLES or (
        d.hdr[D_NFREE] + d.spte_count.shape[0] - d.hdr[D_NDESC] < DIRECT_MAP_DESCS
    ):
        return GS_GROW
    if g[G_NLW] + 1 > lwbuf.shape[0]:
        return GS_FLUSH
    if _needs_python(h, ms, m, g):
        return GS_LEAVE
    ms[m, M_KEYP] = ms[m, M_PRIO]
    now = ms[m, M_NOW]
    gfn = ms[m, M_GFN]
    root = ms[m, M_ROOT]
    if (g[G_ROOT_CHECK] and sp_is_obsolete(h.s, root)) or (g[G_LOCKED_CHECK] and retry_gfn(g, ms[m, M_MMU_SEQ], gfn)):
        r = hand_over(ms, lk, q, lwbuf, g, now) if lock_release(lk, True) else 0
        fault_end(m, ms, ss, g, evbuf, RET_PF_RETRY)
        return r
    s = find_slot(slots, gfn)
    base = slots[s, SL_BASE]
    ret, status, _, _, _, _, created, _, done = direct_map(
        h, rmaps[s], root, gfn, 1, 0, ms[m, M_PFN], True, ms[m, M_WRITE] != 0, bitmap, -1, False,
        g[G_INV_IN_PROGRESS] == 0, base, base + slots[s, SL_NPAGES], slots[s, SL_HOST_OFF], resident, new_base,
        g[G_PFN_BASE], g[G_SPAN_SHIFT], wtracks[s], m, now,
    )  # fmt: skip
    assert not status & MS_PYTHON  # _needs_python saw to that
    work = c[C_LEGACY_MAP] + c[C_SP] * created
    if status & MS_PREFETCHED:
        work += c[C_PREFETCH] * done
    ms[m, M_NOW] = now + work
    ms[m, M_RET] = ret
    ms[m, M_PHASE] = PH_UNLOCK
    return 0


@njit(cache=True)
def direct_unlock(m, ms, ss, lk, q, lwbuf, g, evbuf):
    """``write_unlock`` at the member's key, then ``kvm_mmu_do_page_fault``'s outcome; returns
    ``hand_over``'s code (or ``GS_FLUSH`` first if a lock wait might not fit)."""
    if g[G_NLW] + 1 > lwbuf.shape[0]:
        return GS_FLUSH
    r = hand_over(ms, lk, q, lwbuf, g, ms[m, M_NOW]) if lock_release(lk, True) else 0
    fault_end(m, ms, ss, g, evbuf, ms[m, M_RET])
    return r


def direct_step(legacy, m, ms, ss, h, lk, q, lwbuf, g, c, slots, rmaps, wtracks, resident, new_base, bitmap, evbuf):
    """Member ``m``'s legacy-MMU step at its key, by its phase: ``direct_lock`` (``PH_LOCK``),
    ``direct_locked`` or ``direct_unlock``, returning their codes (0 after ``direct_lock``).

    Compiled code only (``run_group``): its ``legacy`` argument is ``True`` for a legacy-MMU VM and
    ``None`` for a TDP MMU VM, whose loop then compiles none of the legacy fault (half the loop's
    compile time on a first run)."""
    raise NotImplementedError("direct_step runs in compiled code only")


# (numba's stubs leave "cache" out of jit_options, which overload hands on to njit.)
@overload(direct_step, jit_options={"cache": True}, inline="always")  # type: ignore[typeddict-unknown-key]
def _direct_step(legacy, m, ms, ss, h, lk, q, lwbuf, g, c, slots, rmaps, wtracks, resident, new_base, bitmap, evbuf):
    if isinstance(legacy, types.NoneType):

        def none(legacy, m, ms, ss, h, lk, q, lwbuf, g, c, slots, rmaps, wtracks, resident, new_base, bitmap, evbuf):
            return 0

        return none

    def impl(legacy, m, ms, ss, h, lk, q, lwbuf, g, c, slots, rmaps, wtracks, resident, new_base, bitmap, evbuf):
        phase = ms[m, M_PHASE]
        if phase == PH_LOCKED:
            return direct_locked(m, ms, ss, h, lk, q, lwbuf, g, c, slots, rmaps, wtracks, resident, new_base, bitmap,
                                 evbuf)  # fmt: skip
        if phase == PH_UNLOCK:
            return direct_unlock(m, ms, ss, lk, q, lwbuf, g, evbuf)
        direct_lock(m, ms, lk, q)
        return 0

    return impl


# The memslots' rmaps and write-track counts as the loop takes them (``group_transfer.load_slots``):
# typed lists made and filled in cached compiled code (numba's own list code, called from Python,
# would compile in every process).
_RMAP_TYPE = types.Tuple((types.int64[::1], types.int64[::1], types.int64[::1], types.int64, types.int64))


@njit(cache=True)
def new_slot_lists():
    """Empty lists of rmaps (``ShadowMmu.rmap_args``) and write-track arrays, one item per slot row."""
    return List.empty_list(_RMAP_TYPE), List.empty_list(types.int32[::1])


@njit(cache=True)
def slot_lists_append(rmaps, wtracks, h4k, h2m, h1g, base, number, wtrack):
    rmaps.append((h4k, h2m, h1g, base, number))
    wtracks.append(wtrack)
