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

import numpy as np

from vsim.mmu.spte import SPTE_ACCESSED, SPTE_DIRTY
from vsim.requests import (
    IN_GUEST_MODE,
    OUTSIDE_GUEST_MODE,
)
from vsim.sched import At, Proc
from vsim.vcpu.batch import (
    PML_LOG_NR_ENTRIES,
    STOP_DONE,
    STOP_EPT_VIOLATION,
    STOP_HORIZON,
    STOP_PML_FULL,
    STOP_SET_ACCESSED,
    run_accesses,
)
from vsim.vcpu.exits import VcpuExits
from vsim.vcpu.group_state import LEAVE_PYFAULT, NEVER
from vsim.vcpu.tlb import RefTlb, Tlb
from vsim.vcpu.walk import MISCONFIG, walk_2d


class Vcpu(VcpuExits):
    """A vCPU thread: ``KVM_RUN``'s loop over the guest's accesses (``struct kvm_vcpu``'s state is
    ``KvmVcpu``'s, its exits ``VcpuExits``')."""

    # -- KVM_RUN ---------------------------------------------------------------------------------
    def run(self) -> Proc[None]:
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

    def _run_batched(self, gfns: np.ndarray, writes: np.ndarray, pass_end: bool = False) -> Proc[bool]:
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
                why, chunk, i, synced, fault = yield group.join(self, gfns, writes, pass_end, j, synced)
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

    def _run_reference(self, gfns: np.ndarray, writes: np.ndarray, pass_end: bool = False) -> Proc[bool]:
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
            assert self.root is not None
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
            table, idx, _, spte = mmu.walk_last(self.root, g)
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

    def guest_event(self) -> Proc[None]:
        """The guest kernel's scheduled work (context switches, forks): ``ShadowVcpu`` only."""
        raise AssertionError("a guest event without a guest kernel")
        yield
