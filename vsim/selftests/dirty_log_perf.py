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

from collections.abc import Generator
from typing import TYPE_CHECKING

import numpy as np
from simpy.events import Event

from vsim.config.schema import MemslotOp
from vsim.dirty_log import kvm_clear_dirty_log, kvm_get_dirty_log
from vsim.sched import GRANT_PRIO, At
from vsim.vcpu.vcpu import NEVER

if TYPE_CHECKING:
    from vsim.vcpu.vcpu import Vcpu
    from vsim.vm import Vm
    from vsim.vmm import Vmm


def _fire(ev: Event, t: int) -> None:
    ev._ok = True  # noqa: SLF001 - trigger at (t, GRANT_PRIO)
    ev._value = t  # noqa: SLF001
    ev.env.schedule(ev, GRANT_PRIO, t - ev.env.now)  # type: ignore[attr-defined]


class DirtyLogPerf:
    """The test's main thread and the vCPU threads' iteration handshake."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.iterations = vm.cfg.selftest.iterations
        n = self.iterations + 1
        self._arrived = [0] * n  # vCPUs done with pass k
        self._last = [0] * n  # when the last of them finished it
        self._all_done = [Event(vm.env) for _ in range(n)]
        self._go = [Event(vm.env) for _ in range(n)]  # iteration k may start (k >= 1)
        self._passes_done: dict[int, int] = {}
        self.phases: list[tuple[str, int]] = []
        self.dirty_pages: list[int] = []  # pages GET reported per iteration
        self.cleared_pages: list[int] = []

    # -- vCPU threads ------------------------------------------------------------------------------
    def vcpu_sync(self, v: Vcpu) -> Generator[object, object, None]:
        """At ``GUEST_SYNC`` in userspace: record the finished pass, wait for the next iteration."""
        k = self._passes_done.get(v.id, 0)
        self._passes_done[v.id] = k + 1
        self._arrived[k] += 1
        self._last[k] = max(self._last[k], v.now)
        if self._arrived[k] == len(self.vm.vcpus):
            _fire(self._all_done[k], self._last[k])
        if k < self.iterations:
            t = yield self._go[k + 1]
            v.now = max(v.now, t)  # type: ignore[call-overload]
            # Every parked vCPU resumes from the one event, in the order they parked; re-queue at
            # the vCPU's own priority so they go on in vCPU order, as after any other wait.
            yield At(v.env, v.now - v.env.now, v.prio)

    # -- main thread -------------------------------------------------------------------------------
    def _wait_all(self, vmm: Vmm, k: int) -> Generator[object, object, None]:
        # Nothing the main thread does next can reach a vCPU before every vCPU has parked.
        vmm.sleeping_until = NEVER
        vmm.now = max(vmm.now, (yield self._all_done[k]))  # type: ignore[type-var]

    def _set_logging(self, vmm: Vmm, on: bool) -> Generator[object, object, None]:
        for slot in list(self.vm.memslots.slots):
            yield from vmm.kvm_set_memory_region(MemslotOp(at=vmm.now, op="flags", slot=slot.id, log_dirty=on))

    def run(self, vmm: Vmm) -> Generator[object, object, None]:
        vm = self.vm
        manual = vm.cfg.dirty_log.manual_protect
        yield from self._wait_all(vmm, 0)
        self.phases.append(("Populate memory time", vmm.now))
        t = vmm.now
        yield from self._set_logging(vmm, True)
        self.phases.append(("Enabling dirty logging time", vmm.now - t))
        for it in range(1, self.iterations + 1):
            t = vmm.now
            ev = vmm.sync()
            if ev is not None:
                yield ev
            _fire(self._go[it], vmm.now)
            yield from self._wait_all(vmm, it)
            self.phases.append((f"Iteration {it} dirty memory time", vmm.now - t))
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

    def results(self) -> dict[str, object]:
        """The phase times for ``stats.json``, in the test's order and with its names."""
        return {
            "name": "dirty_log_perf",
            "phases_ns": dict(self.phases),
            "dirty_pages": self.dirty_pages,
            "cleared_pages": self.cleared_pages,
        }
