"""The compiled event loop of a vCPU group: many vCPUs' accesses and TDP MMU faults without SimPy.

``run_group`` interleaves the member vCPUs of ``vsim.vcpu.group.VcpuGroup`` in compiled code. Each
member has a next action at a key ``(time, priority)``, exactly where its Python run loop would
sync (``Actor.sync``): the instant of an access that exits, ``mmu_lock`` acquisition, the SPTE
install, and VM entry when ``vcpu_enter_guest`` would sync. The loop always runs the member with the
smallest key, and stops before any key at or after the head of SimPy's queue (the rest of the model:
the VMM, the host MM, vCPUs running in Python), so every action sees the shared state it would see
in a SimPy run. What a Python vCPU does between two syncs, the member does in the same step.
While vCPUs may restrict SPTEs (``G_LOCKSTEP``), a stretch of accesses also ends where another
member acts (``_horizon``); shadow-paged members (``G_SHADOW``) take no fault in the loop.

Members run their stretches of accesses with ``run_accesses`` and take the common fault in
compiled code: an EPT violation on a not-present SPTE of a memslot backed by 4K host pages,
``kvm_tdp_mmu_page_fault`` under ``read_lock(mmu_lock)`` (``kvm_faultin_pfn``,
``is_page_fault_stale``, ``kvm_tdp_mmu_map`` with its cmpxchg races, ``RET_PF_RETRY``/``SPURIOUS``),
then VM entry; the legacy MMU's ``direct_page_fault`` under ``write_lock(mmu_lock)``, queueing
behind the holder (``vsim.vcpu.group_direct``); and a write to a write-protected 4K SPTE
(``fast_page_fault``, dirty logging). They also take a kick's IPI (``handle_external_interrupt``)
with its TLB-flush request at entry, and a pass end's ``GUEST_SYNC`` when no selftest program waits
for it; the driver hands them their next chunk of accesses. The code mirrors
``Vcpu.run``/``_run_batched``, ``VcpuExits``, ``VcpuRequests``, ``TdpMmu.page_fault`` and
``LegacyMmu.page_fault`` step for step; the equivalence tests hold the two equal. Everything else
makes the member leave the group at a point where its Python code can go on: before the access
(``LEAVE_RUN``), to handle that one fault in Python (``LEAVE_PYFAULT``), waiting for a contended
``read_lock`` (``LEAVE_LOCK``), holding the write lock with a locked section only Python can
finish (``LEAVE_LOCKED``), or at entry with other requests to service or an SRCU grace period to
end (``LEAVE_ENTRY``).
"""

from __future__ import annotations

from numba import njit

from vsim.mmu.fast_page_fault import fast_pf_fix
from vsim.mmu.mmu_lock import L_QLEN, L_WRITER, NO_WRITER
from vsim.mmu.mmu_page import sp_is_obsolete
from vsim.mmu.sp_pool import H_LOG, H_NCHG, H_NFREE, H_NTABLES
from vsim.mmu.spte import REMOVED_SPTE
from vsim.mmu.tdp_mmu_map import tdp_walk_to
from vsim.vcpu.batch import STOP_DONE, STOP_EPT_VIOLATION, STOP_HORIZON, STOP_SET_ACCESSED, run_accesses
from vsim.vcpu.group_direct import direct_step
from vsim.vcpu.group_exits import entry, guest_sync, irq_exit, service_flush
from vsim.vcpu.group_fault import fast_fault, fault_begin, fault_install, fault_lock, find_slot
from vsim.vcpu.group_state import (
    C_GUEST,
    C_HIT,
    C_REF,
    C_VMEXIT,
    CHG_ROOM,
    F_LEAVE,
    F_ROOT_INVALID,
    FAST_BITMAP,
    G_CHECKER,
    G_EXT_P,
    G_EXT_T,
    G_EXT_WAITING,
    G_GUEST_REFS,
    G_HZ,
    G_LEGACY,
    G_LOCKSTEP,
    G_MAX_CLASS,
    G_NEV,
    G_NEXT_P,
    G_NEXT_T,
    G_NLEFT,
    G_NSRCU,
    G_NSRV,
    G_PROGRAM,
    G_SHADOW,
    G_SRCU_WAITS,
    G_STOP,
    G_STOP_M,
    G_UFFD,
    GS_CHUNK,
    GS_EXTERNAL,
    GS_FLUSH,
    GS_GROW,
    GS_LEAVE,
    HANDED,
    LEAVE_ENTRY,
    LEAVE_LOCK,
    LEAVE_LOCKED,
    LEAVE_PYFAULT,
    LEAVE_RUN,
    M_FLAGS,
    M_GUEST_EV,
    M_I,
    M_KEYP,
    M_KICK,
    M_LEAVE,
    M_LEVEL,
    M_N,
    M_NOW,
    M_OLD,
    M_PASS_END,
    M_PHASE,
    M_PRIO,
    M_REQ,
    M_ROOT,
    M_SYNCED,
    M_WBASE,
    NEVER,
    PH_DONE,
    PH_ENTRY,
    PH_INSTALL,
    PH_IRQ,
    PH_LEFT,
    PH_LOCK,
    PH_LOCKED,
    PH_LOCKWAIT,
    PH_NEXT,
    PH_OUT,
    PH_RUN,
    PH_UNLOCK,
    RET_PF_FIXED,
    SL_BASE,
    SL_FAST,
    SL_FAULTIN,
    SL_HOST_OFF,
)


