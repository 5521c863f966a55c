"""The compiled event loop of a vCPU group: many vCPUs' accesses and TDP MMU faults without SimPy.

``run_group`` interleaves the member vCPUs of ``vsim.vcpu.group.VcpuGroup`` in compiled code. Each
member has a next action at a key ``(time, priority)``, exactly where its Python run loop would
sync (``Actor.sync``): the instant of an access that exits, ``mmu_lock`` acquisition, the SPTE
install, and VM entry when ``vcpu_enter_guest`` would sync. The loop always runs the member with the
smallest key, and stops before any key at or after the head of SimPy's queue (the rest of the model:
the VMM, the host MM, vCPUs running in Python), so every action sees the shared state it would see
in a SimPy run. What a Python vCPU does between two syncs, the member does in the same step.

Members run their stretches of accesses with ``run_accesses`` and take the common fault in
compiled code: an EPT violation on a not-present SPTE of a memslot backed by 4K host pages,
``kvm_tdp_mmu_page_fault`` under ``read_lock(mmu_lock)`` (``kvm_faultin_pfn``,
``is_page_fault_stale``, ``kvm_tdp_mmu_map`` with its cmpxchg races, ``RET_PF_RETRY``/``SPURIOUS``),
then VM entry. They also take a kick's IPI (``handle_external_interrupt``) with its TLB-flush
request at entry, and a pass end's ``GUEST_SYNC`` when no selftest program waits for it; the driver
hands them their next chunk of accesses. The code mirrors ``Vcpu.run``/``_run_batched``,
``VcpuExits``, ``VcpuRequests`` and ``TdpMmu.page_fault`` step for step; the equivalence tests hold
the two equal. Everything else makes the member leave the group at a point where its Python code
can go on: before the access (``LEAVE_RUN``), to handle that one fault in Python
(``LEAVE_PYFAULT``), waiting for a contended ``mmu_lock`` (``LEAVE_LOCK``), or at entry with other
requests to service or an SRCU grace period to end (``LEAVE_ENTRY``).
"""

from __future__ import annotations

from numba import njit

from vsim.mmu.spte import (
    ACC_ALL,
    EPT_MT_WB,
    PFN_MASK,
    PT_EXEC,
    PT_PAGE_SIZE,
    PT_PRESENT_R,
    PT_WRITABLE,
    REMOVED_SPTE,
    SPTE_ACCESSED,
    SPTE_DIRTY,
    SPTE_HOST_WRITABLE,
    SPTE_MMU_PRESENT,
    SPTE_MMU_WRITABLE,
)
from vsim.requests import KVM_REQ_TLB_FLUSH, KVM_REQ_TLB_FLUSH_CURRENT
from vsim.vcpu.batch import STOP_DONE, STOP_EPT_VIOLATION, STOP_HORIZON, STOP_SET_ACCESSED, run_accesses
from vsim.vcpu.tlb import EMPTY

NEVER = 1 << 62

# Columns of the member table ``ms`` (one row per vCPU).
M_NOW, M_PRIO, M_PHASE, M_I, M_N, M_SYNCED, M_ROOT, M_FLAGS = 0, 1, 2, 3, 4, 5, 6, 7
M_GFN, M_WRITE, M_T_EXIT, M_TOKEN, M_TOKEN_T, M_SRCU_REG, M_PFN, M_MMU_SEQ = 8, 9, 10, 11, 12, 13, 14, 15
M_TABLE, M_IDX, M_LEVEL, M_OLD, M_TABLE_GEN, M_RET, M_EXIT_SEQ, M_FAULT_SEQ = 16, 17, 18, 19, 20, 21, 22, 23
M_MODE, M_LEAVE, M_REQ, M_KICK, M_NIPI, M_IPI_TAKEN, M_IN_FAULT, M_PASS_END, M_AFTER = range(24, 33)
M_COLS = 33

