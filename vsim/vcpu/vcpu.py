"""A vCPU: one SimPy process running its guest workload through ``KVM_RUN``.

The vCPU keeps a local clock ``now`` that may run ahead of ``env.now`` while it executes guest code
that touches only its own state (TLB hits, successful walks). It yields to SimPy only where another
actor could interleave: before it takes ``mmu_lock``, before it installs an SPTE, and when an
access ends in an EPT violation. ``sync()`` skips even those yields when nothing else is queued
before the vCPU's ``(now, priority)`` key (``vsim.sched``). Under the TDP MMU a batched vCPU that
would yield there joins the VM's vCPU group instead (``vsim.vcpu.group``), which runs it with the
other members in compiled code and hands it back where its Python code must go on.

Exit handling follows ``vcpu_enter_guest``/``vmx_handle_exit`` (``vsim.vcpu.exits``): the vCPU
leaves guest mode, the exit handler runs (``handle_ept_violation`` → ``kvm_mmu_page_fault``), and
the vCPU re-enters. The MMU is reached only through ``vm.mmu.page_fault``, so the TDP MMU, the
legacy MMU and shadow paging each supply their own pipeline (``ShadowVcpu`` adds the guest side).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

import numpy as np

from vsim.mmu.shadow_page import ShadowMmu
from vsim.mmu.spte import SPTE_ACCESSED, SPTE_DIRTY
from vsim.requests import (
    IN_GUEST_MODE,
    OUTSIDE_GUEST_MODE,
)
from vsim.sched import VCPU_PRIO_BASE, Actor, At
from vsim.stats import VcpuStat
from vsim.vcpu.batch import (
    PML_LOG_NR_ENTRIES,
    STOP_DONE,
    STOP_EPT_VIOLATION,
    STOP_HORIZON,
    STOP_PML_FULL,
    STOP_SET_ACCESSED,
    run_accesses,
)
from vsim.vcpu.exits import NEVER, VcpuExits
from vsim.vcpu.group_state import LEAVE_PYFAULT
from vsim.vcpu.tlb import RefTlb, Tlb
from vsim.vcpu.vcpu_requests import VcpuRequests
from vsim.vcpu.walk import MISCONFIG, guest_refs_2d, walk_2d
from vsim.vcpu.workloads import Workload

if TYPE_CHECKING:
    from vsim.mmu.tdp_mmu import TdpRoot
    from vsim.vm import Vm


class Vcpu(VcpuExits, VcpuRequests, Actor):
    """``struct kvm_vcpu`` with its run loop."""

    def __init__(self, vm: Vm, vcpu_id: int, workload: Workload) -> None:
        super().__init__(vm.env, VCPU_PRIO_BASE + vcpu_id, vm.cfg.sim.mode == "reference")
        self.vm = vm
        self.id = vcpu_id
        self.mode = OUTSIDE_GUEST_MODE
        self.requests = 0
        self.root: TdpRoot | None = None
        self.workload = workload
        self.stat = VcpuStat()
        t = vm.cfg.tlb
        self.tlb: Tlb | RefTlb = (RefTlb if self.reference else Tlb)(t.entries, t.ways)
        self.counters = np.zeros(4, dtype=np.int64)
        # Completed writes for the invariant checker's dirty-log check (empty when it is off).
        self.written = vm.checker.written if vm.checker is not None else np.zeros(0, dtype=np.uint8)
        self.wbase = vm.region_base_gfn
        # The PML buffer (the VMCS's PML address and index), empty while PML is off.
        self.pml_buf = np.zeros(0, dtype=np.int64)
        self.pml_n = np.zeros(1, dtype=np.int64)
        self.pml_on = False
        # The hardware walk: references besides the walk below the root, and the largest TLB size
        # class (the guest's leaf under EPT; shadow paging caches the shadow leaf's size).
        self.guest_refs = guest_refs_2d(vm.guest_level)
        self.max_class = vm.guest_level - 1
        self.wmap = np.zeros(0, dtype=np.int64)  # access key -> written index (empty: the key is a gfn)
        self.prev_roots: list = []  # shadow paging's cached previous roots
        self.finished_at = -1
        self.last_used_slot = None
        self.last_used_slot_gen = 0
        self.ipis: list[int] = []  # arrival times of IPIs sent to this vCPU, in order
        self.kick_at = NEVER  # the first of them
        self.guest_event_at = NEVER  # the guest kernel's next scheduled action (shadow paging)
        self.nested = 0  # > 0 while the guest kernel runs its own accesses (shadow paging): not the workload's
        self.cur_access = 0  # index in the current stretch of the access being handled
        self.mmio_gfn = -1  # the per-vCPU MMIO cache (vcpu->arch.mmio_gfn / mmio_gen)
        self.mmio_gen = -1
        # Span ids are per vCPU, so allocating one never touches state another vCPU can see.
        self._exit_seq = 0
        self._fault_seq = 0

    def _next_exit_id(self) -> int:
        self._exit_seq += 1
        return self._exit_seq

    def _next_fault_id(self) -> int:
        self._fault_seq += 1
        return self._fault_seq

    def gfn_to_memslot(self, gfn: int):  # type: ignore[no-untyped-def]
        """``kvm_vcpu_gfn_to_memslot``: try the vCPU's ``last_used_slot`` before searching; a new
        memslots generation drops it."""
        slots = self.vm.memslots
        if self.last_used_slot_gen != slots.generation:
            self.last_used_slot = None
            self.last_used_slot_gen = slots.generation
        slot = self.last_used_slot
        if slot is not None and slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
            return slot
        slot = slots.gfn_to_memslot(gfn)
        if slot is not None:
            self.last_used_slot = slot
        return slot

    # -- KVM_RUN ---------------------------------------------------------------------------------
    def run(self) -> Generator[object, object, None]:
        """One ``KVM_RUN`` session: (re)load the MMU, then run the guest until its workload ends.

        A VM may run its vCPUs again with new workloads; a session starts at the current time.
        """
        yield At(self.env, 0, self.prio)
        self.now = self.env.now
        if self.requests:  # made while KVM_RUN was not running (NO_WAKEUP: nobody woke it)
            yield from self.service_requests()
        if self.root is None or self.root.invalid:
            yield from self.kvm_mmu_load()
        self.mode = IN_GUEST_MODE
        step = self._run_reference if self.reference else self._run_batched
        # The workload's chunks; a vCPU group member may go on to the next ones in the group, and a
        # step returns whether the GUEST_SYNC of the chunk it ended in is still due.
        self.chunks = iter(self.workload.chunks())
        for gfns, writes, pass_end in self.chunks:
            pass_end = yield from step(gfns, writes, pass_end)
            if pass_end:
                yield from self.guest_sync()
            ev = self.sync()
            if ev is not None:
                yield ev
        if self.now > self.env.now:
            yield At(self.env, self.now - self.env.now, self.prio)
        # KVM_RUN returns: the vCPU is out of guest mode, and a kick still in flight is taken by
        # the (now idle) CPU as soon as its IPI arrives.
        self.mode = OUTSIDE_GUEST_MODE
        self.ipis.clear()
        self.kick_at = NEVER
        self.fold_counters()
        self.finished_at = self.now

    def kvm_mmu_load(self) -> Generator[object, object, None]:
        """``kvm_mmu_reload`` → ``kvm_mmu_load``: get the shared root of the MMU's role, flush the
        context. Shadow pages are allocated under the write lock, after ``make_mmu_pages_available``
        (``mmu_alloc_direct_roots``, ``mmu_alloc_shadow_roots``); a TDP MMU root is not (vsim
        leaves out the read lock that ``kvm_tdp_mmu_alloc_root`` takes since 6.10)."""
        mmu = self.vm.mmu
        if isinstance(mmu, ShadowMmu):
            yield from mmu.lock_write(self)
            self.now = mmu.make_mmu_pages_available(self.id, self.now)
            self.root = mmu.alloc_vcpu_root(self)
            yield from mmu.unlock_write(self)
        else:
            self.root = mmu.alloc_vcpu_root(self)
        self.tlb.flush()  # flush_tlb_current, called directly: KVM does not count it in tlb_flush
        if self.vm.checker is not None:
            self.vm.checker.on_local_flush(self)

    def _run_batched(
        self, gfns: np.ndarray, writes: np.ndarray, pass_end: bool = False
    ) -> Generator[object, object, bool]:
        tlb = self.tlb
        assert isinstance(tlb, Tlb)
        c = self.vm.costs
        vm = self.vm
        mmu = vm.mmu
        i, n = 0, len(gfns)
        synced = -1  # the access brought to its own instant, whose walk may set A
        group = vm.group
        no_join = -1  # an access whose fault the group handed back to this process
        while i < n:
            assert self.root is not None
            # Run no further than a kick could arrive (an IPI after the VMM's next possible action).
            limit = min(vm.horizon(self), self.kick_at, self.guest_event_at) - self.now
            j, dt, status, refs, present = run_accesses(
                gfns, writes, i, n, limit, mmu.spt, self.root.table, self.guest_refs, self.max_class,
                tlb.tags, tlb.wr, tlb.sets, tlb.ways, tlb.count,
                c.guest_access, c.tlb_hit, c.walk_ref, self.counters, self.written, self.wbase, self.wmap,
                self.pml_buf, self.pml_n, synced,
            )  # fmt: skip
            self.now += dt
            i = j
            if status == STOP_DONE:
                return pass_end
            if group is not None and (
                group.takes_fault(self, gfns.item(j), present, writes.item(j))
                if status == STOP_EPT_VIOLATION and j != no_join
                else (status == STOP_SET_ACCESSED or (status == STOP_HORIZON and self.kick_at > self.now))
                and group.takes_wait(self)
            ):  # fmt: skip
                # Sync by joining the group; it hands the vCPU back where Python must go on.
                why, chunk, i, synced, fault = yield group.join(self, gfns, writes, pass_end, j, synced)  # type: ignore[misc]
                gfns, writes, pass_end = chunk
                n = len(gfns)
                no_join = i if why == LEAVE_PYFAULT else -1
                if fault is not None:
                    yield from self.resume_group_fault(why, fault)
                continue
            if status == STOP_HORIZON and self.kick_at > self.now:
                if self.guest_event_at <= self.now:
                    # Reach the instant first: a kick due by then is taken before the guest's work.
                    ev = self.sync()
                    if ev is not None:
                        yield ev
                        continue
                    yield from self.guest_event()
                    continue
                # Let the clock catch up so the VMM can act (or show it will not yet). Parked in
                # guest mode, this vCPU cannot change shared state before an exit (Vm.horizon).
                ev = At(self.env, self.now - self.env.now, self.prio)
                parked = vm.parked
                parked.add(ev)
                yield ev
                parked.discard(ev)
                continue
            # Reach the exiting access's own instant before handling it: exit handling reads shared
            # state (SPTEs, memslots, host pages). If anything ran meanwhile, look again: another
            # vCPU may have installed the translation since this stretch began.
            ev = self.sync()
            if ev is not None:
                yield ev
                continue
            if status == STOP_SET_ACCESSED:
                synced = j  # nothing else can act first now: run the access, setting A
                continue
            if status == STOP_HORIZON:
                yield from self.handle_external_interrupt()
                continue
            self.cur_access = j
            if status == STOP_EPT_VIOLATION:
                done = yield from self.handle_ept_violation(int(gfns[j]), bool(writes[j]), bool(present), int(refs))
            elif status == STOP_PML_FULL:
                yield from self.handle_pml_full(int(gfns[j]), int(refs))
                done = False
            else:
                done = yield from self.handle_ept_misconfig(int(gfns[j]), bool(writes[j]), int(refs))
            if done:
                i = j + 1
        return pass_end

    def _run_reference(
        self, gfns: np.ndarray, writes: np.ndarray, pass_end: bool = False
    ) -> Generator[object, object, bool]:
        """One SimPy event per access: the plain model the batched path must reproduce exactly."""
        tlb = self.tlb
        assert isinstance(tlb, RefTlb)
        c = self.vm.costs
        mmu = self.vm.mmu
        st = self.counters
        i, n = 0, len(gfns)
        while i < n:
            yield At(self.env, self.now - self.env.now, self.prio)
            if self.kick_at <= self.now:
                yield from self.handle_external_interrupt()
                continue
            if self.guest_event_at <= self.now:
                yield from self.guest_event()
                continue
            g, w = int(gfns[i]), bool(writes[i])
            self.cur_access = i
            if tlb.lookup(g, w):
                self._note_write(g, w)
                self.now += c.guest_access + c.tlb_hit
                st[0] += 1
                st[1] += 1
                i += 1
                continue
            ok, refs, leaf, writable = walk_2d(mmu.spt, self.root.table, g, w, self.guest_refs)
            if not ok:
                if leaf == MISCONFIG:
                    done = yield from self.handle_ept_misconfig(g, w, refs)
                else:
                    done = yield from self.handle_ept_violation(g, w, leaf != 0, refs)
                if done:
                    i += 1
                continue
            set_d = w and writable == 1
            if set_d and self.pml_on:
                # The CPU sets D; with PML on it logs the gpa first, or exits on a full buffer.
                if self.pml_n[0] == PML_LOG_NR_ENTRIES:
                    yield from self.handle_pml_full(g, refs)
                    continue
                self.pml_buf[self.pml_n[0]] = g
                self.pml_n[0] += 1
            # The CPU sets A on the leaf it used (aging may have cleared it), and D for a write.
            table, idx, _, spte = mmu.walk_last(self.root, g)  # type: ignore[arg-type]
            new = spte | SPTE_ACCESSED | (SPTE_DIRTY if set_d else 0)
            if new != spte:
                mmu.spt[table, idx] = new
            if set_d:
                writable = 2
            tlb.insert(min(self.max_class, leaf - 1), g, writable)
            self._note_write(g, w)
            self.now += c.guest_access + refs * c.walk_ref
            st[0] += 1
            st[2] += 1
            st[3] += refs
            i += 1
        return pass_end

    def guest_event(self) -> Generator[object, object, None]:
        """The guest kernel's scheduled work (context switches, forks): ``ShadowVcpu`` only."""
        raise AssertionError("a guest event without a guest kernel")
        yield

    def _note_write(self, key: int, write: bool) -> None:
        k = key - self.wbase
        if not write:
            return
        if len(self.wmap):
            if not 0 <= k < len(self.wmap):
                return
            k = int(self.wmap[k])
        if 0 <= k < len(self.written):
            self.written[k] = 1

    def fold_counters(self) -> None:
        """Copy the compiled code's access counters into the stats (at the end of ``KVM_RUN``, or of a
        run stopped early)."""
        st = self.stat
        ctr = self.counters
        st.accesses, st.tlb_hits, st.hw_walks, st.walk_refs = (int(x) for x in ctr)
