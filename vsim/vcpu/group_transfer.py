"""A vCPU group's state transfer: the model's Python objects to its arrays and back.

Before each run of the compiled loop (``vsim.vcpu.group_kernel``) the driver reads what other actors
may have changed (SRCU, the MMU-notifier sequence, memslots, obsolete roots, lockstep); after
it, it writes back what the rest of the model reads (the members' clocks, modes, requests, IPIs
and stats, SRCU readers) and hands the loop's event rows, service times, SRCU readers and lock
waits on. (``mmu_lock`` is not copied: the loop works on the lock's own arrays.) Functions of the
``VcpuGroup`` they serve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vsim.host_mm import HostMapping
from vsim.memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEMSLOT_INVALID
from vsim.mmu.shadow_page import NO_HEADS, ShadowMmu
from vsim.mmu.spte import PG_LEVEL_4K
from vsim.vcpu import group_state as k
from vsim.vcpu.group_direct import new_slot_lists, slot_lists_append

if TYPE_CHECKING:
    from vsim.vcpu.group import VcpuGroup

NOT_SIMPLE = KVM_MEMSLOT_INVALID | KVM_MEM_LOG_DIRTY_PAGES
# Phases in which a member is inside a fault's exit, under kvm->srcu.
MID_FAULT = (k.PH_LOCK, k.PH_INSTALL, k.PH_ENTRY, k.PH_LOCKWAIT, k.PH_LOCKED, k.PH_UNLOCK)
LEFT_MID_FAULT = (k.LEAVE_LOCK, k.LEAVE_ENTRY, k.LEAVE_LOCKED)  # left, to go on with a fault in Python
NO_RMAP = (NO_HEADS, NO_HEADS, NO_HEADS, 0, -1)  # a slot's rmap where the MMU has none (the TDP MMU)


def read_in(grp: VcpuGroup) -> None:
    """Before a run of the loop: what other actors may have changed since the last one."""
    vm = grp.vm
    g = grp.g
    q = grp.env._queue
    g[k.G_EXT_T], g[k.G_EXT_P] = (q[0][0], q[0][1]) if q else (k.NEVER, 0)
    hz, waiting = k.NEVER, False
    for a in vm.actors:
        if not a.done:
            if a.sleeping_until is not None:
                hz = min(hz, a.sleeping_until)
            else:
                waiting = True
    g[k.G_HZ], g[k.G_EXT_WAITING] = hz, waiting
    srcu = vm.srcu
    g[k.G_SRCU_NEXT] = srcu._next
    g[k.G_SRCU_WAITS] = bool(srcu._waits)
    g[k.G_NEXT_SYNC] = srcu.next_sync()
    g[k.G_MMU_SEQ] = vm.mmu_invalidate_seq
    g[k.G_INV_IN_PROGRESS] = vm.mmu_invalidate_in_progress
    g[k.G_INV_START] = vm.mmu_invalidate_range_start
    g[k.G_INV_END] = vm.mmu_invalidate_range_end
    mmu = vm.mmu
    load_slots(grp)
    g[k.G_LOCKSTEP] = vm.lockstep  # (dirty logging may have begun on a huge-page slot)
    if grp.checker is not None:  # what the checker checks in Python (VcpuGroup._checked)
        for m in np.flatnonzero(grp.ms[:, k.M_PHASE] != k.PH_OUT).tolist():
            if grp._checked(vm.vcpus[m]):
                grp.ms[m, k.M_FLAGS] |= k.F_LEAVE
    if not grp.legacy and any(r.invalid for r in mmu.roots):  # type: ignore[union-attr]  # is_page_fault_stale
        ms = grp.ms
        for m in np.flatnonzero(ms[:, k.M_PHASE] != k.PH_OUT).tolist():
            root = vm.vcpus[m].root
            if root is not None and root.invalid:
                ms[m, k.M_FLAGS] |= k.F_ROOT_INVALID


def load_slots(grp: VcpuGroup) -> None:
    """The current memslots as rows (``group_state.SL_*``), and the dirty bitmap of the first
    dirty-logged one (the loop marks pages dirty there; other logged slots go to Python). For
    the legacy MMU, each row's rmap (as ``ShadowMmu.rmap_args`` gives it) and write-track
    counts, in typed lists."""
    memslots = grp.vm.memslots
    key = (id(memslots), memslots.generation)
    if key == grp._slots_key:
        return
    grp._slots_key = key
    slots = memslots.slots
    host = grp._host if isinstance(grp._host, HostMapping) else None
    rows = []
    rmaps, wtracks = new_slot_lists()
    mmu = grp.vm.mmu
    grp._bitmap_slot = None
    grp._bitmap = np.zeros(0, dtype=np.uint8)
    for s in slots:
        if host is None and s.host.page_level == PG_LEVEL_4K:
            host = s.host
        unlogged = not s.flags & NOT_SIMPLE and s.dirty_bitmap is None
        fast = k.FAST_SLOT if unlogged else 0
        if not fast and grp._bitmap_slot is None and not s.flags & KVM_MEMSLOT_INVALID and s.dirty_bitmap is not None:
            grp._bitmap_slot, grp._bitmap, fast = s, s.dirty_bitmap, k.FAST_BITMAP
        rows.append((s.base_gfn, s.npages, s.host_offset, int(unlogged and s.host is host), fast))
        h4k, h2m, h1g, base, number = mmu.rmap_args(s) if isinstance(mmu, ShadowMmu) else NO_RMAP
        slot_lists_append(rmaps, wtracks, h4k, h2m, h1g, base, number, s.write_track)
    grp._host = host if host is not None else NoHost()  # a stand-in that no row names
    grp.g[k.G_PFN_BASE] = grp._host.pfn_base
    grp.g[k.G_SPAN_SHIFT] = grp._host.span_shift
    grp._slots = np.array(rows, dtype=np.int64).reshape(-1, 5)
    grp._rmaps, grp._wtracks = rmaps, wtracks


def drain(grp: VcpuGroup) -> None:
    """Hand the loop's records to the sink, the service times to the vCPUs, and the SRCU
    readers a synchronize may still need to ``kvm->srcu``."""
    vm = grp.vm
    g = grp.g
    vm.mmu.replay_changes()  # the loop's SPTE changes, to the checker (logged only while it is on)
    n = int(g[k.G_NEV])
    assert n <= len(grp.evbuf) and g[k.G_NSRV] <= len(grp.srvbuf) and g[k.G_NSRCU] <= len(grp.srcubuf)
    if n:
        # Every later record is stamped at or after a member's key or the queue's head.
        ms = grp.ms
        pending = ms[:, k.M_PHASE] != k.PH_OUT
        until = min(int(g[k.G_EXT_T]), int(ms[pending, k.M_NOW].min()) if pending.any() else k.NEVER)
        vm.sink.emit_rows(grp.evbuf[:n], until)
        g[k.G_NEV] = 0
    n = int(g[k.G_NSRV])
    if n:
        vcpus = vm.vcpus
        rows = grp.srvbuf[:n]
        for m in np.unique(rows[:, 0]).tolist():
            vcpus[m].stat.fault_service_ns.frombytes(rows[rows[:, 0] == m, 1].tobytes())
        g[k.G_NSRV] = 0
    n = int(g[k.G_NSRCU])
    if n:
        readers = vm.srcu._readers
        for token, start, end in grp.srcubuf[:n].tolist():
            if end == k.SRCU_FORGET:
                readers.pop(token, None)
            else:
                readers[token] = [start, end]
        g[k.G_NSRCU] = 0
    n = int(g[k.G_NLW])
    if n:
        lock = vm.mmu_lock
        for write, actor, waited in grp.lwbuf[:n].tolist():
            lock.note_wait(bool(write), actor, waited)
        g[k.G_NLW] = 0


def write_out(grp: VcpuGroup) -> None:
    """After a run of the loop: the members' state the rest of the model reads."""
    vm = grp.vm
    g = grp.g
    ms, ss = grp.ms, grp.ss
    readers = vm.srcu._readers
    touched = grp.touched
    idx = np.flatnonzero(touched)
    vcpus = vm.vcpus
    cols = [k.M_NOW, k.M_MODE, k.M_EXIT_SEQ, k.M_FAULT_SEQ, k.M_PHASE, k.M_LEAVE, k.M_SRCU_REG, k.M_REQ, k.M_KICK,
            k.M_IPI_TAKEN]  # fmt: skip
    for m, (now, mode, exit_seq, fault_seq, phase, why, reg, req, kick, taken) in zip(
        idx.tolist(), ms[idx][:, cols].tolist(), strict=True
    ):
        v = vcpus[m]
        v.now = now
        v.mode = mode
        v._exit_seq = exit_seq
        v._fault_seq = fault_seq
        v.requests = req
        v.kick_at = kick
        if taken:
            del v.ipis[:taken]
            ms[m, k.M_IPI_TAKEN] = 0
        mid_fault = phase in MID_FAULT or (phase == k.PH_LEFT and why in (k.LEAVE_LOCK, k.LEAVE_ENTRY, k.LEAVE_LOCKED))
        if mid_fault and not reg:
            # Mid-fault: its SRCU reader is visible to a synchronize, and its slot is kept.
            row = ms[m]
            readers[int(row[k.M_TOKEN])] = [int(row[k.M_TOKEN_T]), -1]
            row[k.M_SRCU_REG] = 1
            grp._fault_slot[m] = vm.memslots.gfn_to_memslot(int(row[k.M_GFN]))
    for m in np.flatnonzero(ss.any(axis=1)).tolist():
        st = vcpus[m].stat
        d = ss[m].tolist()
        st.exits += d[k.S_EXITS]
        st.pf_taken += d[k.S_PF_TAKEN]
        grp.faults += d[k.S_PF_TAKEN]
        grp._gain[m] += d[k.S_PF_TAKEN]
        st.pf_fixed += d[k.S_PF_FIXED]
        st.pf_spurious += d[k.S_PF_SPURIOUS]
        st.pf_retry += d[k.S_PF_RETRY]
        st.host_page_allocs += d[k.S_HOST_ALLOCS]
        st.irq_exits += d[k.S_IRQ_EXITS]
        st.tlb_flush += d[k.S_TLB_FLUSH]
        st.io_exits += d[k.S_IO_EXITS]
        st.pf_fast += d[k.S_PF_FAST]
        ss[m] = 0
    touched[:] = 0
    vm.srcu._next = int(g[k.G_SRCU_NEXT])
    grp._host.populated_pages += int(g[k.G_POPULATED])
    g[k.G_POPULATED] = 0


class NoHost:
    """No 4K host mapping backs any memslot: every fault goes to Python."""

    resident = np.zeros(0, dtype=np.uint8)
    moved = np.zeros(0, dtype=np.uint8)
    new_base = np.zeros(0, dtype=np.int64)
    populated_pages = 0
    pfn_base = 0
    span_shift = 0
