"""A vCPU under shadow paging (EPT off): guest virtual accesses, #PF exits, CR3 writes and INVLPG,
and the guest kernel code it runs.

The CPU walks KVM's shadow page tables with guest virtual page numbers, so the batched kernel and
the TLB are the same as under EPT with a 1D walk. A walk that fails is a #PF intercept
(``EXCEPTION_NMI`` → ``kvm_handle_page_fault`` → ``kvm_mmu_page_fault``). When KVM finds that the
guest's own tables do not allow the access it injects the #PF, and the guest kernel's handler runs
(``pf_guest``) before the access is retried. Guest writes to page tables go through the direct map
like any store and exit when KVM write-protects the page; an emulated store reaches
``kvm_mmu_track_write``. MOV to CR3 exits (``handle_cr`` → ``kvm_set_cr3``: ``kvm_mmu_new_pgd``,
then ``KVM_REQ_MMU_SYNC`` and a flush of the current context, as without PCIDs); so does INVLPG
(``kvm_mmu_invlpg``).

Context switches and forks happen on the guest's clock (``guest.context_switch_interval`` and
``guest.fork_interval``): the batched run stops at that instant, as it does for a kick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vsim.dirty_log import mark_page_dirty_in_slot
from vsim.mmu.page_fault import (
    PFERR_PRESENT_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    RET_PF_EMULATE,
    KvmPageFault,
)
from vsim.mmu.shadow_mmu import KVM_MMU_NUM_PREV_ROOTS, ShadowRoot
from vsim.requests import KVM_REQ_MMU_SYNC, KVM_REQ_TLB_FLUSH_CURRENT
from vsim.sched import Proc
from vsim.vcpu.vcpu import NEVER, Vcpu
from vsim.vcpu.workloads import Workload

if TYPE_CHECKING:
    from vsim.guest.kernel import GuestKernel, GuestProcess
    from vsim.mmu.page_tables import Root
    from vsim.mmu.shadow_mmu import ShadowPagingMmu
    from vsim.vm import Vm

EXIT_REASON_EXCEPTION_NMI = "EXCEPTION_NMI"
EXIT_REASON_CR_ACCESS = "CR_ACCESS"
EXIT_REASON_INVLPG = "INVLPG"


class ShadowVcpu(Vcpu):
    """``struct kvm_vcpu`` of a shadow-paged guest, and the guest CPU's kernel work."""

    def __init__(self, vm: Vm, vcpu_id: int, workload: Workload) -> None:
        super().__init__(vm, vcpu_id, workload)
        mode = vm.guest_mode
        assert mode is not None
        self.guest_refs = -2 if mode.root_level == 3 else 0  # PAE: the PDPTEs are loaded with CR3
        self.max_class = 2
        self.kernel: GuestKernel | None = vm.guest
        self.cr3 = 0
        self._stores: list[tuple[int, int, int | None]] | None = None  # the kernel's stores in flight
        self._stored: list[bool] = []  # which of them the emulator completed
        self.injected: tuple[int, int] | None = None  # (gvpn, error code) of the #PF KVM injected
        self.procs: list[GuestProcess] = []
        if self.kernel is not None:
            self.procs = self.kernel.processes[vcpu_id]
            self._set_process(self.procs[0])
        g = vm.cfg.guest
        self._switch_every = g.context_switch_interval if len(self.procs) > 1 else 0
        self._fork_every = g.fork_interval
        self.next_switch = self._switch_every or NEVER
        self.next_fork = self._fork_every or NEVER
        self.guest_event_at = min(self.next_switch, self.next_fork)

    @property
    def mmu(self) -> ShadowPagingMmu:
        return self.vm.mmu  # type: ignore[return-value]

    def _set_process(self, proc: GuestProcess) -> None:
        self.proc = proc
        self.cr3 = proc.pgd
        self.wbase = self.vm.guest_mode.user_base  # type: ignore[union-attr]
        self.wmap = proc.frames

    # -- the #PF intercept ---------------------------------------------------------------------------
    def handle_ept_violation(self, gfn: int, write: bool, present: bool, refs: int) -> Proc[bool]:
        """``handle_exception_nmi`` for a #PF: ``kvm_mmu_page_fault`` on the guest virtual page
        ``gfn``; an injected #PF runs the guest's handler after re-entry."""
        gvpn = gfn
        user = self.kernel is not None and not self._is_kernel_page(gvpn)
        exit_id, t_exit, token = self._exit(EXIT_REASON_EXCEPTION_NMI, gvpn, refs)
        code = (PFERR_WRITE_MASK if write else 0) | (PFERR_PRESENT_MASK if present else 0)
        code |= PFERR_USER_MASK if user else 0
        fault = KvmPageFault(addr=gvpn << 12, gfn=gvpn, error_code=code, id=self._next_fault_id(), write=write,
                             present=present, user=user)  # fmt: skip
        r = yield from self.kvm_mmu_do_page_fault(fault)
        done = False
        if r == RET_PF_EMULATE and fault.slot is not None:
            done = yield from self.emulate_write(fault)
        elif r == RET_PF_EMULATE:
            done = self.emulate_mmio(fault.gfn, write)
        yield from self._reenter(exit_id, token)
        self.stat.fault_service_ns.append(self.now - t_exit)
        if self.injected is not None:
            yield from self.guest_page_fault()
        return done

    def _is_kernel_page(self, gvpn: int) -> bool:
        return gvpn >= self.vm.guest_mode.page_offset  # type: ignore[union-attr]

    def inject_page_fault(self, gvpn: int, error_code: int) -> None:
        """``kvm_inject_emulated_page_fault``: the guest takes a #PF at its next entry."""
        self.injected = (gvpn, error_code)

    def emulate_write(self, fault: KvmPageFault) -> Proc[bool]:
        """``x86_emulate_instruction`` on a store to a write-protected guest page: the emulator
        writes guest memory (``emulator_write_phys``) and reports it to ``kvm_mmu_track_write``.
        A string store (``clear_page``) is not a page-table-writing instruction: KVM unprotects
        the page and lets the guest run it again (``retry_instruction``). Returns whether the
        access is complete."""
        c = self.vm.costs
        self.stat.insn_emulation += 1
        self.now += c.emulate
        gfn = fault.gfn
        store = None
        if self._stores is not None:
            store = self._stores[self.cur_access]
            assert self.kernel is not None and self.kernel.kva(store[0]) == fault.addr >> 12
        if store is not None and store[2] is None:
            yield from self.mmu.kvm_mmu_unprotect_page(self, gfn)
            return False
        if store is not None:
            nbytes = self.kernel.mode.pte_bytes  # type: ignore[union-attr]
            yield from self.mmu.kvm_mmu_track_write(self, gfn, store[1] * nbytes, nbytes)
            self._apply(store)
            self._stored[self.cur_access] = True
        else:  # a data store (memstress) to a frame that still shadows a guest page table
            yield from self.mmu.kvm_mmu_track_write(self, gfn, 0, 8, 1)
        self.kvm_vcpu_mark_page_dirty(gfn)  # emulator_write_phys -> kvm_vcpu_write_guest
        self.counters[0] += 1
        return True

    def _apply(self, store: tuple[int, int, int | None]) -> None:
        assert self.kernel is not None
        gfn, idx, value = store
        if value is None:
            self.kernel.mem.zero(gfn)
        else:
            self.kernel.mem.write(gfn, idx, value)
        self._note_frame_write(gfn)

    def kvm_vcpu_mark_page_dirty(self, gfn: int) -> None:
        """``kvm_vcpu_mark_page_dirty``: KVM wrote guest page ``gfn`` (the emulator's store, the
        guest walk's A/D bits); the invariant checker counts it as a completed write."""
        mark_page_dirty_in_slot(self.gfn_to_memslot(gfn), gfn)
        self._note_frame_write(gfn)

    def _note_frame_write(self, gfn: int) -> None:
        k = gfn - self.vm.region_base_gfn
        if 0 <= k < len(self.written):
            self.written[k] = 1

    # -- guest kernel code ---------------------------------------------------------------------------
    def guest_stores(self, stores: list[tuple[int, int, int | None]]) -> Proc[None]:
        """Guest kernel stores through the direct map, in order: ``(gfn, index, gpte)`` is a
        ``set_pte``, ``(gfn, 0, None)`` a ``clear_page`` string store. They run as guest accesses
        (TLB hits, shadow walks, exits); a store that is not emulated reaches memory at the end
        (only this vCPU's kernel reads these pages meanwhile). The kernel's timers wait."""
        assert self.kernel is not None and self._stores is None
        n = len(stores)
        if not n:
            return
        keys = np.fromiter((self.kernel.kva(g) for g, _, _ in stores), dtype=np.int64, count=n)
        self._stores, self._stored = stores, [False] * n
        step = self._run_reference if self.reference else self._run_batched
        due, self.guest_event_at = self.guest_event_at, NEVER
        self.nested += 1
        yield from step(keys, np.ones(n, dtype=np.bool_))
        self.nested -= 1
        self.guest_event_at = due
        for store, done in zip(stores, self._stored, strict=True):
            if not done:
                if store[2] is None:
                    self.now += self.vm.costs.zero_4k
                self._apply(store)
        self._stores = None

    def guest_store(self, gfn: int, idx: int, value: int) -> Proc[None]:
        """One ``set_pte``."""
        yield from self.guest_stores([(gfn, idx, value)])

    def guest_clear_page(self, gfn: int) -> Proc[None]:
        """``clear_page``: a string store over the page."""
        yield from self.guest_stores([(gfn, 0, None)])

    def guest_page_fault(self) -> Proc[None]:
        """The guest's #PF handler for the fault KVM injected."""
        assert self.injected is not None and self.kernel is not None
        gvpn, code = self.injected
        self.injected = None
        self.stat.pf_guest += 1
        self.now += self.vm.costs.guest_page_fault
        k = gvpn - self.kernel.mode.user_base
        assert 0 <= k < self.kernel.user_pages, f"guest #PF outside the process's memory at {gvpn:#x}"
        due, self.guest_event_at = self.guest_event_at, NEVER
        yield from self.kernel.handle_mm_fault(self, self.proc, k, bool(code & PFERR_WRITE_MASK))
        self.guest_event_at = due

    def guest_write_cr3(self, pgd: int) -> Proc[None]:
        """MOV to CR3: the exit, ``kvm_set_cr3``, re-entry."""
        ev = self.sync()
        if ev is not None:
            yield ev
        if self.kick_at <= self.now:
            yield from self.handle_external_interrupt()
        exit_id, _, token = self._exit(EXIT_REASON_CR_ACCESS, 0, 0)
        self.stat.cr3_writes += 1
        if pgd != self.cr3:
            yield from self.kvm_mmu_new_pgd(pgd)
        # kvm_invalidate_pcid without PCIDs: sync the roots, flush the current context
        self.requests |= KVM_REQ_MMU_SYNC | KVM_REQ_TLB_FLUSH_CURRENT
        yield from self._reenter(exit_id, token)

    def kvm_mmu_new_pgd(self, pgd: int) -> Proc[None]:
        """``kvm_mmu_new_pgd``: ``fast_pgd_switch`` among the current and three previous roots
        (4-level roots only; a PAE root is always freed), else free and load a new root."""
        mmu = self.mmu
        self.mmio_gfn = -1  # vcpu_clear_mmio_info
        root = self.root
        assert isinstance(root, ShadowRoot)
        evicted: list[Root] = []
        if mmu.guest_mode.root_level == 4:
            hit = next(
                (r for r in self.prev_roots if isinstance(r, ShadowRoot) and r.pgd == pgd and not r.invalid), None
            )
            self.prev_roots.insert(0, root)
            if hit is not None:
                self.prev_roots.remove(hit)
                self.root = hit
                self.cr3 = pgd
                top = hit.sps[0]
                assert top is not None  # a 4-level root's top page
                top.write_flooding_count = 0
                return
            evicted = self.prev_roots[KVM_MMU_NUM_PREV_ROOTS:]
            del self.prev_roots[KVM_MMU_NUM_PREV_ROOTS:]
        else:
            evicted = [root]
        self.root = None
        self.cr3 = pgd
        yield from mmu.lock_write(self)
        for r in evicted:
            self.now = mmu.put_root(r, self.id, self.now)
        self.now = mmu.make_mmu_pages_available(self.id, self.now)
        self.root = mmu.alloc_vcpu_root(self)
        yield from mmu.unlock_write(self)

    def kvm_mmu_sync_roots(self) -> Proc[None]:
        """``kvm_mmu_sync_roots``: if a root has unsync children (the lockless ``is_unsync_root``),
        take the write lock and ``mmu_sync_children`` from it."""
        root = self.root
        if root is None or not hasattr(root, "sps"):
            return
        sps = [sp for sp in root.sps if sp is not None and (sp.unsync or sp.unsync_children)]
        if not sps:
            return
        mmu = self.mmu
        yield from mmu.lock_write(self)
        for sp in sps:
            yield from mmu.mmu_sync_children(self, sp, can_yield=True)
        yield from mmu.unlock_write(self)

    def guest_invlpg(self, gvpn: int) -> Proc[None]:
        """INVLPG: the exit and ``kvm_mmu_invlpg`` for the current and previous roots."""
        ev = self.sync()
        if ev is not None:
            yield ev
        exit_id, _, token = self._exit(EXIT_REASON_INVLPG, gvpn, 0)
        self.stat.invlpg += 1
        mmu = self.mmu
        yield from mmu.lock_write(self)
        for root in [self.root, *self.prev_roots]:
            if root is not None:
                assert isinstance(root, ShadowRoot)
                self.now = mmu.kvm_mmu_invalidate_addr(self, root, gvpn, self.now)
        yield from mmu.unlock_write(self)
        self.tlb.invalidate(gvpn)  # flush_tlb_gva
        yield from self._reenter(exit_id, token)

    # -- the guest's clock ---------------------------------------------------------------------------
    def guest_event(self) -> Proc[None]:
        """A context switch or a fork whose time has come (the fork first when both are due)."""
        assert self.kernel is not None
        self.guest_event_at = NEVER  # the kernel finishes this before it looks at its timers again
        if self.next_fork <= self.now:
            yield from self.guest_fork()
            self.next_fork = self.now + self._fork_every  # the parent runs that long before the next
        elif self.next_switch <= self.now:
            nxt = self.procs[(self.procs.index(self.proc) + 1) % len(self.procs)]
            self.now += self.vm.costs.guest_context_switch
            yield from self.guest_write_cr3(nxt.pgd)
            self._set_process(nxt)
            self.next_switch = self.now + self._switch_every  # a full time slice for the next one
        self.guest_event_at = min(self.next_switch, self.next_fork)

    def guest_fork(self) -> Proc[None]:
        """fork(): copy the address space, run the child for ``guest.child_writes`` page writes,
        then the child exits and the parent runs again."""
        kernel = self.kernel
        assert kernel is not None
        parent = self.proc
        self.stat.guest_forks += 1
        child = yield from kernel.fork(self, parent)
        self.now += self.vm.costs.guest_context_switch
        yield from self.guest_write_cr3(child.pgd)
        self._set_process(child)
        n = min(self.vm.cfg.guest.child_writes, kernel.user_pages)
        if n:
            step = self._run_reference if self.reference else self._run_batched
            self.nested += 1
            yield from step(np.arange(n, dtype=np.int64) + kernel.mode.user_base, np.ones(n, dtype=np.bool_))
            self.nested -= 1
        yield from kernel.exit_mmap(self, child)
        self.now += self.vm.costs.guest_context_switch
        yield from self.guest_write_cr3(parent.pgd)
        self._set_process(parent)