@njit(cache=True, inline="always")
def _before(t, p, t2, p2):
    return t < t2 or (t == t2 and p < p2)


@njit(cache=True)
def _horizon(ms, g, c, m):
    """``Vm.horizon`` for member ``m``: the VM-wide actors' wake-ups; while one of them waits on
    something, the head of the queue, where the other members are queued too. In lockstep
    (``G_LOCKSTEP``: vCPUs may restrict SPTEs) the queue's head and every other member's key, as
    ``Vm._lockstep_limit`` bounds a Python vCPU: a member between two stretches of accesses
    changes nothing another reads before its next exit, a VM exit's cost after its key."""
    h = g[G_HZ]
    lockstep = g[G_LOCKSTEP] != 0
    if g[G_EXT_WAITING] or lockstep:
        p = ms[m, M_PRIO]
        t = g[G_EXT_T] + (1 if p < g[G_EXT_P] else 0)
        h = min(h, t)
        for k in range(ms.shape[0]):
            ph = ms[k, M_PHASE]
            if k != m and ph != PH_OUT and ph != PH_LOCKWAIT:  # (a lock waiter is woken by a release)
                if lockstep and ph == PH_RUN:
                    h = min(h, ms[k, M_NOW] + c[C_VMEXIT])
                else:
                    h = min(h, ms[k, M_NOW] + (1 if p < ms[k, M_KEYP] else 0))
    return h


@njit(cache=True)
def run_group(legacy, ms, ss, touched, left, gfns, writes, tags, wr, geo, count, counters, h, lk, q, g, c, slots,
              rmaps, wtracks, resident, moved, new_base, bitmap, evbuf, srvbuf, srcubuf, lwbuf, written, wmaps,
              pml_n):  # fmt: skip
    """Run the members in key order until one leaves or the next key reaches the queue head.

    ``legacy`` is ``True`` for the legacy MMU and ``None`` for the TDP MMU: a separate compiled
    loop for each, so a TDP MMU VM compiles none of the legacy fault (``group_direct.direct_step``).
    ``slots`` rows are ``(base_gfn, npages, host_offset, simple)``: ``simple`` when the compiled
    fault may serve the slot (valid, not dirty-logged, backed by the 4K host mapping ``resident``
    / ``moved`` index, and A/D bits on). Sets ``g[G_STOP]`` (``GS_*``), ``g[G_STOP_M]``, the next
    member key ``g[G_NEXT_T/P]``; marks each member it ran in ``touched``, each that left in ``left``.
    """
    while True:
        m = _next_member(ms, g)
        if m < 0 or not _before(g[G_NEXT_T], g[G_NEXT_P], g[G_EXT_T], g[G_EXT_P]):
            g[G_STOP] = GS_LEAVE if g[G_NLEFT] else GS_EXTERNAL
            return
        if g[G_NLEFT] and not _leaves_now(ms, g, lk, m):
            g[G_STOP] = GS_LEAVE  # the members that left act in Python first
            return
        touched[m] = 1
        r = _step(m, ms, ss, gfns, writes, tags, wr, geo, count, counters, h, lk, q, g, c, slots, rmaps,
                  wtracks, resident, moved, new_base, bitmap, evbuf, srvbuf, srcubuf, lwbuf, written, wmaps, legacy,
                  pml_n)  # fmt: skip
        if r == GS_LEAVE:
            ms[m, M_PHASE] = PH_LEFT
            left[g[G_NLEFT]] = m
            g[G_NLEFT] += 1
        elif r:
            g[G_STOP] = r
            g[G_STOP_M] = m
            _next_member(ms, g)
            return


