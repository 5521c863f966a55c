"""Deterministic ordering of simultaneous actions, and the rule for skipping a SimPy yield.

Every action an actor takes happens at a key ``(time_ns, priority)``. vCPU *i* acts at priority
``VCPU_PRIO_BASE + i``; lock hand-overs are delivered at ``GRANT_PRIO``, before any actor at the same
instant. SimPy orders its queue by ``(time, priority, insertion id)``, so with one pending event per
actor, simultaneous actions run in the same order however the actors got there. That is what lets
the batched mode (few yields) and the reference mode (one yield per access) give byte-identical
results.

An actor whose local clock has run ahead of ``env.now`` may act without yielding when nothing in the
queue sorts before its key: no other actor can act in between, so the shared state it sees is
exactly the state it would see after yielding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, TypeVar

import simpy
from simpy.events import Event, EventPriority

R = TypeVar("R")
Proc = Generator[Event, Any, R]
"""A SimPy process body, or a part of one it yields from: yields events, is sent each one's value
(a wait's grant time, a join's hand-back), and returns ``R``."""

GRANT_PRIO = EventPriority(1)
VCPU_PRIO_BASE = 8
ACTOR_PRIO_BASE = 2
"""VM-wide actors (a VMM thread, the host MM) take priorities 2..7, ahead of the vCPUs."""


class SimEnv(simpy.Environment):
    """The VM's SimPy environment. vsim's clock is integer nanoseconds: every delay it schedules is
    an ``int``, so ``now`` is one too (the declarations below say so to the type checker; SimPy's
    own code runs unchanged)."""

    if TYPE_CHECKING:
        _now: int
        _queue: list[tuple[int, int, int, Event]]  # type: ignore[assignment]  # (time, priority, id, event): int times only

        @property
        def now(self) -> int: ...

        def schedule(self, event: Event, priority: int = 1, delay: float = 0) -> None: ...


class At(Event):
    """A timeout that fires ``delay`` ns from now at an explicit queue priority."""

    __slots__ = ()

    def __init__(self, env: SimEnv, delay: int, priority: int) -> None:
        self.env = env
        self.callbacks: list = []
        self._value = None
        self._ok = True
        env.schedule(self, priority, delay)


class Actor(ABC):
    """Something that acts in simulated time at its own priority: a vCPU, the VMM, the host MM.

    ``now`` is the actor's local clock (never behind ``env.now``). ``sync()`` gives the event to
    yield so that ``env.now`` reaches ``now`` at this actor's priority, or ``None`` when nothing is
    queued before ``(now, prio)`` (the actor may then act ahead of ``env.now``). In reference
    mode every sync yields.
    """

    def __init__(self, env: SimEnv, prio: int, reference: bool) -> None:
        self.env = env
        self.prio = prio
        self.reference = reference
        self.now = 0

    @abstractmethod
    def run(self) -> Proc[None]:
        """The actor's SimPy process."""

    def sync(self) -> At | None:
        env = self.env
        now = self.now
        if not self.reference:
            q = env._queue  # is anything queued before (now, prio)?
            if not q or q[0][0] > now or (q[0][0] == now and q[0][1] > self.prio):
                return None
        return At(env, now - env._now, self.prio)


def events_scheduled(env: SimEnv) -> int:
    """How many events SimPy has scheduled so far (its insertion counter)."""
    return int(repr(env._eid)[6:-1])  # itertools.count's repr is 'count(N)'


class VmWideActor(Actor):
    """An actor outside the vCPUs: the VMM thread or the host MM.

    ``sleeping_until`` is when it next acts while it waits for a timer (``None`` while it waits on
    another actor); batched vCPUs never run past it (``Vm.horizon``). ``done`` once its schedule
    has ended. ``lock`` is the VM's ``mmu_lock``.
    """

    actor_id = -1  # the "vcpu" field of the events it logs

    def __init__(self, env: SimEnv, prio: int, reference: bool, lock: object) -> None:
        super().__init__(env, prio, reference)
        self.lock = lock
        self.done = False
        self.sleeping_until: int | None = 0

    def sync(self) -> At | None:
        ev = super().sync()
        self.sleeping_until = self.now if ev is not None else None
        return ev

    def mmu_lock_acquire(self, write: bool) -> Proc[None]:
        """``write_lock``/``read_lock(&kvm->mmu_lock)`` at the actor's instant, waiting if contended."""
        ev = self.sync()
        if ev is not None:
            yield ev
        lock = self.lock
        ev = (lock.write_lock if write else lock.read_lock)(self.actor_id, self.now)  # type: ignore[attr-defined]
        if ev is not None:
            self.sleeping_until = None
            self.now = yield ev

    def mmu_lock_release(self, write: bool) -> Proc[None]:
        ev = self.sync()
        if ev is not None:
            yield ev
        lock = self.lock
        (lock.write_unlock if write else lock.read_unlock)(self.actor_id, self.now)  # type: ignore[attr-defined]
