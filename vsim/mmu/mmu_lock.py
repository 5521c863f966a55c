"""``kvm->mmu_lock``: a queued reader-writer lock (``qrwlock``) with per-actor wait accounting.

Readers share the lock; a writer holds it alone. Waiters queue in FIFO order: while a writer waits,
new readers queue behind it instead of joining the current readers, as with the kernel's qrwlock
(fair to writers). When the lock frees up, the head of the queue is served: one writer, or every
consecutive reader at the head.

The lock lives on simulated time. An uncontended acquire returns ``None`` and costs no SimPy event;
a contended one returns an event the caller yields, which fires at the instant the lock is handed
over (at ``GRANT_PRIO``, so hand-overs are ordered before anything else at that instant).
"""

from __future__ import annotations

from array import array
from collections import deque

import simpy
from simpy.events import Event

from vsim.events.sink import EventSink
from vsim.sched import GRANT_PRIO

READ, WRITE = "read", "write"


class MmuLock:
    """A qrwlock; ``actor`` ids are vCPU indices (VM-wide actors use negative ids)."""

    def __init__(self, env: simpy.Environment, sink: EventSink) -> None:
        self.env = env
        self.sink = sink
        self.readers = 0
        self.writer: int | None = None
        self._queue: deque[tuple[str, int, Event, int, int]] = deque()
        # (actor, mode) -> (acquired at, lock_id); kept only when the log wants hold times.
        self._held_since: dict[tuple[int, str], tuple[int, int]] = {}
        self._next_id = 0
        # Waits: the non-zero ones as samples, the (common) zero ones only counted.
        self.wait_ns: dict[str, array] = {READ: array("q"), WRITE: array("q")}
        self.zero_waits: dict[str, int] = {READ: 0, WRITE: 0}
        self.wait_by_actor: dict[int, int] = {}
        self.contended = 0
        # lockdep: which actors hold the lock for read (kept only while the checker is on; the
        # vCPU group, which counts readers itself, is off then).
        self.lockdep = False
        self._read_holders: dict[int, int] = {}

    def lockdep_assert_held(self, actor: int, write: bool) -> None:
        """``lockdep_assert_held_write`` / ``lockdep_assert_held_read``: ``actor`` holds the lock in
        that mode (checked while the invariant checker is on)."""
        if not self.lockdep:
            return
        if write:
            assert self.writer == actor, f"actor {actor} needs mmu_lock for write (held by {self.writer})"
        else:
            assert self._read_holders.get(actor), f"actor {actor} needs mmu_lock for read"

    def _note_reader(self, actor: int, delta: int) -> None:
        if self.lockdep:
            n = self._read_holders.get(actor, 0) + delta
            if n:
                self._read_holders[actor] = n
            else:
                del self._read_holders[actor]

    # -- acquire ---------------------------------------------------------------------------------
    def read_lock(self, actor: int, t: int) -> Event | None:
        """``read_lock(&kvm->mmu_lock)`` at time ``t``; ``None`` if taken at once."""
        self._next_id += 1
        if self.writer is None and not self._queue:
            self.readers += 1
            self._note_reader(actor, 1)
            self._acquired(READ, actor, t, 0, self._next_id)
            return None
        return self._enqueue(READ, actor, t)

    def write_lock(self, actor: int, t: int) -> Event | None:
        """``write_lock(&kvm->mmu_lock)`` at time ``t``; ``None`` if taken at once."""
        self._next_id += 1
        if self.writer is None and self.readers == 0 and not self._queue:
            self.writer = actor
            self._acquired(WRITE, actor, t, 0, self._next_id)
            return None
        return self._enqueue(WRITE, actor, t)

    def _enqueue(self, mode: str, actor: int, t: int) -> Event:
        ev = Event(self.env)
        self._queue.append((mode, actor, ev, t, self._next_id))
        self.contended += 1
        if self.sink.all:
            self.sink.emit("vsim_mmu_lock_wait", t, actor, self._next_id, mode)
        return ev

    def _acquired(self, mode: str, actor: int, t: int, waited: int, lock_id: int) -> None:
        if waited:
            self.wait_ns[mode].append(waited)
            self.wait_by_actor[actor] = self.wait_by_actor.get(actor, 0) + waited
        else:
            self.zero_waits[mode] += 1
        if self.sink.all:
            self._held_since[(actor, mode)] = (t, lock_id)
            self.sink.emit("vsim_mmu_lock_acquire", t, actor, lock_id, mode, waited)

    # -- release ---------------------------------------------------------------------------------
    def read_unlock(self, actor: int, t: int) -> None:
        """``read_unlock``; the last reader out hands the lock to the queue head."""
        assert self.readers > 0, "read_unlock without a reader"
        self.readers -= 1
        self._note_reader(actor, -1)
        self._released(READ, actor, t)
        if self.readers == 0 and self._queue:
            self._grant(t)

    def write_unlock(self, actor: int, t: int) -> None:
        """``write_unlock``; hands the lock to the queue head."""
        assert self.writer == actor, "write_unlock by a non-owner"
        self.writer = None
        self._released(WRITE, actor, t)
        if self._queue:
            self._grant(t)

    def _released(self, mode: str, actor: int, t: int) -> None:
        if self.sink.all:
            since, lock_id = self._held_since.pop((actor, mode))
            self.sink.emit("vsim_mmu_lock_release", t, actor, lock_id, mode, t - since)

    def waits(self, mode: str) -> list[int]:
        """Every acquisition's wait in ``mode`` (zeros first), for percentiles."""
        return [0] * self.zero_waits[mode] + list(self.wait_ns[mode])

    def _grant(self, t: int) -> None:
        q = self._queue
        env = self.env
        while q:
            mode, actor, ev, t_req, lock_id = q[0]
            if mode == WRITE:
                if self.readers or self.writer is not None:
                    return
                self.writer = actor
            else:
                if self.writer is not None:
                    return
                self.readers += 1
                self._note_reader(actor, 1)
            q.popleft()
            self._acquired(mode, actor, t, t - t_req, lock_id)
            ev._ok = True  # noqa: SLF001 - trigger at (t, GRANT_PRIO) rather than (now, NORMAL)
            ev._value = t  # noqa: SLF001
            env.schedule(ev, GRANT_PRIO, t - env.now)
            if mode == WRITE:
                return

    @property
    def waiters(self) -> int:
        return len(self._queue)
