"""``access_tracking_perf_test`` (``tools/testing/selftests/kvm/access_tracking_perf_test.c``).

Iterations, each timed from the main thread's bump until the slowest vCPU thread is done:
``Populating memory`` (write), ``Writing to populated memory``, ``Reading from populated memory``,
``Mark memory idle``, ``Writing to idle memory``, ``Mark memory idle``, ``Reading from idle memory``.

In the idle-marking iterations each vCPU thread walks its own pages in userspace. For each page it
reads the host's page-idle bit (``is_page_idle``: a page still flagged idle is tested for youth
through the MMU notifiers, ``kvm_test_age_gfn``), then writes it (``mark_page_idle``: the primary
MMU clears its young bits and ``mmu_notifier_clear_young`` reaches ``kvm_age_gfn``, which clears A
on the SPTE). Each notifier call takes ``mmu_lock`` for write, so the vCPU threads serialize on it.
Aging does not flush the TLB (6.13+) unless ``mmu.age_flush`` (before); without a flush, pages the
guest then touches through cached translations get no A bit and still look idle. The test warns
when more than 10% of a vCPU's pages are still idle when it marks them again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vsim.requests import kvm_flush_remote_tlbs
from vsim.sched import Proc
from vsim.selftests.memstress import ACCESS, MemstressHost
from vsim.vcpu.workloads import vcpu_region

if TYPE_CHECKING:
    from vsim.vcpu.kvm_vcpu import KvmVcpu
    from vsim.vm import Vm
    from vsim.vmm import Vmm

MARK_IDLE = "mark_idle"
ITERATIONS = (
    (ACCESS, 100, "Populating memory"),
    (ACCESS, 100, "Writing to populated memory"),
    (ACCESS, 0, "Reading from populated memory"),
    (MARK_IDLE, 0, "Mark memory idle"),
    (ACCESS, 100, "Writing to idle memory"),
    (MARK_IDLE, 0, "Mark memory idle"),
    (ACCESS, 0, "Reading from idle memory"),
)
GUEST_PASSES = sum(1 for kind, _, _ in ITERATIONS if kind == ACCESS)


class AccessTrackingPerf(MemstressHost):
    """The test's main thread and its vCPU threads' idle marking."""

    def __init__(self, vm: Vm) -> None:
        super().__init__(vm, [kind for kind, _, _ in ITERATIONS])
        self.idle = np.zeros(vm.cfg.vm.vcpus * vm.cfg.workload.per_vcpu_memory // 4096, dtype=np.bool_)
        self.still_idle: list[list[int]] = []  # per marking iteration, per vCPU
        self.warnings: list[str] = []

    def set_workloads(self) -> None:
        for v in self.vm.vcpus:
            v.workload.pass_write_percent = [wp for kind, wp, _ in ITERATIONS if kind == ACCESS]

    def run(self, vmm: Vmm) -> Proc[None]:
        for k, (_, _, name) in enumerate(ITERATIONS):
            yield from self.run_iteration(vmm, k, name)

    def vcpu_task(self, v: KvmVcpu, k: int) -> Proc[None]:
        """``mark_vcpu_memory_idle`` on the vCPU thread, for iteration ``k``."""
        vm = self.vm
        c = vm.costs
        lock = vm.mmu_lock
        start, pages = vcpu_region(vm.cfg.workload, v.id, len(vm.vcpus), vm.region_base_gfn)
        mark = self.kinds[:k].count(MARK_IDLE)
        if mark == len(self.still_idle):
            self.still_idle.append([0] * len(vm.vcpus))
        still = 0
        for gfn in range(start, start + pages):
            i = gfn - vm.region_base_gfn
            v.now += c.page_idle_page  # pagemap lookup and the page_idle bitmap read and write
            ev = v.sync()
            if ev is not None:
                yield ev
            wait = lock.write_lock(v.id, v.now)
            if wait is not None:
                v.now = yield wait
            visited = 0
            if self.idle[i]:  # is_page_idle: still flagged idle, unless a mapping is young
                visited, young = vm.mmu.test_age_gfn(gfn)
                still += not young
            n, young = vm.mmu.age_gfn(gfn, v.id, v.now)
            v.now += (visited + n) * c.tdp_wrprot_spte
            if young and vm.cfg.mmu.age_flush:
                v.now = kvm_flush_remote_tlbs(vm, v.now, me=v.id)  # clear_flush_young before 6.13
            self.idle[i] = True
            ev = v.sync()
            if ev is not None:
                yield ev
            lock.write_unlock(v.id, v.now)
        self.still_idle[mark][v.id] = still
        if still > pages // 10 and mark:  # the first marking has nothing to compare with
            self.warnings.append(f"vCPU{v.id}: Too many pages still idle ({still} out of {pages})")

    def counts(self) -> dict[str, object]:
        return {"still_idle": self.still_idle, "warnings": self.warnings}
