"""The host side of memstress (``tools/testing/selftests/kvm/lib/memstress.c``): iterations.

The main thread bumps ``iteration``; each vCPU thread does that iteration's work (a guest pass
through ``KVM_RUN``, or host work of its own in userspace, such as marking its memory idle),
records it in ``vcpu_last_completed_iteration`` and spins until the next bump. The main thread
times an iteration from the bump until the last vCPU has recorded it. Iteration 0 starts with the
vCPUs (the populate pass).

A vCPU thread reaches the handshake at each ``GUEST_SYNC`` (``Vcpu.guest_sync`` calls
``vcpu_sync``), outside ``KVM_RUN`` and so outside guest mode.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from simpy.events import Event

from vsim.sched import GRANT_PRIO, At, Proc
from vsim.vcpu.vcpu import NEVER

if TYPE_CHECKING:
    from vsim.vcpu.kvm_vcpu import KvmVcpu
    from vsim.vm import Vm
    from vsim.vmm import Vmm

ACCESS = "access"  # the vCPU runs a guest pass


def fire(ev: Event, t: int) -> None:
    """Trigger ``ev`` at time ``t`` (not before ``env.now``), ahead of the actors at that instant."""
    ev._ok = True
    ev._value = t
    ev.env.schedule(ev, GRANT_PRIO, t - ev.env.now)


class MemstressHost(ABC):
    """The iteration handshake between the main thread and the vCPU threads; ``kinds[k]`` says
    what iteration ``k`` asks of a vCPU thread (``ACCESS`` or a program-defined host task)."""

    def __init__(self, vm: Vm, kinds: list[str]) -> None:
        self.vm = vm
        self.kinds = kinds
        n = len(kinds)
        self._arrived = [0] * n
        self._last = [0] * n
        self._all_done = [Event(vm.env) for _ in range(n)]
        self._go = [Event(vm.env) for _ in range(n)]
        self._iteration: dict[int, int] = {}
        self.phases: list[tuple[str, int]] = []

    def results(self) -> dict[str, object]:
        """``stats.json``'s ``selftest``: the phase times in the test's order and with its names,
        then the program's own counts."""
        return {"name": self.vm.cfg.selftest.name, "phases_ns": [list(p) for p in self.phases], **self.counts()}

    def counts(self) -> dict[str, object]:
        return {}

    @abstractmethod
    def run(self, vmm: Vmm) -> Proc[None]:
        """The test's main thread, run by the VMM: its iterations and host-side work."""

    def set_workloads(self) -> None:  # noqa: B027 - a hook whose default changes nothing
        """Adjust the vCPUs' guest passes once they exist (by default they run as configured)."""

    # -- vCPU threads ------------------------------------------------------------------------------
    def vcpu_sync(self, v: KvmVcpu) -> Proc[None]:
        """At ``GUEST_SYNC``: record the iteration, then do host-side iterations until the next one
        that runs the guest (or the last)."""
        k = self._iteration.get(v.id, 0)
        self._record(k, v.now)
        while k + 1 < len(self.kinds):
            k += 1
            t = yield self._go[k]
            v.now = max(v.now, t)
            # Every parked vCPU resumes from the one event, in the order they parked; re-queue at
            # the vCPU's own priority so they go on in vCPU order, as after any other wait.
            yield At(v.env, v.now - v.env.now, v.prio)
            self._iteration[v.id] = k
            if self.kinds[k] == ACCESS:
                return
            yield from self.vcpu_task(v, k)
            self._record(k, v.now)

    def vcpu_task(self, v: KvmVcpu, k: int) -> Proc[None]:
        """The vCPU thread's own work in iteration ``k`` (whose kind is not ``ACCESS``)."""
        raise ValueError(f"{type(self).__name__} has no vCPU-thread task {self.kinds[k]!r}")

    def _record(self, k: int, t: int) -> None:
        self._arrived[k] += 1
        self._last[k] = max(self._last[k], t)
        if self._arrived[k] == len(self.vm.vcpus):
            fire(self._all_done[k], self._last[k])

    # -- main thread -------------------------------------------------------------------------------
    def run_iteration(self, vmm: Vmm, k: int, name: str) -> Proc[None]:
        """Bump to iteration ``k`` (0: the vCPUs are already running it) and wait for all vCPUs;
        the time it took is phase ``name``."""
        t = vmm.now
        if k:
            ev = vmm.sync()
            if ev is not None:
                yield ev
            fire(self._go[k], vmm.now)
        # Nothing the main thread does next can reach a vCPU before every vCPU has parked.
        vmm.sleeping_until = NEVER
        vmm.now = max(vmm.now, (yield self._all_done[k]))
        self.phases.append((name, vmm.now - (0 if k == 0 else t)))
