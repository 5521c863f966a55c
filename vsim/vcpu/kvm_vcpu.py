"""``struct kvm_vcpu``: the state every part of a vCPU reads, and the lookups on it.

The vCPU is built in layers, each a class on top of this one, so that each part's code is
checked against the fields it uses: ``VcpuRequests`` (requests, IPIs, the PML buffer, MMU
loading), then ``VcpuExits`` (exits and entry), then ``Vcpu`` (the ``KVM_RUN`` loop), and
``ShadowVcpu`` for a shadow-paged guest.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from vsim.requests import OUTSIDE_GUEST_MODE
from vsim.sched import VCPU_PRIO_BASE, Actor
from vsim.stats import VcpuStat
from vsim.vcpu.group_state import NEVER
from vsim.vcpu.tlb import RefTlb, Tlb
from vsim.vcpu.walk import guest_refs_2d
from vsim.vcpu.workloads import Chunk, Workload

if TYPE_CHECKING:
    from vsim.memslots import Memslot
    from vsim.mmu.page_tables import Root
    from vsim.vm import Vm


class KvmVcpu(Actor):
    """``struct kvm_vcpu``'s fields that vsim models, and ``kvm_vcpu_gfn_to_memslot``."""

    def __init__(self, vm: Vm, vcpu_id: int, workload: Workload) -> None:
        super().__init__(vm.env, VCPU_PRIO_BASE + vcpu_id, vm.cfg.sim.mode == "reference")
        self.vm = vm
        self.id = vcpu_id
        self.mode = OUTSIDE_GUEST_MODE
        self.requests = 0
        self.root: Root | None = None
        self.prev_roots: list[Root] = []  # shadow paging's cached previous roots
        self.workload = workload
        self.chunks: Iterator[Chunk] = iter(())  # the current KVM_RUN's chunks of accesses
        self.stat = VcpuStat()
        t = vm.cfg.tlb
        self.tlb: Tlb | RefTlb = (RefTlb if self.reference else Tlb)(t.entries, t.ways)
        self.counters = np.zeros(4, dtype=np.int64)
        # Completed writes for the invariant checker's dirty-log check (empty when it is off).
        self.written = vm.checker.written if vm.checker is not None else np.zeros(0, dtype=np.uint8)
        self.wbase = vm.region_base_gfn
        self.wmap = np.zeros(0, dtype=np.int64)  # access key -> written index (empty: the key is a gfn)
        # The PML buffer (the VMCS's PML address and index), empty while PML is off.
        self.pml_buf = np.zeros(0, dtype=np.int64)
        self.pml_n = np.zeros(1, dtype=np.int64)
        self.pml_on = False
        # The hardware walk: references besides the walk below the root, and the largest TLB size
        # class (the guest's leaf under EPT; shadow paging caches the shadow leaf's size).
        self.guest_refs = guest_refs_2d(vm.guest_level)
        self.max_class = vm.guest_level - 1
        self.finished_at = -1
        self.last_used_slot: Memslot | None = None
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

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
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

    def fold_counters(self) -> None:
        """Copy the compiled code's access counters into the stats (at the end of ``KVM_RUN``, or of a
        run stopped early)."""
        st = self.stat
        ctr = self.counters
        st.accesses, st.tlb_hits, st.hw_walks, st.walk_refs = (int(x) for x in ctr)

    def _note_write(self, key: int, write: bool) -> None:
        """A completed write, for the checker's dirty-log check (``written``)."""
        k = key - self.wbase
        if not write:
            return
        if len(self.wmap):
            if not 0 <= k < len(self.wmap):
                return
            k = int(self.wmap[k])
        if 0 <= k < len(self.written):
            self.written[k] = 1
