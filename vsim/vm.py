"""The VM (``struct kvm``): memslots, the MMU, ``mmu_lock``, the vCPUs and VM-wide state.

Building a ``Vm`` wires the model together from a validated config; running it is the runner's job.
The MMU-notifier sequence (``mmu_invalidate_seq`` and the in-progress range) lives here as in
``struct kvm``; nothing invalidates in this version, but every fault takes and checks the snapshot
as KVM does.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable

import numpy as np
import simpy

from vsim.config.schema import PAGE_LEVEL, ScenarioConfig, WorkloadConfig
from vsim.events.sink import EventSink
from vsim.guest.kernel import GuestKernel, process_pages
from vsim.guest.memory import GuestMemory
from vsim.guest.paging import REGISTERS, PagingMode, shadow_mmu_init_context
from vsim.host_mm import HostMapping
from vsim.invariants import InvariantChecker
from vsim.memslots import Memslot, Memslots, build_test_memslots
from vsim.mmu.legacy_mmu import LegacyMmu
from vsim.mmu.mmu_lock import MmuLock
from vsim.mmu.shadow_mmu import ShadowPagingMmu
from vsim.mmu.tdp_mmu import TdpMmu
from vsim.mmu_notifier import HostMm
from vsim.sched import SimEnv, VmWideActor
from vsim.selftests.access_tracking_perf import AccessTrackingPerf
from vsim.selftests.demand_paging import DemandPaging
from vsim.selftests.dirty_log_perf import DirtyLogPerf
from vsim.selftests.memstress import MemstressHost
from vsim.srcu import Srcu
from vsim.stats import VmStat
from vsim.userfaultfd import Userfaultfd
from vsim.vcpu.group import VcpuGroup, group_enabled
from vsim.vcpu.kvm_vcpu import KvmVcpu
from vsim.vcpu.shadow_vcpu import ShadowVcpu
from vsim.vcpu.vcpu import NEVER, Vcpu
from vsim.vcpu.workloads import Workload, vcpu_region
from vsim.vmm import DUMMY_SLOT_ID, Vmm

PROGRESS_EVERY_S = 0.25  # how often Vm.run reports progress, in wall seconds


class WallClockTimeout(Exception):
    """A run passed its wall-clock deadline (a sweep point's timeout)."""


# Streams spawned from the root SeedSequence, one per component; new components append here.
STREAM_VCPU_WORKLOADS = 0
STREAM_LATER_WORKLOADS = 1
STREAM_HOST_MM = 2


class Vm:
    """``struct kvm`` for one scenario."""

    def __init__(self, cfg: ScenarioConfig, sink: EventSink | None = None) -> None:
        self.cfg = cfg
        self.costs = cfg.costs
        self.env = SimEnv()
        self.sink = sink if sink is not None else EventSink("off")
        self.sink.clock = lambda: self.env.now
        self.stat = VmStat()
        self.checker = InvariantChecker(self) if cfg.sim.invariants else None
        self.guest_level = PAGE_LEVEL[cfg.guest.page_size]
        nv = cfg.vm.vcpus
        per = cfg.workload.per_vcpu_memory // 4096
        base_gfn = cfg.vm.base_gpa >> 12
        every = build_test_memslots(base_gfn, nv * per, cfg.vm.memslots, PAGE_LEVEL[cfg.vm.backing_page_size])
        absent = set(cfg.vm.absent_memslots)
        self.absent_slots = {s.id: s for s in every.slots if s.id in absent}
        gen0 = cfg.memslots.initial_generation * cfg.memslots.address_spaces
        self.memslots = Memslots([s for s in every.slots if s.id not in absent], generation=gen0)
        self.memslots_settled = True  # no kvm_set_memory_region between publish and settle
        self.srcu = Srcu(self.env, self.sink, self.next_vmm_action)
        self.memslot_update_ns = array("q")
        self.memslot_srcu_ns = array("q")
        self.memslot_zap_ns = array("q")
        self.region_base_gfn = base_gfn
        if cfg.vmm.stress.iterations:
            # The dummy slot: one page just below the test region, with its own host page.
            dummy = HostMapping(pfn_base=1 << 36, npages=1, page_level=1)
            self.absent_slots[DUMMY_SLOT_ID] = Memslot(id=DUMMY_SLOT_ID, base_gfn=base_gfn - 1, npages=1, host=dummy)
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.mmu_invalidate_range_start = 0
        self.mmu_invalidate_range_end = 0
        self.mmu_lock = MmuLock(self.env, self.sink, max_waiters=nv + 16)  # every actor waits at most once
        self.mmu_lock.lockdep = self.checker is not None
        shadow = cfg.mmu.mode == "shadow"
        # Shadow paging: the guest's paging mode, and its kernel (none for a non-paging guest).
        self.guest_mode: PagingMode | None = shadow_mmu_init_context(*REGISTERS[cfg.guest.paging]) if shadow else None
        self.guest: GuestKernel | None = None
        tables = self._estimate_tables(nv * per)
        if self.guest_mode is not None:
            mode = self.guest_mode
            if mode.levels:
                self.guest = GuestKernel(mode, base_gfn, nv * per, nv, cfg.guest.processes,
                                         process_pages(cfg, mode))  # fmt: skip
            mem = self.guest.mem if self.guest is not None else GuestMemory(mode.entries)
            self.mmu: TdpMmu | LegacyMmu = ShadowPagingMmu(self, mode, mem, initial_tables=4 * tables)
        else:
            mmu_class = LegacyMmu if cfg.mmu.mode == "legacy_tdp" else TdpMmu
            self.mmu = mmu_class(self, initial_tables=tables)
        self.uffd = Userfaultfd(self) if cfg.host_mm.uffd else None
        programs: dict[str, Callable[[Vm], MemstressHost]] = {
            "dirty_log_perf": DirtyLogPerf, "access_tracking_perf": AccessTrackingPerf, "demand_paging": DemandPaging,
        }  # fmt: skip
        self.program = programs[cfg.selftest.name](self) if cfg.selftest.name in programs else None
        self.vmm = Vmm(self) if cfg.vmm.ops or cfg.vmm.stress.iterations or self.program else None
        root_seq = np.random.SeedSequence(cfg.seed)
        children = root_seq.spawn(3)
        streams = children[STREAM_VCPU_WORKLOADS].spawn(nv)
        self.host_mm = (
            HostMm(self, np.random.default_rng(children[STREAM_HOST_MM])) if cfg.host_mm.invalidations else None
        )
        # The actors outside the vCPUs that may restrict SPTEs or send IPIs (see horizon).
        self.actors: list[VmWideActor] = [a for a in (self.vmm, self.host_mm) if a is not None]
        self._vmm_started = False
        # Set once vCPUs can restrict SPTEs (see horizon): a legacy MMU that may evict shadow pages
        # from the fault path, or dirty logging that splits huge pages.
        self.lockstep = shadow or (isinstance(self.mmu, LegacyMmu) and self.mmu.zaps_by_vcpus_possible(nv * per))
        self.nr_memslots_dirty_logging = 0  # with PML: memslots whose logging turned PML on
        self.parked: set[object] = set()  # queued wake-ups of vCPUs between stretches of accesses
        self.vcpus = []
        vcpu_class = ShadowVcpu if shadow else Vcpu
        for i in range(nv):
            start, pages = self._region(cfg.workload, i)
            wl = Workload(cfg.workload, start, pages, cfg.sim.batch_accesses, np.random.default_rng(streams[i]))
            self.vcpus.append(vcpu_class(self, i, wl))
        if self.program is not None:
            self.program.set_workloads()
        self.group = VcpuGroup(self) if group_enabled(self) else None

    @property
    def mmu_valid_gen(self) -> int:
        """``kvm->arch.mmu_valid_gen`` (kept by the MMU's shadow pages)."""
        return self.mmu.mmu_valid_gen

    @mmu_valid_gen.setter
    def mmu_valid_gen(self, gen: int) -> None:
        self.mmu.mmu_valid_gen = gen

    def _region(self, cfg: WorkloadConfig, i: int) -> tuple[int, int]:
        """The pages vCPU ``i``'s workload touches: its slice of the test region, or under a paging
        shadow guest the memory of its processes (guest virtual pages)."""
        if self.guest is not None:
            return self.guest.mode.user_base, self.guest.user_pages
        return vcpu_region(cfg, i, self.cfg.vm.vcpus, self.region_base_gfn)

    @staticmethod
    def _estimate_tables(pages: int) -> int:
        return 8 + pages // 512 + pages // (512 * 512)

    # -- requests and kicks (kvm_make_all_cpus_request) ------------------------------------------
    def next_vmm_action(self) -> int:
        """The earliest time the VMM can act again: its wake-up time, or now while it waits on
        something (``NEVER`` without a VMM or once its schedule is done)."""
        vmm = self.vmm
        if vmm is None or vmm.done:
            return NEVER
        return vmm.sleeping_until if vmm.sleeping_until is not None else self.env.now

    def _queue_head_limit(self, prio: int) -> int:
        """The first time at which an actor of priority ``prio`` would sort after the queue's head."""
        q = self.env._queue
        if not q:
            return NEVER
        t, p = q[0][0], q[0][1]
        return t + 1 if prio < p else t

    def _lockstep_limit(self, prio: int) -> int:
        """The queue's bound on a batched vCPU in lockstep mode: each queued actor may act at its
        time, except a vCPU parked in guest mode between two stretches of accesses, which changes
        nothing others read before it exits (``vmexit`` later at the earliest)."""
        q = self.env._queue
        parked = self.parked
        if not q:
            return NEVER
        if q[0][3] not in parked:
            return self._queue_head_limit(prio)
        lookahead = self.costs.vmexit
        if not lookahead:
            return self._queue_head_limit(prio)
        if len(parked) == len(q):  # only parked vCPUs are queued: the earliest acts after an exit
            return q[0][0] + lookahead
        if len(q) > 16:  # a long mixed queue: scanning it would cost more than the lookahead saves
            return self._queue_head_limit(prio)
        h = NEVER
        for t, p, _, ev in q:
            if ev in parked:
                t += lookahead
            elif prio < p:
                t += 1
            if t < h:
                h = t
        return h

    def horizon(self, v: KvmVcpu) -> int:
        """How far vCPU ``v`` may run guest accesses without a sync: every access that starts
        before this time reads SPTEs no other actor can change first.

        Another vCPU only ever adds to the page tables (a walk that meets a missing entry stops and
        syncs), so the bound comes from the VM-wide actors, which may restrict SPTEs or send IPIs:
        the VMM's wake-up time, or the head of the event queue while it waits on others (it can
        only be woken by an action queued there). In lockstep mode vCPUs may restrict SPTEs too
        (huge-page splits and collapses around dirty logging), and the bound is the queue's head.
        """
        if self.lockstep:
            return self._lockstep_limit(v.prio)
        h = NEVER
        for a in self.actors:
            if not a.done:
                h = min(h, a.sleeping_until if a.sleeping_until is not None else self._queue_head_limit(v.prio))
        return h

    def kvm_mmu_invalidate_begin(self, start: int, end: int, actor: int) -> None:
        """``kvm_mmu_invalidate_begin`` + ``_range_add``: the first invalidation resets the range,
        overlapping ones grow it to the union (under the write lock)."""
        self.mmu_lock.lockdep_assert_held(actor, write=True)
        self.mmu_invalidate_in_progress += 1
        if self.mmu_invalidate_in_progress == 1:
            self.mmu_invalidate_range_start, self.mmu_invalidate_range_end = start, end
        else:
            self.mmu_invalidate_range_start = min(self.mmu_invalidate_range_start, start)
            self.mmu_invalidate_range_end = max(self.mmu_invalidate_range_end, end)

    def kvm_mmu_invalidate_end(self, actor: int) -> None:
        """``kvm_mmu_invalidate_end``: bump the sequence, then drop the in-progress count (under the
        write lock)."""
        self.mmu_lock.lockdep_assert_held(actor, write=True)
        self.mmu_invalidate_seq += 1
        self.mmu_invalidate_in_progress -= 1

    def mmu_invalidate_retry_gfn(self, mmu_seq: int, gfn: int) -> bool:
        """``mmu_invalidate_retry_gfn``: an invalidation covers ``gfn`` or finished since the snapshot."""
        if self.mmu_invalidate_in_progress and self.mmu_invalidate_range_start <= gfn < self.mmu_invalidate_range_end:
            return True
        return self.mmu_invalidate_seq != mmu_seq

    def _run_until(self, deadline: float | None, progress: Callable[[int, int], None] | None) -> bool:
        """Step the simulation until it ends (False) or the host's clock passes ``deadline`` (True),
        calling ``progress(simulated ns, accesses so far)`` about four times a wall second."""
        env = self.env
        step = env.step
        clock = time.perf_counter
        report = clock() + PROGRESS_EVERY_S
        try:
            while True:
                # Few steps when a vCPU group runs many faults per event (up to WAKE_BUDGET_S each).
                for _ in range(16):
                    step()
                now = clock()
                if deadline is not None and now > deadline:
                    return True
                if progress is not None and now >= report:
                    report = now + PROGRESS_EVERY_S
                    progress(env.now, sum(int(v.counters[0]) for v in self.vcpus))
        except simpy.core.EmptySchedule:
            return False

    def start(self) -> None:
        """Start a ``KVM_RUN`` session on every vCPU (they first act now, in vCPU order), and the
        VMM's schedule of memslot updates on the first run."""
        if not self._vmm_started:
            self._vmm_started = True
            for a in self.actors:
                self.env.process(a.run())
        for v in self.vcpus:
            v.finished_at = -1
            self.env.process(v.run())

    # -- memslot publication (kvm_swap_active_memslots) ------------------------------------------
    def publish_memslots(self, new: Memslots, generation: int, t: int) -> None:
        """``rcu_assign_pointer(kvm->memslots[as_id], new)`` with its first generation."""
        old = self.memslots.generation
        new.generation = generation
        self.memslots = new
        self.memslots_settled = False
        self._generation_changed(old, generation, t)

    def settle_memslots(self, generation: int, t: int) -> None:
        """The generation after ``synchronize_srcu``; the update is complete."""
        old = self.memslots.generation
        self.memslots.generation = generation
        self.memslots_settled = True
        self._generation_changed(old, generation, t)

    def _generation_changed(self, old: int, new: int, t: int) -> None:
        if self.sink.faults:
            in_progress = new >> 63
            self.sink.emit("vsim_memslots_generation", t, -1, 0, new & ~(1 << 63), in_progress)
        if self.checker is not None:
            self.checker.on_generation(old, new, t)

    def set_workloads(self, cfg: WorkloadConfig) -> None:
        """Give every vCPU a new workload over its same region (for a later :meth:`run`)."""
        nv = len(self.vcpus)
        streams = np.random.SeedSequence(self.cfg.seed).spawn(2)[STREAM_LATER_WORKLOADS].spawn(nv)
        for i, v in enumerate(self.vcpus):
            start, pages = self._region(cfg, i)
            v.workload = Workload(cfg, start, pages, self.cfg.sim.batch_accesses, np.random.default_rng(streams[i]))

    def run(self, wall_deadline: float | None = None, progress: Callable[[int, int], None] | None = None,
            stop_at_deadline: bool = False) -> int:  # fmt: skip
        """Run until every vCPU's workload is done; returns the simulated end time (ns).

        With ``wall_deadline`` (a ``time.perf_counter()`` value), stop once the host's clock
        passes it (checked every 16 events; a vCPU group's wake-up yields to SimPy within
        ``WAKE_BUDGET_S``): raise ``WallClockTimeout``, or with
        ``stop_at_deadline`` end the run there, its stats as they are (``partial`` set; the
        checker's end-of-run checks are skipped), and return the simulated time reached.
        ``progress`` is called with the simulated time and the accesses so far while it runs.
        """
        self.start()
        self.partial = False
        if wall_deadline is None and progress is None:
            self.env.run()
        elif self._run_until(wall_deadline, progress):
            if all(v.finished_at >= 0 for v in self.vcpus):
                self.env.run()  # the workloads are done: what is left is quick
            elif not stop_at_deadline:
                raise WallClockTimeout(f"wall-clock timeout at simulated time {self.env.now} ns")
            else:
                self.partial = True
                for v in self.vcpus:
                    v.fold_counters()  # (the unfinished vCPUs' access counters)
                self.sink.flush()
                return int(self.env.now)
        end = max(v.finished_at for v in self.vcpus)
        if self.checker is not None:
            self.checker.check_end_of_run()
        self.sink.flush()
        return end