@njit(cache=True)
def _next_member(ms, g):
    """The member with the smallest key (-1 if none); its key goes to ``g[G_NEXT_T/P]``."""
    m = -1
    bt = NEVER
    bp = 0
    for k in range(ms.shape[0]):
        ph = ms[k, M_PHASE]
        if (
            ph != PH_OUT
            and ph != PH_LEFT
            and ph != PH_LOCKWAIT
            and (m < 0 or _before(ms[k, M_NOW], ms[k, M_KEYP], bt, bp))
        ):
            m = k
            bt = ms[k, M_NOW]
            bp = ms[k, M_KEYP]
    g[G_NEXT_T] = bt
    g[G_NEXT_P] = bp
    return m


@njit(cache=True)
def _leaves_now(ms, g, lk, m):
    """Member ``m``'s next action is to leave, touching nothing (``_step``'s first checks)."""
    ph = ms[m, M_PHASE]
    if ph == PH_DONE:
        return ms[m, M_PASS_END] != 0 and _gsync_in_python(ms, g, m)
    if ph == PH_RUN and ms[m, M_FLAGS] & F_LEAVE:
        return True
    if ph == PH_LOCK:
        return not g[G_LEGACY] and _lock_busy(lk)
    return ph == PH_ENTRY and (ms[m, M_FLAGS] & F_LEAVE or g[G_SRCU_WAITS] != 0)


@njit(cache=True, inline="always")
def _log_full(pool):
    """The SPTE change log (kept while the checker is on) may not hold one more fault's changes:
    the driver replays it to the checker first (``GS_FLUSH``)."""
    return pool.hdr[H_LOG] != 0 and pool.hdr[H_NCHG] + CHG_ROOM > pool.chg.shape[0]


@njit(cache=True)
def _root_obsolete(h, ms, g, m):
    """Member ``m``'s root is obsolete: a shadow page a fast zap made obsolete (the legacy MMU), or
    a TDP MMU root that ``kvm_tdp_mmu_invalidate_all_roots`` marked (``F_ROOT_INVALID``)."""
    if g[G_LEGACY]:
        return sp_is_obsolete(h.s, ms[m, M_ROOT])
    return ms[m, M_FLAGS] & F_ROOT_INVALID != 0


@njit(cache=True, inline="always")
def _lock_busy(lk):
    """A writer holds ``mmu_lock`` or someone waits for it: a reader would queue."""
    return lk[L_WRITER] != NO_WRITER or lk[L_QLEN] > 0


@njit(cache=True)
def _gsync_in_python(ms, g, m):
    """A pass end's GUEST_SYNC goes to Python: a selftest program takes it, or a kick or other
    requests are due first."""
    return g[G_PROGRAM] != 0 or ms[m, M_KICK] <= ms[m, M_NOW] or ms[m, M_FLAGS] & F_LEAVE != 0


@njit(cache=True)
def _leave(ms, m, why):
    ms[m, M_LEAVE] = why
    return GS_LEAVE


