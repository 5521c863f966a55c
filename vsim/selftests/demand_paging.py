"""``demand_paging_test`` (``tools/testing/selftests/kvm/demand_paging_test.c``): one pass in which
every vCPU touches each page of its slice once, usually through userfaultfd (``[host_mm] uffd``).

It prints ``Total guest execution time`` (until the slowest vCPU finishes its pass) and ``Overall
demand paging rate: X pgs/sec`` (pages faulted in, over that time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsim.sched import Proc
from vsim.selftests.memstress import ACCESS, MemstressHost

if TYPE_CHECKING:
    from vsim.vm import Vm
    from vsim.vmm import Vmm


class DemandPaging(MemstressHost):
    """The test's main thread: start the vCPUs, wait for them."""

    def __init__(self, vm: Vm) -> None:
        super().__init__(vm, [ACCESS])

    def run(self, vmm: Vmm) -> Proc[None]:
        yield from self.run_iteration(vmm, 0, "Total guest execution time")

    def counts(self) -> dict[str, object]:
        vm = self.vm
        pages = sum(v.stat.host_page_allocs for v in vm.vcpus)
        total = self.phases[0][1] if self.phases else 0
        return {
            "pages": pages,
            "demand_paging_rate_pages_per_s": round(pages * 1e9 / total) if total else 0,
            "uffd_wait_ns": vm.uffd.wait_ns if vm.uffd is not None else 0,
        }
