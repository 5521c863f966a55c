"""VM exits and their handlers (``vmx_handle_exit``), and VM entry (``vcpu_enter_guest``).

An exit leaves guest mode and enters KVM under ``kvm->srcu``; the handler runs (an EPT violation
goes to ``kvm_mmu_page_fault``, a misconfiguration to ``handle_mmio_page_fault``, a kick's IPI is
acknowledged, a full PML buffer drained, a ``GUEST_SYNC`` goes out to userspace); entry services
the pending requests, drops SRCU and publishes ``IN_GUEST_MODE``. Mixed into ``Vcpu``.
"""

from __future__ import annotations

from vsim.memslots import KVM_MEMSLOT_INVALID
from vsim.mmu.mmio import handle_mmio_page_fault
from vsim.mmu.page_fault import (
    PFERR_RSVD_MASK,
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_INVALID,
    RET_PF_NAMES,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    KvmPageFault,
    ept_violation_error_code,
)
from vsim.requests import IN_GUEST_MODE, OUTSIDE_GUEST_MODE
from vsim.sched import Proc
from vsim.vcpu.group_state import LEAVE_LOCK, LEAVE_LOCKED, NEVER
from vsim.vcpu.vcpu_requests import VcpuRequests

EXIT_REASON_EPT_VIOLATION = "EPT_VIOLATION"
EXIT_REASON_EPT_MISCONFIG = "EPT_MISCONFIG"
EXIT_REASON_EXTERNAL_INTERRUPT = "EXTERNAL_INTERRUPT"
EXIT_REASON_PML_FULL = "PML_FULL"
EXIT_REASON_IO_INSTRUCTION = "IO_INSTRUCTION"