# Member phases: where its next action is (PH_OUT: not a member).
PH_OUT, PH_RUN, PH_LOCK, PH_INSTALL, PH_ENTRY, PH_DONE, PH_LEFT, PH_IRQ, PH_NEXT = range(9)
# PH_LEFT: left, not yet resumed. PH_IRQ: an IPI arrived in guest mode, to be taken. PH_DONE: the
# chunk's accesses are done (a GUEST_SYNC follows at a pass end). PH_NEXT: the next chunk is due.
# M_FLAGS bits, set by the driver from the vCPU's Python state.
F_LEAVE = 1  # requests other than TLB flushes, a second IPI, or PML: leave at the next access or entry
F_ROOT_INVALID = 2  # the root is obsolete (is_page_fault_stale)
# Why a member left (M_LEAVE).
LEAVE_RUN, LEAVE_PYFAULT, LEAVE_LOCK, LEAVE_ENTRY = 1, 2, 3, 4

# Columns of the per-member stat deltas ``ss``.
(S_EXITS, S_PF_TAKEN, S_PF_FIXED, S_PF_SPURIOUS, S_PF_RETRY, S_HOST_ALLOCS, S_IRQ_EXITS, S_TLB_FLUSH,
 S_IO_EXITS) = range(9)  # fmt: skip
S_COLS = 9

# The VM-wide scalars ``g`` (G_PAGES_4K + level - 1 counts the leaves of each level).
(G_STOP, G_STOP_M, G_EXT_T, G_EXT_P, G_HZ, G_EXT_WAITING, G_NTABLES, G_CAP, G_NFREE, G_READERS, G_LOCK_BUSY,
 G_LOCK_WAITERS, G_LOCK_NEXT_ID, G_ZERO_WAITS, G_SRCU_NEXT, G_SRCU_WAITS, G_NEXT_SYNC, G_TDP_PAGES, G_REFAULTS,
 G_POPULATED, G_MMU_SEQ, G_INV_IN_PROGRESS, G_INV_START, G_INV_END, G_ROOT_CHECK, G_LOCKED_CHECK, G_PRE_LOCK,
 G_ANY_ZAPPED, G_REGION_BASE, G_EVENTS, G_UFFD, G_PFN_BASE, G_GUEST_REFS, G_MAX_CLASS, G_NEV, G_NSRV, G_NSRCU,
 G_GRANT_T, G_NLEFT, G_FREE_LOADED, G_NEXT_T, G_NEXT_P, G_PROGRAM, G_PAGES_4K) = range(44)  # fmt: skip
G_COLS = G_PAGES_4K + 3

# The costs ``c``.
(C_GUEST, C_HIT, C_REF, C_VMEXIT, C_VMENTRY, C_FAULTIN, C_HOST, C_ZERO, C_MAP, C_SP, C_SPLIT, C_TLB_FLUSH,
 C_USERSPACE_EXIT) = range(13)  # fmt: skip
FLUSH_REQUESTS = KVM_REQ_TLB_FLUSH | KVM_REQ_TLB_FLUSH_CURRENT  # the requests the loop services itself

# Why run_group returned (G_STOP).
GS_EXTERNAL = 1  # the next member acts at or after the queue head (or there is none)
GS_LEAVE = 2  # members left the group (``left[:g[G_NLEFT]]``, in key order)
GS_GROW = 3  # an install needs the free tables loaded, or more than the pool has: call again after
GS_FLUSH = 4  # an output buffer is full: drain it and call again
GS_GRANT = 5  # the last reader left mmu_lock with a writer waiting: hand it over at G_GRANT_T
GS_CHUNK = 6  # member G_STOP_M needs its next chunk of accesses (or has none: it leaves)

# Output records.
EV_PAGE_FAULT, EV_PAGE_FAULT_RET = 0, 1
RET_PF_RETRY, RET_PF_FIXED, RET_PF_SPURIOUS = 1, 5, 6
PFERR_WRITE_MASK = 1 << 1
PFERR_GUEST_FINAL_MASK = 1 << 32
SRCU_FORGET = -1  # a srcu output whose reader is simply dropped (registered earlier, ended early)


@njit(cache=True, inline="always")
def _before(t, p, t2, p2):  # type: ignore[no-untyped-def]
    return t < t2 or (t == t2 and p < p2)


