"""vCPUs that run together in compiled code: the driver of ``vsim.vcpu.group_kernel``.

A SimPy event costs more than a whole TDP MMU fault's work, and with many vCPUs faulting at once
nearly every fault would wait for others at its syncs (exit, ``mmu_lock``, install). So a batched
vCPU that would sync joins the VM's group instead: its process waits on an event, and the group
runs every member's accesses and common faults in key order in one compiled loop, woken by a
single SimPy event at the smallest member key. The loop stops at the head of SimPy's queue (the
VMM, the host MM, vCPUs in Python) and at any member that needs Python; that member's process is
resumed at its key with what to do next (``Vcpu._run_batched``).

Between runs of the loop the driver copies the state the rest of the model reads into the Python
objects and reads back what others may have changed (``vsim.vcpu.group_transfer``); requests and
IPIs that other actors send to members reach the loop through ``notify``. It hands members their
next chunks of accesses, and resumes a member's process only where Python must go on.

The group serves all three MMUs in batched mode, with events at most at the ``faults`` level
(``sim.fault_kernel`` turns it off). Under shadow paging it runs the members' accesses, walks,
kicks and flushes; their #PF exits and the guest kernel's work are Python's. ``all``-level
records are Python calls at each SPTE change, which compiled code cannot make. Members queue for
``mmu_lock`` on the lock's own arrays (``MmuLock.lk``/``q``); a release in Python that reaches
one hands it over through ``lock_granted``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
from simpy.events import Event

from vsim.events.rows import KIND_ID, ROW_COLS
from vsim.memslots import KVM_MEMSLOT_INVALID
from vsim.mmu.legacy_mmu import LegacyMmu
from vsim.mmu.page_fault import RET_PF_NAMES
from vsim.mmu.shadow_mmu import ShadowPagingMmu
from vsim.sched import GRANT_PRIO, At
from vsim.vcpu import group_state as k
from vsim.vcpu import group_transfer as xfer
from vsim.vcpu.group_direct import DIRECT_MAP_DESCS, DIRECT_MAP_TABLES, new_slot_lists
from vsim.vcpu.group_kernel import run_group
from vsim.vcpu.group_transfer import NOT_SIMPLE, NoHost

if TYPE_CHECKING:
    from vsim.host_mm import HostMapping
    from vsim.memslots import Memslot
    from vsim.vcpu.vcpu import Vcpu
    from vsim.vm import Vm

NEVER = k.NEVER
WAKE_BUDGET_S = 0.05  # wall seconds one wake-up of the group may run before it yields to SimPy
USEFUL_STAY = 64  # accesses that make a stay in the group worth its join and leave (about two SimPy events)


def group_enabled(vm: Vm) -> bool:
    """The group serves this VM: batched, events at most at ``faults``, EPT A/D bits on (or
    shadow paging)."""
    cfg = vm.cfg
    return (
        cfg.sim.fault_kernel
        and cfg.sim.mode == "batched"
        and (cfg.mmu.ept_ad or cfg.mmu.mode == "shadow")
        and not vm.sink.all
    )


class VcpuGroup:
    """The VM's vCPU group: member state in arrays, and the SimPy wake-ups that run it."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.env = vm.env
        vcpus = vm.vcpus
        nv = len(vcpus)
        self.ms = np.zeros((nv, k.M_COLS), dtype=np.int64)
        self.ms[:, k.M_PRIO] = [v.prio for v in vcpus]
        self.ms[:, k.M_KEYP] = self.ms[:, k.M_PRIO]
        self.ss = np.zeros((nv, k.S_COLS), dtype=np.int64)
        self.touched = np.zeros(nv, dtype=np.int64)  # members the loop ran since the last write-out
        self.left = np.zeros(nv, dtype=np.int64)  # members that left, in key order
        chunk = vm.cfg.sim.batch_accesses
        self.gfns = np.zeros((nv, chunk), dtype=np.int64)
        self.writes = np.zeros((nv, chunk), dtype=np.bool_)
        self._chunk_of: list[object] = [None] * nv  # the chunk arrays loaded in each row
        self._chunk_writes: list[object] = [None] * nv
        # The TLBs and access counters become rows of VM-wide arrays (the vCPUs keep views).
        t0 = vcpus[0].tlb
        self.geo = np.stack([t0.sets, t0.ways])  # the TLBs' sets and ways per size class
        self.tags = np.stack([v.tlb.tags for v in vcpus])  # type: ignore[union-attr]
        self.wr = np.stack([v.tlb.wr for v in vcpus])  # type: ignore[union-attr]
        self.count = np.stack([v.tlb.count for v in vcpus])  # type: ignore[union-attr]
        self.counters = np.stack([v.counters for v in vcpus])
        for m, v in enumerate(vcpus):
            v.tlb.tags, v.tlb.wr, v.tlb.count = self.tags[m], self.wr[m], self.count[m]  # type: ignore[union-attr]
            v.counters = self.counters[m]
        self.g = np.zeros(k.G_COLS, dtype=np.int64)
        g = self.g
        hm = vm.cfg.host_mm
        g[k.G_ROOT_CHECK] = vm.cfg.mmu.stale_root_check
        g[k.G_LOCKED_CHECK] = hm.locked_retry_check
        g[k.G_PRE_LOCK] = hm.pre_lock_retry and bool(hm.invalidations)
        g[k.G_EVENTS] = vm.sink.faults
        g[k.G_UFFD] = vm.uffd is not None
        g[k.G_GUEST_REFS] = vcpus[0].guest_refs
        g[k.G_MAX_CLASS] = vcpus[0].max_class
        g[k.G_PROGRAM] = vm.program is not None
        # The invariant checker sees the loop's SPTE changes through the pool's change log (replayed
        # at each stop) and its completed writes through ``written``; what it checks at a fault or
        # an entry that the loop does not mirror is left to Python (``_checked``).
        self.checker = vm.checker
        g[k.G_CHECKER] = vm.checker is not None
        self._written = vm.checker.written if vm.checker is not None else np.zeros(0, dtype=np.uint8)
        # Each member's map from access keys to ``written`` (``Vcpu.wmap``: a shadow-paged guest
        # process's frames, copied at each join while the checker is on; else empty).
        self.shadow = isinstance(vm.mmu, ShadowPagingMmu)
        g[k.G_SHADOW] = self.shadow
        width = vm.guest.user_pages if self.shadow and vm.checker is not None and vm.guest is not None else 0
        self.wmaps = np.zeros((nv, width), dtype=np.int64)
        mmu = vm.mmu
        self.legacy = isinstance(mmu, LegacyMmu)
        g[k.G_LEGACY] = self.legacy
        self._legacy_arg = True if self.legacy else None  # run_group's own compiled loop for each MMU
        g[k.G_N_MAX] = mmu.n_max_mmu_pages if isinstance(mmu, LegacyMmu) else 0
        c = vm.costs
        costs = (c.guest_access, c.tlb_hit, c.walk_ref, c.vmexit, c.vmentry, c.faultin_present, c.host_fault,
                 c.zero_4k, c.tdp_mmu_map, c.sp_alloc, c.tdp_split_spte, c.tlb_flush, c.userspace_exit,
                 c.fast_page_fault, c.legacy_direct_map, c.prefetch_spte)  # fmt: skip
        self.c = np.array(costs, dtype=np.int64)  # in the order of group_state's C_* indices
        # Event rows (group_state.EV_*): a fault and its outcome, as kvm_mmu_do_page_fault logs them.
        self.evbuf = np.zeros((max(8192, 4 * nv), ROW_COLS), dtype=np.int64)
        g[k.G_EV_KIND + k.EV_PAGE_FAULT] = KIND_ID["kvm_page_fault"]
        g[k.G_EV_KIND + k.EV_PAGE_FAULT_RET] = KIND_ID["vsim_page_fault_ret"]
        for code, name in RET_PF_NAMES.items():
            g[k.G_RET_NAME + code] = vm.sink.codec.intern(name)
        self.srvbuf = np.zeros((max(8192, 2 * nv), 2), dtype=np.int64)
        self.srcubuf = np.zeros((max(1024, 2 * nv), 3), dtype=np.int64)
        self.lwbuf = np.zeros((max(1024, 2 * nv), 3), dtype=np.int64)  # mmu_lock waits (write, actor, ns)
        vm.mmu_lock.grantee = self  # hand-overs from Python to members queued in the loop
        if vm.checker is not None:  # the SPTE change log, replayed whenever a fault might not fit
            vm.mmu.pool.reserve_changes(16 * k.CHG_ROOM)
        self._pml_n = np.zeros(1, dtype=np.int64)
        self._resume: list[Event | None] = [None] * nv
        self._fault_slot: list[object] = [None] * nv  # the memslot each member's fault found
        self._slots_key: tuple[int, int] | None = None
        self._slots = np.zeros((0, 5), dtype=np.int64)  # (group_state.SL_* columns)
        self._host: HostMapping | NoHost = NoHost()  # the 4K host mapping the loop faults in from
        self._bitmap_slot: Memslot | None = None
        self._bitmap = np.zeros(0, dtype=np.uint8)
        self._rmaps, self._wtracks = new_slot_lists()
        self._uffd = vm.uffd
        xfer.load_slots(self)  # picks the 4K host mapping
        self._wakes: list[tuple[int, int]] = []  # keys of the scheduled wake-ups
        self.members = 0
        self.faults = 0  # faults taken in compiled code
        self.accesses = 0  # accesses run in compiled code (counted as members leave)
        self._gain = [0] * nv  # faults each member took in compiled code since it joined
        self._joined_at = [0] * nv  # its access count when it joined
        self._skip = [0] * nv  # stops at which a vCPU does not join (after useless stays)
        self._backoff = [0] * nv
        self.leaves = dict.fromkeys((k.LEAVE_RUN, k.LEAVE_PYFAULT, k.LEAVE_LOCK, k.LEAVE_ENTRY, k.LEAVE_LOCKED), 0)

    # -- joining and leaving -----------------------------------------------------------------------
    def _can_join(self, v: Vcpu) -> bool:
        """Nothing the compiled loop does not model is pending on ``v``, and it runs its workload
        (not the guest kernel's own accesses under shadow paging: ``Vcpu.nested``)."""
        return (
            not v.requests
            and v.kick_at == NEVER
            and not v.pml_on
            and not v.nested
            and v.guest_event_at > v.now
            and not (self.checker is not None and self._checked(v))
        )

    def _checked(self, v: Vcpu) -> bool:
        """With the checker on, ``v`` must act in Python for the checks the loop does not mirror:
        an entry the checker would check (``entry_check_due``), or an obsolete root (the checker
        checks installs into one and entries on one)."""
        assert self.checker is not None
        root = v.root
        return (root is not None and root.invalid) or self.checker.entry_check_due(v)

    def takes_fault(self, v: Vcpu, gfn: int, present: bool, write: bool) -> bool:
        """``v`` joins for a fault on ``gfn`` if the compiled loop can take it (``group_kernel._step``'s
        checks). Not present: a valid slot, not dirty-logged, on the 4K host mapping, its page not
        moved (and, with userfaultfd, resident). Present: a write in a valid slot that is not
        dirty-logged or whose bitmap the loop has (``fast_page_fault`` then gives W back). Shadow
        paging's #PF exits are Python's."""
        if self.shadow:
            return False
        slot = v.gfn_to_memslot(gfn)
        if present:
            xfer.load_slots(self)  # (the dirty-logged slot whose bitmap the loop has, for these memslots)
            return (
                write
                and slot is not None
                and not slot.flags & KVM_MEMSLOT_INVALID
                and (slot.dirty_bitmap is None or slot is self._bitmap_slot)
                and self._can_join(v)
            )
        if slot is None or slot.host is not self._host or slot.flags & NOT_SIMPLE or slot.dirty_bitmap is not None:
            return False
        off = slot.host_offset + gfn - slot.base_gfn
        host = slot.host
        return (self._uffd is None or host.resident.item(off) != 0) and not host.moved.item(off) and self._can_join(v)

    def takes_wait(self, v: Vcpu) -> bool:
        """``v`` joins to wait for the clock or to set an A bit, unless its recent stays ended in a
        fault the loop could not take before it took any (it would likely leave again at once).
        Whether a vCPU joins never changes the results, only the speed."""
        m = v.id
        if self._skip[m]:
            self._skip[m] -= 1
            return False
        return self._can_join(v)

    def join(self, v: Vcpu, gfns: np.ndarray, writes: np.ndarray, pass_end: bool, i: int, synced: int) -> Event:
        """``v`` joins at its clock, about to run access ``i`` of the chunk; the event fires when
        it leaves, with ``(why, (gfns, writes, pass_end), i, synced, fault)``: the chunk it is in
        then (the loop goes on to a vCPU's next chunks itself) and whether its GUEST_SYNC is still
        due (see ``Vcpu._run_batched``)."""
        m = v.id
        self._load_chunk(m, gfns, writes)
        ms = self.ms[m]
        ms[k.M_NOW] = v.now
        ms[k.M_PHASE] = k.PH_RUN
        ms[k.M_I] = i
        ms[k.M_SYNCED] = synced
        ms[k.M_PASS_END] = pass_end
        ms[k.M_AFTER] = k.PH_RUN
        ms[k.M_ROOT] = v.root.table  # type: ignore[union-attr]
        ms[k.M_EXIT_SEQ] = v._exit_seq
        ms[k.M_FAULT_SEQ] = v._fault_seq
        ms[k.M_LEAVE] = 0
        ms[k.M_KEYP] = v.prio
        ms[k.M_FLAGS] = 0
        ms[k.M_MODE] = v.mode
        ms[k.M_REQ] = v.requests
        ms[k.M_KICK] = v.kick_at
        ms[k.M_NIPI] = len(v.ipis)
        ms[k.M_IPI_TAKEN] = 0
        ms[k.M_GUEST_EV] = v.guest_event_at
        ms[k.M_WBASE] = v.wbase
        if self.wmaps.shape[1]:
            self.wmaps[m] = v.wmap  # (the process's frames may have changed while it was out)
        self._gain[m] = 0
        self._joined_at[m] = int(self.counters[m, 0])
        ev = Event(self.env)
        self._resume[m] = ev
        self.members += 1
        self._wake_at(v.now, v.prio)
        return ev

    def _load_chunk(self, m: int, gfns: np.ndarray, writes: np.ndarray) -> None:
        if self._chunk_of[m] is not gfns:
            n = len(gfns)
            self.gfns[m, :n] = gfns
            self.writes[m, :n] = writes
            self._chunk_of[m] = gfns
            self._chunk_writes[m] = writes
        self.ms[m, k.M_N] = len(gfns)

    def _next_chunk(self, m: int) -> None:
        """Member ``m`` finished its chunk (and its pass end's GUEST_SYNC): the next one from its
        workload, as ``Vcpu.run`` would take it; none left, and it leaves to end ``KVM_RUN``."""
        ms = self.ms[m]
        nxt = next(self.vm.vcpus[m].chunks, None)
        if nxt is None:
            ms[k.M_LEAVE] = k.LEAVE_RUN
            ms[k.M_PHASE] = k.PH_LEFT
            self.left[self.g[k.G_NLEFT]] = m
            self.g[k.G_NLEFT] += 1
            return
        gfns, writes, pass_end = nxt
        self._load_chunk(m, gfns, writes)
        ms[k.M_I] = 0
        ms[k.M_SYNCED] = -1
        ms[k.M_PASS_END] = pass_end
        ms[k.M_PHASE] = k.PH_RUN

    def _wake_at(self, t: int, prio: int) -> None:
        """Make sure the group runs by key ``(t, prio)``."""
        key = (t, prio)
        if any(w <= key for w in self._wakes):
            return
        self._wakes.append(key)
        ev = At(self.env, t - self.env.now, prio)
        ev.callbacks.append(lambda _ev, key=key: self._on_wake(key))

    # -- a run of the compiled loop --------------------------------------------------------------
    def _on_wake(self, key: tuple[int, int]) -> None:
        self._wakes.remove(key)
        if not self.members:
            return
        xfer.read_in(self)
        g = self.g
        vm = self.vm
        lock = vm.mmu_lock
        # A long stay yields to SimPy now and then (a wake-up at the next key, as at GS_EXTERNAL),
        # so the run's wall-clock deadline and progress are checked.
        until = time.perf_counter() + WAKE_BUDGET_S
        while True:
            mmu = vm.mmu
            host = self._host
            run_group(self._legacy_arg, self.ms, self.ss, self.touched, self.left, self.gfns, self.writes, self.tags,
                      self.wr, self.geo, self.count, self.counters, mmu.arch.sync(), lock.lk, lock.q, g, self.c,
                      self._slots, self._rmaps, self._wtracks, host.resident, host.moved, host.new_base,
                      self._bitmap, self.evbuf, self.srvbuf, self.srcubuf, self.lwbuf, self._written, self.wmaps,
                      self._pml_n)  # fmt: skip
            xfer.drain(self)
            stop = int(g[k.G_STOP])
            if stop == k.GS_GROW:
                if isinstance(mmu, LegacyMmu):
                    mmu.reserve(DIRECT_MAP_TABLES, DIRECT_MAP_DESCS)
                else:
                    mmu.pool.grow()
            elif stop == k.GS_CHUNK:
                self._next_chunk(int(g[k.G_STOP_M]))
            elif stop != k.GS_FLUSH:
                break
            if time.perf_counter() > until:
                break
        xfer.write_out(self)
        for m in self.left[: g[k.G_NLEFT]].tolist():
            self._leave(m)
        g[k.G_NLEFT] = 0
        if stop == k.GS_GRANT:
            lock.grant(int(g[k.G_GRANT_T]))  # the hand-over the release left to Python
        if self.members:
            self._wake_at(int(g[k.G_NEXT_T]), int(g[k.G_NEXT_P]))

    def lock_granted(self, actor: int, t: int) -> None:
        """``MmuLock.grant`` handed the lock to member ``actor``, queued in the loop: its locked
        section runs at ``(t, GRANT_PRIO)``, where a Python waiter's event would fire."""
        ms = self.ms[actor]
        assert ms[k.M_PHASE] == k.PH_LOCKWAIT
        ms[k.M_NOW] = t
        ms[k.M_KEYP] = GRANT_PRIO
        ms[k.M_PHASE] = k.PH_LOCKED
        self._wake_at(t, GRANT_PRIO)

    def notify(self, v: Vcpu) -> None:
        """Another actor set requests on ``v``, changed its mode or sent it an IPI. A member takes
        one IPI and TLB-flush requests in the loop; anything else makes it leave at its next access
        or entry."""
        row = self.ms[v.id]
        if row[k.M_PHASE] == k.PH_OUT:
            return
        row[k.M_REQ] = v.requests
        row[k.M_KICK] = v.kick_at
        row[k.M_NIPI] = len(v.ipis)
        row[k.M_MODE] = v.mode
        # (With the checker on, flushes go to Python too: it notes each local flush.)
        serviced = k.FLUSH_REQUESTS if self.checker is None else 0
        if v.requests & ~serviced or len(v.ipis) > 1:
            row[k.M_FLAGS] |= k.F_LEAVE

    def _leave(self, m: int) -> None:
        ms = self.ms[m]
        v = self.vm.vcpus[m]
        why = int(ms[k.M_LEAVE])
        self.leaves[why] += 1
        ran = int(self.counters[m, 0]) - self._joined_at[m]
        self.accesses += ran
        useful = self._gain[m] or ran >= USEFUL_STAY
        if why == k.LEAVE_PYFAULT and not useful:
            # A stay that took no fault and ran few accesses before a fault it could not take: wait
            # a few stops before the next (1, 3, 7, ... up to 63 while it keeps happening).
            self._backoff[m] = min(2 * self._backoff[m] + 1, 63)
            self._skip[m] = self._backoff[m]
        else:
            self._backoff[m] = 0
        fault = None
        if why in (k.LEAVE_LOCK, k.LEAVE_ENTRY, k.LEAVE_LOCKED):
            fault = {
                "irq": not ms[k.M_IN_FAULT],
                "gfn": int(ms[k.M_GFN]), "write": bool(ms[k.M_WRITE]), "pfn": int(ms[k.M_PFN]),
                "mmu_seq": int(ms[k.M_MMU_SEQ]), "t_exit": int(ms[k.M_T_EXIT]), "token": int(ms[k.M_TOKEN]),
                "exit_id": int(ms[k.M_EXIT_SEQ]), "id": int(ms[k.M_FAULT_SEQ]), "ret": int(ms[k.M_RET]),
                "slot": self._fault_slot[m],
            }  # fmt: skip
        ms[k.M_PHASE] = k.PH_OUT
        self.members -= 1
        ev = self._resume[m]
        self._resume[m] = None
        ev._ok = True  # type: ignore[union-attr]  # fires at the member's own key
        chunk = (self._chunk_of[m], self._chunk_writes[m], bool(ms[k.M_PASS_END]))
        ev._value = (why, chunk, int(ms[k.M_I]), int(ms[k.M_SYNCED]), fault)  # type: ignore[union-attr]
        # At the member's key: a hand-over of mmu_lock resumes it at GRANT_PRIO, as in Python.
        self.env.schedule(ev, int(ms[k.M_KEYP]), v.now - self.env.now)  # type: ignore[arg-type]
