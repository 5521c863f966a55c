"""``kvm_mmu_zap_all_fast`` (spec §7.1): invalidate everything, make vCPUs drop their roots, zap.

1. ``write_lock(mmu_lock)``; toggle ``mmu_valid_gen`` (legacy shadow pages become obsolete);
   invalidate every TDP MMU root.
2. ``kvm_make_all_cpus_request(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)`` with ``WAIT|NO_WAKEUP``, still
   under the lock: vCPUs in guest mode get an IPI and the caller waits until each has exited.
3. ``kvm_zap_obsolete_pages`` walks ``active_mmu_pages`` from the tail in batches of
   ``BATCH_ZAP_PAGES``; the TDP MMU puts no pages there, so with it this walk is empty.
4. ``write_unlock``; then ``kvm_tdp_mmu_zap_invalidated_roots`` under the read lock clears the
   invalidated roots (no flush: each vCPU flushes when it loads its new root).

The caller must hold ``slots_lock`` (the VMM does, inside ``kvm_set_memory_region``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsim.mmu.tdp_mmu import TdpMmu
from vsim.requests import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, kvm_make_all_cpus_request
from vsim.sched import Proc

if TYPE_CHECKING:
    from vsim.vmm import Vmm

BATCH_ZAP_PAGES = 10


def kvm_mmu_zap_all_fast(vmm: Vmm) -> Proc[int]:
    """Run the fast zap as the VMM; returns its duration in ns."""
    vm = vmm.vm
    c = vm.costs
    t0 = vmm.now
    actor = vmm.actor_id
    yield from vmm.mmu_lock_acquire(write=True)
    vm.mmu_valid_gen ^= 1
    invalid = vm.mmu.invalidate_all_roots()
    _, vmm.now = kvm_make_all_cpus_request(vm, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, vmm.now)
    yield from vm.mmu.kvm_zap_obsolete_pages(vmm)  # the legacy MMU's shadow pages, if any
    yield from vmm.mmu_lock_release(write=True)
    if not invalid:
        vm.stat.mmu_fast_zaps += 1
        return vmm.now - t0
    # kvm_tdp_mmu_zap_invalidated_roots, under the read lock.
    yield from vmm.mmu_lock_acquire(write=False)
    visited = 0
    mmu = vm.mmu
    assert isinstance(mmu, TdpMmu)  # only TDP MMU roots are invalidated
    for root in invalid:
        visited += mmu.zap_root(root, actor, vmm.now)
        mmu.put_root(root, actor, vmm.now)  # the TDP MMU's own reference
    vm.stat.tdp_sptes_zapped += visited
    vmm.now += c.tdp_zap_spte * visited
    yield from vmm.mmu_lock_release(write=False)
    vm.stat.mmu_fast_zaps += 1
    return vmm.now - t0
