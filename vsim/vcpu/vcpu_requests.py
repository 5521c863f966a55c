"""What a vCPU does for the rest of the VM: requests serviced at entry, IPIs, its PML buffer.

``vcpu_enter_guest`` handles the pending ``KVM_REQ_*`` in the kernel's order before it enters;
``post_ipi`` records an IPI's arrival (``vsim.requests`` sends them); the PML buffer is drained into
the dirty bitmaps at every exit (``vmx_flush_pml_buffer``). Mixed into ``Vcpu``.
"""

from __future__ import annotations

import numpy as np

from vsim.dirty_log import mark_page_dirty_in_slot
from vsim.mmu.shadow_page import ShadowMmu
from vsim.requests import (
    KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
    KVM_REQ_MMU_SYNC,
    KVM_REQ_TLB_FLUSH,
    KVM_REQ_TLB_FLUSH_CURRENT,
    KVM_REQ_UPDATE_CPU_DIRTY_LOGGING,
)
from vsim.sched import Proc
from vsim.vcpu.batch import PML_LOG_NR_ENTRIES
from vsim.vcpu.kvm_vcpu import KvmVcpu


class VcpuRequests(KvmVcpu):
    """The request, IPI and PML side of ``Vcpu``."""

    def service_requests(self) -> Proc[None]:
        """The ``KVM_REQ_*`` handled at the top of ``vcpu_enter_guest``, in the kernel's order."""
        req = self.requests
        self.requests = 0
        if req & KVM_REQ_MMU_FREE_OBSOLETE_ROOTS and (
            (self.root is not None and self.root.invalid) or any(r.invalid for r in self.prev_roots)
        ):
            yield from self.kvm_mmu_free_obsolete_roots()
        if req & KVM_REQ_MMU_SYNC:
            yield from self.kvm_mmu_sync_roots()
        if req & KVM_REQ_UPDATE_CPU_DIRTY_LOGGING:
            # vmx_update_cpu_dirty_logging: PML on while any memslot is dirty-logged.
            if self.vm.nr_memslots_dirty_logging:
                if not self.pml_on:
                    self.pml_buf = np.zeros(PML_LOG_NR_ENTRIES, dtype=np.int64)
                    self.pml_on = True
            else:
                self.kvm_flush_pml_buffer()
                self.pml_buf = np.zeros(0, dtype=np.int64)
                self.pml_on = False
        if req & KVM_REQ_TLB_FLUSH:
            self.kvm_vcpu_flush_tlb_all()
        elif req & KVM_REQ_TLB_FLUSH_CURRENT:  # a flush of everything covers the current context
            self.tlb.flush()  # vsim's TLB holds only the current context: this empties it
            self.now += self.vm.costs.tlb_flush
            if self.vm.checker is not None:
                self.vm.checker.on_local_flush(self)

    def kvm_mmu_free_obsolete_roots(self) -> Proc[None]:
        """``kvm_mmu_free_obsolete_roots`` → ``kvm_mmu_free_roots`` under ``mmu_lock`` (read for
        a TDP MMU root, write for shadow pages), then ``kvm_mmu_reload`` before entry."""
        vm = self.vm
        lock = vm.mmu_lock
        write = not vm.mmu.shared_range_ops
        ev = self.sync()
        if ev is not None:
            yield ev
        wait = (lock.write_lock if write else lock.read_lock)(self.id, self.now)
        if wait is not None:
            self.now = yield wait
        for r in [r for r in self.prev_roots if r.invalid]:  # KVM_MMU_ROOTS_ALL: the cached ones too
            self.prev_roots.remove(r)
            self.now = vm.mmu.put_root(r, self.id, self.now)
        reload = self.root is not None and self.root.invalid
        if reload:
            self.now = vm.mmu.put_root(self.root, self.id, self.now)  # type: ignore[arg-type]
            self.root = None
        ev = self.sync()
        if ev is not None:
            yield ev
        (lock.write_unlock if write else lock.read_unlock)(self.id, self.now)
        if reload:
            yield from self.kvm_mmu_load()

    def kvm_mmu_sync_roots(self) -> Proc[None]:
        """``KVM_REQ_MMU_SYNC``: only shadow paging has unsync pages (``ShadowVcpu``)."""
        return
        yield

    def kvm_vcpu_flush_tlb_all(self) -> None:
        """``kvm_vcpu_flush_tlb_all``: drop every translation of this vCPU (INVEPT all contexts)."""
        self.stat.tlb_flush += 1
        self.tlb.flush()
        self.now += self.vm.costs.tlb_flush
        if self.vm.checker is not None:
            self.vm.checker.on_local_flush(self)

    def post_ipi(self, arrival: int) -> None:
        """An IPI sent to this vCPU's CPU arrives at ``arrival``: in guest mode it forces an exit."""
        ipis = self.ipis
        ipis.append(arrival)
        ipis.sort()
        self.kick_at = ipis[0]

    def kvm_flush_pml_buffer(self) -> None:
        """``vmx_flush_pml_buffer`` at every exit: each logged gpa is marked dirty in its slot."""
        n = int(self.pml_n[0])
        for gfn in self.pml_buf[:n].tolist():
            mark_page_dirty_in_slot(self.gfn_to_memslot(gfn), gfn)
        self.pml_n[0] = 0
        self.now += n * self.vm.costs.pml_drain_entry

    def kvm_mmu_load(self) -> Proc[None]:
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