@njit(cache=True, inline="always")
def _step(m, ms, ss, gfns, writes, tags, wr, geo, count, counters, h, lk, q, g, c, slots, rmaps, wtracks,
          resident, moved, new_base, bitmap, evbuf, srvbuf, srcubuf, lwbuf, written, wmaps, legacy, pml_n):  # fmt: skip
    """Member ``m``'s action at its key, and what follows it up to its next sync (``t_key``: while
    the member's clock is still there, nothing can have acted first; -1 once a hand-over of
    ``mmu_lock`` queued another member's action before it)."""
    t_key = ms[m, M_NOW]
    pool = h.p
    while True:
        phase = ms[m, M_PHASE]
        if phase == PH_DONE:  # Vcpu.run: GUEST_SYNC at a pass end, then the next chunk
            if ms[m, M_PASS_END]:
                if _gsync_in_python(ms, g, m):
                    return _leave(ms, m, LEAVE_RUN)
                if g[G_NSRCU] + ms.shape[0] + 1 > srcubuf.shape[0]:
                    return GS_FLUSH
                guest_sync(m, ms, ss, g, c, srcubuf)
                continue
            ms[m, M_PHASE] = PH_NEXT
            continue
        if phase == PH_NEXT:
            return GS_CHUNK if ms[m, M_NOW] == t_key else 0  # after Vcpu.run's sync
        if phase == PH_LOCK:
            if g[G_CHECKER] and _root_obsolete(h, ms, g, m):
                return _leave(ms, m, LEAVE_LOCK)  # the checker checks an install into an obsolete root
            if g[G_LEGACY]:  # write_lock: taken, or queued until a release hands it over
                direct_step(legacy, m, ms, ss, h, lk, q, lwbuf, g, c, slots, rmaps, wtracks, resident, new_base, bitmap,
                            evbuf)  # fmt: skip
                if ms[m, M_PHASE] == PH_LOCKED:
                    continue
                return 0
            if _lock_busy(lk):  # a writer holds or waits for mmu_lock: the member waits in Python
                return _leave(ms, m, LEAVE_LOCK)
            fault_lock(m, ms, ss, pool, lk, q, g, c, evbuf)
            if ms[m, M_PHASE] == PH_INSTALL:
                return 0  # the install waits for its key
            continue
        if phase == PH_LOCKED:
            if _log_full(pool):
                return GS_FLUSH
            r = direct_step(legacy, m, ms, ss, h, lk, q, lwbuf, g, c, slots, rmaps, wtracks, resident, new_base, bitmap,
                            evbuf)  # fmt: skip
            if r == GS_LEAVE:
                return _leave(ms, m, LEAVE_LOCKED)
            if r == HANDED:
                t_key = -1
            elif r:
                return r
            if ms[m, M_PHASE] == PH_UNLOCK:
                return 0  # write_unlock waits for its key
            continue
        if phase == PH_UNLOCK:
            r = direct_step(legacy, m, ms, ss, h, lk, q, lwbuf, g, c, slots, rmaps, wtracks, resident, new_base, bitmap,
                            evbuf)  # fmt: skip
            if r == HANDED:
                t_key = -1
            elif r:
                return r
            continue
        if phase == PH_INSTALL:
            need = ms[m, M_LEVEL] - 1 if ms[m, M_OLD] != REMOVED_SPTE else 0
            if need > pool.hdr[H_NFREE] + pool.spt.shape[0] - pool.hdr[H_NTABLES]:
                return GS_GROW
            if _log_full(pool):
                return GS_FLUSH
            r = fault_install(m, ms, ss, pool, lk, q, lwbuf, g, bitmap, evbuf)
            if r == HANDED:
                t_key = -1
            elif r:
                return r
            continue
        if phase == PH_IRQ:
            irq_exit(m, ms, ss, g, c)
            continue
        if phase == PH_ENTRY:
            # vcpu_enter_guest: requests are serviced at a synced instant; Python goes on if some
            # need it (or an SRCU grace period waits for this reader).
            if ms[m, M_FLAGS] & F_LEAVE or g[G_SRCU_WAITS]:
                return _leave(ms, m, LEAVE_ENTRY) if ms[m, M_NOW] == t_key else 0
            while True:
                if (ms[m, M_REQ] or ms[m, M_NOW] >= _horizon(ms, g, c, m)) and ms[m, M_NOW] != t_key:
                    return 0
                if not ms[m, M_REQ]:
                    break
                service_flush(m, ms, ss, c, tags, wr, count)
            entry(m, ms, g, c, srvbuf, srcubuf)
            continue
        # Guest accesses (PH_RUN): a stretch, then its stop.
        now0 = ms[m, M_NOW]
        if ms[m, M_FLAGS] & F_LEAVE:
            return _leave(ms, m, LEAVE_RUN) if now0 == t_key else 0
        i0 = ms[m, M_I]
        limit = min(_horizon(ms, g, c, m), ms[m, M_KICK], ms[m, M_GUEST_EV]) - now0
        wmap = wmaps[m]
        j, dt, status, refs, present = run_accesses(
            gfns[m], writes[m], i0, ms[m, M_N], limit, pool.spt, ms[m, M_ROOT], g[G_GUEST_REFS], g[G_MAX_CLASS],
            tags[m], wr[m], geo[0], geo[1], count[m], c[C_GUEST], c[C_HIT], c[C_REF], counters[m], written,
            ms[m, M_WBASE], wmap, wmap[:0], pml_n, ms[m, M_SYNCED],  # (no PML in the loop: an empty buffer)
        )  # fmt: skip
        now = now0 + dt
        ms[m, M_NOW] = now
        ms[m, M_I] = j
        if status == STOP_DONE:
            ms[m, M_PHASE] = PH_DONE
            return 0
        if now != t_key or j != i0:
            return 0  # a later instant: act there in key order (Python syncs, or parks until the clock)
        # The access at the member's own key.
        if status == STOP_HORIZON:
            if ms[m, M_KICK] > now:
                if ms[m, M_GUEST_EV] <= now:
                    return _leave(ms, m, LEAVE_RUN)  # the guest kernel's context switch or fork
                return 0  # parked until the clock gets here (handle_external_interrupt if a kick comes)
            ms[m, M_PHASE] = PH_IRQ
            continue
        if status == STOP_SET_ACCESSED:
            ms[m, M_SYNCED] = j  # nothing acts first now: run it, setting A
            return 0
        if status != STOP_EPT_VIOLATION or g[G_SHADOW]:  # (shadow paging's #PF exits run in Python)
            return _leave(ms, m, LEAVE_PYFAULT)
        gfn = gfns[m, j]
        s = find_slot(slots, gfn)
        if present:  # fast_page_fault, if it will fix the fault; else Python's slow path
            if not writes[m, j] or s < 0 or not slots[s, SL_FAST]:
                return _leave(ms, m, LEAVE_PYFAULT)
            table, idx, level, old = tdp_walk_to(pool.spt, ms[m, M_ROOT], gfn, 1)
            fix, new = fast_pf_fix(old, level, True, slots[s, SL_FAST] == FAST_BITMAP)
            if fix != RET_PF_FIXED:  # spurious, or the slow path: Python takes it
                return _leave(ms, m, LEAVE_PYFAULT)
        elif s < 0 or not slots[s, SL_FAULTIN]:
            return _leave(ms, m, LEAVE_PYFAULT)
        else:
            hidx = slots[s, SL_HOST_OFF] + gfn - slots[s, SL_BASE]
            if moved[hidx] or (g[G_UFFD] and not resident[hidx]):
                return _leave(ms, m, LEAVE_PYFAULT)
        # Room for this fault's records and for those of every other member's fault under way.
        nv = ms.shape[0]
        if g[G_NEV] + 2 * nv > evbuf.shape[0] or g[G_NSRV] + nv > srvbuf.shape[0] or g[G_NSRCU] + nv > srcubuf.shape[0]:
            return GS_FLUSH
        if present and _log_full(pool):
            return GS_FLUSH
        if present:
            bit = gfn - slots[s, SL_BASE] if slots[s, SL_FAST] == FAST_BITMAP else -1
            fast_fault(m, ms, ss, counters, pool, g, c, evbuf, bitmap, gfn, refs, table, idx, level, old, new, bit)
            continue
        fault_begin(m, ms, ss, counters, g, c, resident, evbuf, gfn, writes[m, j], refs, hidx)
        if ms[m, M_PHASE] == PH_LOCK:
            return 0  # mmu_lock is taken at its key