@njit(cache=True)
def _horizon(ms, g, m):  # type: ignore[no-untyped-def]
    """``Vm.horizon`` for member ``m``: the VM-wide actors' wake-ups; while one of them waits on
    something, the head of the queue, where the other members are queued too."""
    h = g[G_HZ]
    if g[G_EXT_WAITING]:
        p = ms[m, M_PRIO]
        t = g[G_EXT_T] + (1 if p < g[G_EXT_P] else 0)
        h = min(h, t)
        for k in range(ms.shape[0]):
            if k != m and ms[k, M_PHASE] != PH_OUT:
                h = min(h, ms[k, M_NOW] + (1 if p < ms[k, M_PRIO] else 0))
    return h


@njit(cache=True)
def _retry_gfn(g, mmu_seq, gfn):  # type: ignore[no-untyped-def]
    """``mmu_invalidate_retry_gfn``."""
    if g[G_INV_IN_PROGRESS] and g[G_INV_START] <= gfn < g[G_INV_END]:
        return True
    return g[G_MMU_SEQ] != mmu_seq


@njit(cache=True)
def _find_slot(slots, gfn):  # type: ignore[no-untyped-def]
    for s in range(slots.shape[0]):
        if slots[s, 0] <= gfn < slots[s, 0] + slots[s, 1]:
            return s
    return -1