class VcpuExits(VcpuRequests):
    """The exit and entry side of ``Vcpu``."""

    def _exit(self, reason: str, gfn: int, refs: int) -> tuple[int, int, int]:
        """VM exit at the end of a walk of ``refs`` references: leave guest mode, enter KVM under
        ``kvm->srcu``. Returns ``(exit_id, t_exit, srcu_token)``."""
        vm = self.vm
        if self.pml_on and self.pml_n[0]:
            self.kvm_flush_pml_buffer()
        if refs:  # the walk that ended in the EPT violation or misconfiguration
            self.counters[2] += 1
            self.counters[3] += refs
        t_exit = self.now + refs * vm.costs.walk_ref
        self.mode = OUTSIDE_GUEST_MODE
        self.stat.exits += 1
        exit_id = self._next_exit_id()
        if vm.sink.all:
            vm.sink.emit("kvm_exit", t_exit, self.id, exit_id, reason, gfn << 12)
        # The read side covers the whole exit: its memslot reads are evaluated from the exit on.
        token = vm.srcu.read_lock(self.now)
        self.now = t_exit + vm.costs.vmexit
        return exit_id, t_exit, token

    def _reenter(self, exit_id: int, token: int) -> Proc[None]:
        """``vcpu_enter_guest``: service pending requests, drop ``kvm->srcu``, enter the guest.

        Entry publishes ``IN_GUEST_MODE`` and then reads the requests, so it happens at a synced
        instant whenever another actor could make a request or send an IPI before it."""
        while True:
            if self.requests or self.now >= self.vm.horizon(self):
                ev = self.sync()
                if ev is not None:
                    yield ev
            if not self.requests:
                break
            # kvm_vcpu_exit_request: a request made while these were serviced (say, a fast zap
            # while waiting for mmu_lock) is handled before entry too.
            yield from self.service_requests()
        self.vm.srcu.read_unlock(token, self.now)
        self.enter_guest(exit_id)

    def handle_pml_full(self, gfn: int, refs: int) -> Proc[None]:
        """A PML-full exit: the buffer is drained at the exit, and the write is retried."""
        exit_id, _, token = self._exit(EXIT_REASON_PML_FULL, gfn, refs)
        self.stat.pml_full_exits += 1
        yield from self._reenter(exit_id, token)

    def handle_external_interrupt(self) -> Proc[None]:
        """The kick's IPI arrives: exit (``EXTERNAL_INTERRUPT``), acknowledge it, re-enter."""
        self.now = max(self.now, self.kick_at)
        exit_id, _, token = self._exit(EXIT_REASON_EXTERNAL_INTERRUPT, 0, 0)  # acknowledges the kick
        self.stat.irq_exits += 1
        yield from self._reenter(exit_id, token)

    def handle_ept_violation(self, gfn: int, write: bool, present: bool, refs: int) -> Proc[bool]:
        """``handle_ept_violation`` → ``kvm_mmu_page_fault``, and re-entry. Returns True if the
        access was completed by emulation (MMIO) rather than to be retried by the guest."""
        exit_id, t_exit, token = self._exit(EXIT_REASON_EPT_VIOLATION, gfn, refs)
        fault = KvmPageFault(addr=gfn << 12, gfn=gfn, error_code=ept_violation_error_code(write, present),
                             id=self._next_fault_id(), write=write, present=present)  # fmt: skip
        r = yield from self.kvm_mmu_do_page_fault(fault)
        return (yield from self._ept_violation_done(r, gfn, write, exit_id, t_exit, token))

    def _ept_violation_done(self, r: int, gfn: int, write: bool, exit_id: int, t_exit: int, token: int) -> Proc[bool]:
        """The end of ``handle_ept_violation``: emulate an MMIO access, re-enter, and record the
        fault's service time."""
        done = r == RET_PF_EMULATE and self.emulate_mmio(gfn, write)
        yield from self._reenter(exit_id, token)
        self.stat.fault_service_ns.append(self.now - t_exit)
        return done

    def resume_group_fault(self, why: int, f: dict) -> Proc[None]:
        """Go on with an exit that a vCPU group member began in compiled code (a not-present EPT
        violation, or an IPI's): from ``read_lock(mmu_lock)`` when the lock was contended
        (``LEAVE_LOCK``), from just after ``write_lock`` when the legacy MMU's locked section needs
        Python (``LEAVE_LOCKED``), or from entry when requests or an SRCU grace period need Python
        (``LEAVE_ENTRY``; a fault's outcome is already counted)."""
        if f["irq"]:  # the IPI's exit: only entry is left
            yield from self._reenter(f["exit_id"], f["token"])
            return
        r = f["ret"]
        if why in (LEAVE_LOCK, LEAVE_LOCKED):
            gfn, write = f["gfn"], f["write"]
            fault = KvmPageFault(addr=gfn << 12, gfn=gfn, error_code=ept_violation_error_code(write, False),
                                 id=f["id"], write=write, present=False, slot=f["slot"], pfn=f["pfn"],
                                 map_writable=True, mmu_seq=f["mmu_seq"])  # fmt: skip
            mmu = self.vm.mmu
            resume = mmu.page_fault_locked if why == LEAVE_LOCK else mmu.page_fault_held  # type: ignore[union-attr]
            r = yield from resume(self, fault)
            self._page_fault_ret(fault, r)
        yield from self._ept_violation_done(r, f["gfn"], f["write"], f["exit_id"], f["t_exit"], f["token"])

    def handle_ept_misconfig(self, gfn: int, write: bool, refs: int) -> Proc[bool]:
        """``handle_ept_misconfig``: an MMIO SPTE. ``handle_mmio_page_fault`` first; a stale
        generation goes down the full fault path with ``PFERR_RSVD_MASK``."""
        exit_id, t_exit, token = self._exit(EXIT_REASON_EPT_MISCONFIG, gfn, refs)
        r = handle_mmio_page_fault(self, gfn)
        if r == RET_PF_INVALID:
            fault = KvmPageFault(addr=gfn << 12, gfn=gfn, error_code=PFERR_RSVD_MASK, id=self._next_fault_id(),
                                 write=False, present=False)  # fmt: skip
            r = yield from self.kvm_mmu_do_page_fault(fault)
        done = r == RET_PF_EMULATE and self.emulate_mmio(gfn, write)
        yield from self._reenter(exit_id, token)
        return done

    def kvm_mmu_do_page_fault(self, fault: KvmPageFault) -> Proc[int]:
        """``kvm_mmu_do_page_fault``: count ``pf_taken``, run the MMU's pipeline, count the outcome."""
        st = self.stat
        sink = self.vm.sink
        st.pf_taken += 1
        if sink.faults:
            sink.emit("kvm_page_fault", self.now, self.id, fault.id, fault.addr, fault.error_code)
        r = yield from self.vm.mmu.page_fault(self, fault)
        self._page_fault_ret(fault, r)
        return r

    def _page_fault_ret(self, fault: KvmPageFault, r: int) -> None:
        """``kvm_mmu_do_page_fault``'s outcome: the ``pf_*`` count and the return tracepoint."""
        st = self.stat
        sink = self.vm.sink
        if r == RET_PF_FIXED:
            st.pf_fixed += 1
        elif r == RET_PF_SPURIOUS:
            st.pf_spurious += 1
        elif r == RET_PF_RETRY:
            st.pf_retry += 1
        elif r == RET_PF_EMULATE:
            st.pf_emulate += 1
        if sink.faults:
            sink.emit("vsim_page_fault_ret", self.now, self.id, fault.id, RET_PF_NAMES[r], fault.goal_level)

    def emulate_mmio(self, gfn: int, write: bool) -> bool:
        """``x86_emulate_instruction`` on an MMIO access: no device in KVM claims it, so it exits
        to userspace (``KVM_EXIT_MMIO``) and the VMM completes it. The access is then done."""
        vm = self.vm
        c = vm.costs
        st = self.stat
        st.insn_emulation += 1
        st.mmio_exits += 1
        if vm.sink.faults:
            vm.sink.emit("kvm_mmio", self.now, self.id, "write" if write else "read", gfn << 12)
        slot = vm.memslots.gfn_to_memslot(gfn)
        if slot is not None and slot.flags & KVM_MEMSLOT_INVALID and vm.checker is not None:
            vm.checker.on_mmio_invalid_slot(self, gfn)
        if vm.memslots_settled and slot is not None:
            vm.stat.mmio_on_backed_gfn += 1
            if vm.checker is not None:
                vm.checker.on_stale_mmio(self, gfn)
        self.now += c.emulate + c.userspace_exit
        self.counters[0] += 1
        return True

    def enter_guest(self, exit_id: int) -> None:
        """VM entry (after ``vcpu_enter_guest`` serviced the requests)."""
        vm = self.vm
        if vm.checker is not None:
            if self.root is not None and self.root.invalid:
                vm.checker.on_obsolete_entry(self)
            vm.checker.on_entry(self)
        if self.ipis:
            # IPIs that arrived while the vCPU was in the host ran their handler there.
            ipis = self.ipis
            while ipis and ipis[0] <= self.now:
                ipis.pop(0)
            self.kick_at = ipis[0] if ipis else NEVER
        self.now += vm.costs.vmentry
        self.mode = IN_GUEST_MODE
        if self.vm.sink.all:
            self.vm.sink.emit("kvm_entry", self.now, self.id, exit_id)

    def guest_sync(self) -> Proc[None]:
        """memstress ``GUEST_SYNC``: a ucall port I/O that exits to userspace and comes back."""
        ev = self.sync()  # the exit changes state others read (mode, requests, SRCU)
        if ev is not None:
            yield ev
        if self.kick_at <= self.now:
            yield from self.handle_external_interrupt()  # the IPI arrived before the OUT executed
        vm = self.vm
        exit_id, _, token = self._exit(EXIT_REASON_IO_INSTRUCTION, 0, 0)
        self.stat.io_exits += 1
        if vm.sink.all:
            vm.sink.emit("kvm_userspace_exit", self.now, self.id, exit_id, "KVM_EXIT_IO")
        vm.srcu.read_unlock(token, self.now)  # KVM_RUN returns to the VMM
        self.now += vm.costs.userspace_exit
        if vm.program is not None:  # the test's vCPU thread reports the pass and may wait
            yield from vm.program.vcpu_sync(self)
        token = vm.srcu.read_lock(self.now)  # and is called again: vcpu_enter_guest
        yield from self._reenter(exit_id, token)
