"""``dirty_log_perf_test``'s main thread (``tools/testing/selftests/kvm/dirty_log_perf_test.c``).

The vCPUs run the memstress loop: one pass over their memory, then ``GUEST_SYNC`` to userspace,
where each vCPU thread records the iteration it finished and spins until the main thread bumps the
iteration (it is outside ``KVM_RUN``, so outside guest mode, while it waits). The main thread:

1. waits for every vCPU to finish the populate pass (``Populate memory time``);
2. enables dirty logging on every test memslot (``Enabling dirty logging time``);
3. for each iteration: bumps it and waits for every vCPU to finish a pass (``Iteration N dirty memory
   time``), then ``KVM_GET_DIRTY_LOG`` on every slot (``Iteration N get dirty log time``) and, with
   manual-protect, ``KVM_CLEAR_DIRTY_LOG`` with what GET returned (``Iteration N clear dirty log
   time``);
4. disables dirty logging (``Disabling dirty logging time``), the vCPUs idle.

Times are simulated nanoseconds from the phase's start until its last piece ends, as the test
measures from "start" until the slowest vCPU finishes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vsim.config.schema import MemslotOp
from vsim.dirty_log import kvm_clear_dirty_log, kvm_get_dirty_log
from vsim.sched import Proc
from vsim.selftests.memstress import ACCESS, MemstressHost

if TYPE_CHECKING:
    from vsim.vm import Vm
    from vsim.vmm import Vmm


class DirtyLogPerf(MemstressHost):
    """The test's main thread."""

    def __init__(self, vm: Vm) -> None:
        self.iterations = vm.cfg.selftest.iterations
        super().__init__(vm, [ACCESS] * (self.iterations + 1))
        self.dirty_pages: list[int] = []  # pages GET reported per iteration
        self.cleared_pages: list[int] = []

    def _set_logging(self, vmm: Vmm, on: bool) -> Proc[None]:
        for slot in list(self.vm.memslots.slots):
            yield from vmm.kvm_set_memory_region(MemslotOp(at=vmm.now, op="flags", slot=slot.id, log_dirty=on))

    def run(self, vmm: Vmm) -> Proc[None]:
        vm = self.vm
        manual = vm.cfg.dirty_log.manual_protect
        yield from self.run_iteration(vmm, 0, "Populate memory time")
        t = vmm.now
        yield from self._set_logging(vmm, True)
        self.phases.append(("Enabling dirty logging time", vmm.now - t))
        for it in range(1, self.iterations + 1):
            yield from self.run_iteration(vmm, it, f"Iteration {it} dirty memory time")
            t = vmm.now
            bitmaps: dict[int, np.ndarray] = {}
            for slot in vm.memslots.slots:
                bitmaps[slot.id] = yield from kvm_get_dirty_log(vmm, slot)
            self.dirty_pages.append(sum(int(b.sum()) for b in bitmaps.values()))
            self.phases.append((f"Iteration {it} get dirty log time", vmm.now - t))
            if manual:
                t = vmm.now
                cleared = 0
                for slot in vm.memslots.slots:
                    cleared += yield from kvm_clear_dirty_log(vmm, slot, bitmaps[slot.id])
                self.cleared_pages.append(cleared)
                self.phases.append((f"Iteration {it} clear dirty log time", vmm.now - t))
        t = vmm.now
        yield from self._set_logging(vmm, False)
        self.phases.append(("Disabling dirty logging time", vmm.now - t))

    def counts(self) -> dict[str, object]:
        return {"dirty_pages": self.dirty_pages, "cleared_pages": self.cleared_pages}