@njit(cache=True)
def run_group(ms, ss, touched, left, gfns, writes, tags, wr, sets, ways, count, counters, spt, sp_level, sp_gfn,
              sp_gen, free, g, c, slots, resident, moved, zapped, evbuf, srvbuf, srcubuf, written, wmap, pml_buf,
              pml_n):  # type: ignore[no-untyped-def]  # fmt: skip
    """Run the members in key order until one leaves or the next key reaches the queue head.

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
        if g[G_NLEFT] and not _leaves_now(ms, g, m):
            g[G_STOP] = GS_LEAVE  # the members that left act in Python first
            return
        touched[m] = 1
        r = _step(m, ms, ss, gfns, writes, tags, wr, sets, ways, count, counters, spt, sp_level, sp_gfn,
                  sp_gen, free, g, c, slots, resident, moved, zapped, evbuf, srvbuf, srcubuf, written, wmap,
                  pml_buf, pml_n)  # fmt: skip
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
def _next_member(ms, g):  # type: ignore[no-untyped-def]
    """The member with the smallest key (-1 if none); its key goes to ``g[G_NEXT_T/P]``."""
    m = -1
    bt = NEVER
    bp = 0
    for k in range(ms.shape[0]):
        ph = ms[k, M_PHASE]
        if ph != PH_OUT and ph != PH_LEFT and (m < 0 or _before(ms[k, M_NOW], ms[k, M_PRIO], bt, bp)):
            m = k
            bt = ms[k, M_NOW]
            bp = ms[k, M_PRIO]
    g[G_NEXT_T] = bt
    g[G_NEXT_P] = bp
    return m


@njit(cache=True)
def _leaves_now(ms, g, m):  # type: ignore[no-untyped-def]
    """Member ``m``'s next action is to leave, touching nothing (``_step``'s first checks)."""
    ph = ms[m, M_PHASE]
    if ph == PH_DONE:
        return ms[m, M_PASS_END] != 0 and _gsync_in_python(ms, g, m)
    if ph == PH_RUN and ms[m, M_FLAGS] & F_LEAVE:
        return True
    if ph == PH_LOCK:
        return g[G_LOCK_BUSY] != 0
    return ph == PH_ENTRY and (ms[m, M_FLAGS] & F_LEAVE or g[G_SRCU_WAITS] != 0)


@njit(cache=True)
def _gsync_in_python(ms, g, m):  # type: ignore[no-untyped-def]
    """A pass end's GUEST_SYNC goes to Python: a selftest program takes it, or a kick or other
    requests are due first."""
    return g[G_PROGRAM] != 0 or ms[m, M_KICK] <= ms[m, M_NOW] or ms[m, M_FLAGS] & F_LEAVE != 0


@njit(cache=True)
def _leave(ms, m, why):  # type: ignore[no-untyped-def]
    ms[m, M_LEAVE] = why
    return GS_LEAVE


@njit(cache=True)
def _step(m, ms, ss, gfns, writes, tags, wr, sets, ways, count, counters, spt, sp_level, sp_gfn, sp_gen, free,
          g, c, slots, resident, moved, zapped, evbuf, srvbuf, srcubuf, written, wmap, pml_buf, pml_n):  # type: ignore[no-untyped-def]  # fmt: skip
    """Member ``m``'s action at its key, and what follows it up to its next sync (``t_key``: while
    the member's clock is still there, nothing can have acted first)."""
    t_key = ms[m, M_NOW]
    while True:
        phase = ms[m, M_PHASE]
        if phase == PH_DONE:  # Vcpu.run: GUEST_SYNC at a pass end, then the next chunk
            if ms[m, M_PASS_END]:
                if _gsync_in_python(ms, g, m):
                    return _leave(ms, m, LEAVE_RUN)
                if g[G_NSRCU] + ms.shape[0] + 1 > srcubuf.shape[0]:
                    return GS_FLUSH
                _guest_sync(m, ms, ss, g, c, srcubuf)
                continue
            ms[m, M_PHASE] = PH_NEXT
            continue
        if phase == PH_NEXT:
            return GS_CHUNK if ms[m, M_NOW] == t_key else 0  # after Vcpu.run's sync
        if phase == PH_LOCK:
            if g[G_LOCK_BUSY]:  # a writer holds or waits for mmu_lock: the member waits in Python
                return _leave(ms, m, LEAVE_LOCK)
            _fault_lock(m, ms, ss, spt, sp_gen, g, c, evbuf)
            if ms[m, M_PHASE] == PH_INSTALL:
                return 0  # the install waits for its key
            continue
        if phase == PH_INSTALL:
            need = ms[m, M_LEVEL] - 1 if ms[m, M_OLD] != REMOVED_SPTE else 0
            if need and (need > g[G_NFREE] + g[G_CAP] - g[G_NTABLES] or (g[G_NFREE] and not g[G_FREE_LOADED])):
                return GS_GROW
            r = _fault_install(m, ms, ss, spt, sp_level, sp_gfn, sp_gen, free, g, zapped, evbuf)
            if r:
                return r
            continue
        if phase == PH_IRQ:
            _irq_exit(m, ms, ss, g, c)
            continue
        if phase == PH_ENTRY:
            # vcpu_enter_guest: requests are serviced at a synced instant; Python goes on if some
            # need it (or an SRCU grace period waits for this reader).
            if ms[m, M_FLAGS] & F_LEAVE or g[G_SRCU_WAITS]:
                return _leave(ms, m, LEAVE_ENTRY) if ms[m, M_NOW] == t_key else 0
            while True:
                if (ms[m, M_REQ] or ms[m, M_NOW] >= _horizon(ms, g, m)) and ms[m, M_NOW] != t_key:
                    return 0
                if not ms[m, M_REQ]:
                    break
                _service_flush(m, ms, ss, c, tags, wr, count)
            _entry(m, ms, g, c, srvbuf, srcubuf)
            continue
        # Guest accesses (PH_RUN): a stretch, then its stop.
        now0 = ms[m, M_NOW]
        if ms[m, M_FLAGS] & F_LEAVE:
            return _leave(ms, m, LEAVE_RUN) if now0 == t_key else 0
        i0 = ms[m, M_I]
        limit = min(_horizon(ms, g, m), ms[m, M_KICK]) - now0
        j, dt, status, refs, present = run_accesses(
            gfns[m], writes[m], i0, ms[m, M_N], limit, spt, ms[m, M_ROOT], g[G_GUEST_REFS], g[G_MAX_CLASS],
            tags[m], wr[m], sets, ways, count[m], c[C_GUEST], c[C_HIT], c[C_REF], counters[m], written,
            g[G_REGION_BASE], wmap, pml_buf, pml_n, ms[m, M_SYNCED],
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
                return 0  # parked until the clock gets here (handle_external_interrupt if a kick comes)
            ms[m, M_PHASE] = PH_IRQ
            continue
        if status == STOP_SET_ACCESSED:
            ms[m, M_SYNCED] = j  # nothing acts first now: run it, setting A
            return 0
        if status != STOP_EPT_VIOLATION or present:
            return _leave(ms, m, LEAVE_PYFAULT)
        gfn = gfns[m, j]
        s = _find_slot(slots, gfn)
        if s < 0 or not slots[s, 3]:
            return _leave(ms, m, LEAVE_PYFAULT)
        hidx = slots[s, 2] + gfn - slots[s, 0]
        if moved[hidx] or (g[G_UFFD] and not resident[hidx]):
            return _leave(ms, m, LEAVE_PYFAULT)
        # Room for this fault's records and for those of every other member's fault under way.
        nv = ms.shape[0]
        if g[G_NEV] + 2 * nv > evbuf.shape[0] or g[G_NSRV] + nv > srvbuf.shape[0] or g[G_NSRCU] + nv > srcubuf.shape[0]:
            return GS_FLUSH
        _fault_begin(m, ms, ss, counters, g, c, resident, evbuf, gfn, writes[m, j], refs, hidx)
        if ms[m, M_PHASE] == PH_LOCK:
            return 0  # mmu_lock is taken at its key


@njit(cache=True)
def _guest_sync(m, ms, ss, g, c, srcubuf):  # type: ignore[no-untyped-def]
    """``VcpuExits.guest_sync`` with no selftest program: the ucall's port I/O exits to userspace
    (``KVM_EXIT_IO``), ``KVM_RUN`` returns and is called again; entry and the next chunk follow."""
    now = ms[m, M_NOW]
    ms[m, M_MODE] = 0  # OUTSIDE_GUEST_MODE
    ss[m, S_EXITS] += 1
    ms[m, M_EXIT_SEQ] += 1
    g[G_SRCU_NEXT] += 1  # srcu_read_lock at the exit ...
    token = g[G_SRCU_NEXT]
    now += c[C_VMEXIT]
    ss[m, S_IO_EXITS] += 1
    if now >= g[G_NEXT_SYNC]:  # ... and its unlock as KVM_RUN returns
        k = g[G_NSRCU]
        srcubuf[k, 0] = token
        srcubuf[k, 1] = ms[m, M_NOW]
        srcubuf[k, 2] = now
        g[G_NSRCU] = k + 1
    now += c[C_USERSPACE_EXIT]
    g[G_SRCU_NEXT] += 1  # KVM_RUN again: vcpu_enter_guest under a new read side
    ms[m, M_TOKEN] = g[G_SRCU_NEXT]
    ms[m, M_TOKEN_T] = now
    ms[m, M_SRCU_REG] = 0
    ms[m, M_IN_FAULT] = 0
    ms[m, M_PASS_END] = 0  # this pass's sync is done
    ms[m, M_NOW] = now
    ms[m, M_PHASE] = PH_ENTRY
    ms[m, M_AFTER] = PH_NEXT


@njit(cache=True)
def _irq_exit(m, ms, ss, g, c):  # type: ignore[no-untyped-def]
    """``handle_external_interrupt``: the kick's IPI arrives in guest mode; exit (``EXTERNAL_INTERRUPT``,
    under ``kvm->srcu``) and acknowledge it; entry comes next."""
    now = max(ms[m, M_NOW], ms[m, M_KICK])
    ms[m, M_MODE] = 0  # OUTSIDE_GUEST_MODE
    ss[m, S_EXITS] += 1
    ms[m, M_EXIT_SEQ] += 1
    g[G_SRCU_NEXT] += 1
    ms[m, M_TOKEN] = g[G_SRCU_NEXT]
    ms[m, M_TOKEN_T] = now
    ms[m, M_SRCU_REG] = 0
    ms[m, M_T_EXIT] = now
    ms[m, M_IN_FAULT] = 0
    ms[m, M_NOW] = now + c[C_VMEXIT]
    ss[m, S_IRQ_EXITS] += 1
    ms[m, M_PHASE] = PH_ENTRY


@njit(cache=True)
def _service_flush(m, ms, ss, c, tags, wr, count):  # type: ignore[no-untyped-def]
    """``vcpu_enter_guest``'s ``KVM_REQ_TLB_FLUSH`` (``kvm_vcpu_flush_tlb_all``) or
    ``KVM_REQ_TLB_FLUSH_CURRENT``: this vCPU's TLB empties (the only requests pending)."""
    req = ms[m, M_REQ]
    ms[m, M_REQ] = 0
    if req & KVM_REQ_TLB_FLUSH:
        ss[m, S_TLB_FLUSH] += 1
    tags[m, :, :, :] = EMPTY
    wr[m, :, :, :] = 0
    count[m, :] = 0
    ms[m, M_NOW] += c[C_TLB_FLUSH]


@njit(cache=True)
def _fault_begin(m, ms, ss, counters, g, c, resident, evbuf, gfn, write, refs, hidx):  # type: ignore[no-untyped-def]
    """``VcpuExits._exit`` + ``kvm_mmu_do_page_fault`` + ``kvm_faultin_pfn``, up to ``mmu_lock``."""
    now = ms[m, M_NOW]
    counters[m, 2] += 1
    counters[m, 3] += refs
    t_exit = now + refs * c[C_REF]
    ms[m, M_MODE] = 0  # OUTSIDE_GUEST_MODE
    ss[m, S_EXITS] += 1
    ms[m, M_EXIT_SEQ] += 1
    g[G_SRCU_NEXT] += 1  # srcu_read_lock from the exit on
    ms[m, M_TOKEN] = g[G_SRCU_NEXT]
    ms[m, M_TOKEN_T] = now
    ms[m, M_SRCU_REG] = 0
    now = t_exit + c[C_VMEXIT]
    ms[m, M_T_EXIT] = t_exit
    ms[m, M_IN_FAULT] = 1
    ms[m, M_FAULT_SEQ] += 1
    ms[m, M_GFN] = gfn
    ms[m, M_WRITE] = 1 if write else 0
    ss[m, S_PF_TAKEN] += 1
    if g[G_EVENTS]:
        _event(g, evbuf, EV_PAGE_FAULT, now, m, ms[m, M_FAULT_SEQ], gfn << 12,
               PFERR_GUEST_FINAL_MASK | (PFERR_WRITE_MASK if write else 0))  # fmt: skip
    # kvm_faultin_pfn (fast_page_fault cannot serve a not-present fault with A/D bits on).
    seq = g[G_MMU_SEQ]
    ms[m, M_MMU_SEQ] = seq
    now += c[C_FAULTIN]
    ms[m, M_NOW] = now
    if g[G_PRE_LOCK] and _retry_gfn(g, seq, gfn):
        _fault_end(m, ms, ss, g, evbuf, RET_PF_RETRY)
        return
    if not resident[hidx]:  # first touch: the host allocates and zeroes the 4K page
        resident[hidx] = 1
        g[G_POPULATED] += 1
        now += c[C_HOST] + c[C_ZERO]
        ss[m, S_HOST_ALLOCS] += 1
        ms[m, M_NOW] = now
    ms[m, M_PFN] = g[G_PFN_BASE] + hidx
    if g[G_PRE_LOCK] and _retry_gfn(g, seq, gfn):
        _fault_end(m, ms, ss, g, evbuf, RET_PF_RETRY)
        return
    ms[m, M_PHASE] = PH_LOCK


@njit(cache=True)
def _fault_lock(m, ms, ss, spt, sp_gen, g, c, evbuf):  # type: ignore[no-untyped-def]
    """``read_lock(mmu_lock)`` (uncontended), ``is_page_fault_stale``, then ``kvm_tdp_mmu_map``'s
    walk and map work, up to the install."""
    g[G_LOCK_NEXT_ID] += 1
    g[G_READERS] += 1
    g[G_ZERO_WAITS] += 1
    gfn = ms[m, M_GFN]
    stale = g[G_ROOT_CHECK] and ms[m, M_FLAGS] & F_ROOT_INVALID
    if stale or (g[G_LOCKED_CHECK] and _retry_gfn(g, ms[m, M_MMU_SEQ], gfn)):
        g[G_READERS] -= 1  # no writer waits (G_LOCK_BUSY): no hand-over
        _fault_end(m, ms, ss, g, evbuf, RET_PF_RETRY)
        return
    table = ms[m, M_ROOT]
    level = 4
    while True:  # walk_to(root, gfn, PG_LEVEL_4K)
        idx = (gfn >> (9 * (level - 1))) & 511
        old = spt[table, idx]
        if level == 1 or not (old & SPTE_MMU_PRESENT) or old == REMOVED_SPTE or old & PT_PAGE_SIZE:
            break
        table = (old & PFN_MASK) >> 12
        level -= 1
    ms[m, M_TABLE] = table
    ms[m, M_IDX] = idx
    ms[m, M_LEVEL] = level
    ms[m, M_OLD] = old
    ms[m, M_TABLE_GEN] = sp_gen[table]
    new_tables = level - 1 if level > 1 and old != REMOVED_SPTE else 0
    ms[m, M_NOW] += c[C_MAP] + c[C_SP] * new_tables
    if new_tables and old & SPTE_MMU_PRESENT:  # splitting a huge leaf fills each new table
        ms[m, M_NOW] += c[C_SPLIT] * 512 * new_tables
    ms[m, M_PHASE] = PH_INSTALL


@njit(cache=True)
def _fault_install(m, ms, ss, spt, sp_level, sp_gfn, sp_gen, free, g, zapped, evbuf):  # type: ignore[no-untyped-def]
    """The cmpxchg half of ``kvm_tdp_mmu_map`` (``TdpMmu._map_install``), then ``read_unlock``."""
    table = ms[m, M_TABLE]
    idx = ms[m, M_IDX]
    level = ms[m, M_LEVEL]
    old = ms[m, M_OLD]
    gfn = ms[m, M_GFN]
    ret = RET_PF_FIXED
    if sp_gen[table] != ms[m, M_TABLE_GEN] or old == REMOVED_SPTE:
        ret = RET_PF_RETRY
    else:
        while level > 1:
            if spt[table, idx] != old:
                ret = RET_PF_RETRY
                break
            base = gfn & ~((1 << (9 * (level - 1))) - 1)
            if g[G_NFREE]:  # alloc_sp: a freed table first
                g[G_NFREE] -= 1
                child = free[g[G_NFREE]]
                sp_gen[child] += 1
            else:
                child = g[G_NTABLES]
                g[G_NTABLES] += 1
            sp_level[child] = level - 1
            sp_gfn[child] = base
            g[G_TDP_PAGES] += 1
            if _is_leaf(old, level):  # tdp_mmu_split_huge_page fills the child first
                for k in range(512):
                    spt[child, k] = _split_spte(old, level, k)
                g[G_PAGES_4K + level - 2] += 512
                g[G_PAGES_4K + level - 1] -= 1  # handle_changed_spte: the huge leaf goes
            spt[table, idx] = SPTE_MMU_PRESENT | ACC_ALL | SPTE_ACCESSED | (child << 12)  # make_nonleaf_spte
            table = child
            level -= 1
            idx = (gfn >> (9 * (level - 1))) & 511
            old = spt[table, idx]
        if ret == RET_PF_FIXED:
            # make_spte for a writable 4K page
            new = (SPTE_MMU_PRESENT | PT_PRESENT_R | PT_EXEC | EPT_MT_WB | (ms[m, M_PFN] << 12) | SPTE_ACCESSED
                   | SPTE_HOST_WRITABLE | SPTE_MMU_WRITABLE | PT_WRITABLE | SPTE_DIRTY)  # fmt: skip
            if new == old:
                ret = RET_PF_SPURIOUS
            elif spt[table, idx] != old:
                ret = RET_PF_RETRY
            else:
                spt[table, idx] = new
                if not _is_leaf(old, 1):  # handle_changed_spte: a new 4K leaf
                    g[G_PAGES_4K] += 1
                if g[G_ANY_ZAPPED]:  # Vm.note_mapped: a refault of a zapped gfn
                    lo = gfn - g[G_REGION_BASE]
                    if 0 <= lo < zapped.shape[0] and zapped[lo]:
                        g[G_REFAULTS] += 1
                        zapped[lo] = False
    now = ms[m, M_NOW]
    g[G_READERS] -= 1
    _fault_end(m, ms, ss, g, evbuf, ret)
    if g[G_READERS] == 0 and g[G_LOCK_WAITERS]:
        g[G_GRANT_T] = now
        return GS_GRANT
    return 0


@njit(cache=True)
def _fault_end(m, ms, ss, g, evbuf, ret):  # type: ignore[no-untyped-def]
    """``kvm_mmu_do_page_fault``'s outcome count and tracepoint; the member goes on to entry."""
    if ret == RET_PF_FIXED:
        ss[m, S_PF_FIXED] += 1
    elif ret == RET_PF_SPURIOUS:
        ss[m, S_PF_SPURIOUS] += 1
    else:
        ss[m, S_PF_RETRY] += 1
    ms[m, M_RET] = ret
    if g[G_EVENTS]:
        _event(g, evbuf, EV_PAGE_FAULT_RET, ms[m, M_NOW], m, ms[m, M_FAULT_SEQ], ret, 1)
    ms[m, M_PHASE] = PH_ENTRY


@njit(cache=True)
def _entry(m, ms, g, c, srvbuf, srcubuf):  # type: ignore[no-untyped-def]
    """``vcpu_enter_guest`` with no request pending: ``srcu_read_unlock``, the IPIs taken in the host,
    VM entry, and a fault's service time."""
    now = ms[m, M_NOW]
    if now >= g[G_NEXT_SYNC] or ms[m, M_SRCU_REG]:
        # A synchronize_srcu may still need this reader (or the driver registered it): report it.
        k = g[G_NSRCU]
        srcubuf[k, 0] = ms[m, M_TOKEN]
        srcubuf[k, 1] = ms[m, M_TOKEN_T]
        srcubuf[k, 2] = now if now >= g[G_NEXT_SYNC] else SRCU_FORGET
        g[G_NSRCU] = k + 1
    if ms[m, M_NIPI] and ms[m, M_KICK] <= now:  # an IPI that arrived in the host ran its handler there
        ms[m, M_NIPI] -= 1
        ms[m, M_IPI_TAKEN] += 1
        ms[m, M_KICK] = NEVER  # (a second pending IPI makes the member leave: F_LEAVE)
    now += c[C_VMENTRY]
    ms[m, M_NOW] = now
    ms[m, M_MODE] = 1  # IN_GUEST_MODE
    if ms[m, M_IN_FAULT]:
        k = g[G_NSRV]
        srvbuf[k, 0] = m
        srvbuf[k, 1] = now - ms[m, M_T_EXIT]
        g[G_NSRV] = k + 1
    ms[m, M_PHASE] = ms[m, M_AFTER]
    ms[m, M_AFTER] = PH_RUN


@njit(cache=True, inline="always")
def _is_leaf(spte, level):  # type: ignore[no-untyped-def]
    """A present leaf at ``level`` (``is_shadow_present_pte`` and ``is_last_spte``)."""
    return spte & SPTE_MMU_PRESENT and spte != REMOVED_SPTE and (level == 1 or spte & PT_PAGE_SIZE)


@njit(cache=True, inline="always")
def _split_spte(huge, level, k):  # type: ignore[no-untyped-def]
    """``make_huge_page_split_spte``: child ``k`` of a huge leaf at ``level``."""
    pfn = ((huge & PFN_MASK) >> 12) + k * (1 << (9 * (level - 2)))
    spte = (huge & ~PFN_MASK) | (pfn << 12)
    if level == 2:
        spte &= ~PT_PAGE_SIZE
    return spte


@njit(cache=True, inline="always")
def _event(g, evbuf, kind, t, m, fid, a, b):  # type: ignore[no-untyped-def]
    k = g[G_NEV]
    evbuf[k, 0] = kind
    evbuf[k, 1] = t
    evbuf[k, 2] = m
    evbuf[k, 3] = fid
    evbuf[k, 4] = a
    evbuf[k, 5] = b
    g[G_NEV] = k + 1
