"""``kvm->mmu_lock``: a queued reader-writer lock (``qrwlock``) with per-actor wait accounting.

Readers share the lock; a writer holds it alone. Waiters queue in FIFO order: while a writer waits,
new readers queue behind it instead of joining the current readers, as with the kernel's qrwlock
(fair to writers). When the lock frees up, the head of the queue is served: one writer, or every
consecutive reader at the head.

The lock lives on simulated time. An uncontended acquire returns ``None`` and costs no SimPy event;
a contended one returns an event the caller yields, which fires at the instant the lock is handed
over (at ``GRANT_PRIO``, so hand-overs are ordered before anything else at that instant).

The lock's state is two arrays with one owner, ``MmuLock``: the header ``lk`` (``L_*``: readers,
writer, counters) and the FIFO ring ``q`` (``Q_*`` columns). The qrwlock's rules are
``register_jitable`` functions (``lock_acquire``, ``lock_release``, ``lock_grant_next``) that Python
and the vCPU group's compiled loop both run on those arrays. A waiter is either a Python actor,
whose event ``MmuLock`` keeps, or a member of the vCPU group waiting in compiled code (``Q_GROUP``):
a hand-over to a member from Python goes to the group through ``LockGrantee``.
"""

from __future__ import annotations

from array import array
from typing import Protocol

import numpy as np
from numba.extending import register_jitable
from simpy.events import Event

from vsim.events.sink import EventSink
from vsim.sched import GRANT_PRIO, SimEnv

READ, WRITE = "read", "write"

# The header ``lk``.
L_READERS, L_WRITER, L_NEXT_ID, L_CONTENDED, L_ZERO_R, L_ZERO_W, L_QHEAD, L_QLEN = range(8)
L_COLS = 8
NO_WRITER = -(1 << 40)  # L_WRITER while no writer holds the lock (actor ids are small)
# The columns of a queued waiter in ``q``.
Q_WRITE, Q_ACTOR, Q_T, Q_ID, Q_GROUP = range(5)
Q_COLS = 5
GRANT_NONE = -1  # lock_grant_next: nobody can take the lock now
GRANT_PYTHON = -2  # ... the head could, but it waits in Python (only with group_only)


@register_jitable
def lock_acquire(lk: np.ndarray, q: np.ndarray, write: bool, actor: int, t: int, group: bool) -> bool:
    """``read_lock``/``write_lock`` at ``t``: True if taken at once, else ``actor`` is queued."""
    lk[L_NEXT_ID] += 1
    if lk[L_WRITER] == NO_WRITER and lk[L_QLEN] == 0 and (not write or lk[L_READERS] == 0):
        if write:
            lk[L_WRITER] = actor
            lk[L_ZERO_W] += 1
        else:
            lk[L_READERS] += 1
            lk[L_ZERO_R] += 1
        return True
    k = (lk[L_QHEAD] + lk[L_QLEN]) % q.shape[0]
    assert lk[L_QLEN] < q.shape[0], "mmu_lock: more waiters than actors"
    q[k, Q_WRITE] = write
    q[k, Q_ACTOR] = actor
    q[k, Q_T] = t
    q[k, Q_ID] = lk[L_NEXT_ID]
    q[k, Q_GROUP] = group
    lk[L_QLEN] += 1
    lk[L_CONTENDED] += 1
    return False


@register_jitable
def lock_release(lk: np.ndarray, write: bool) -> bool:
    """``read_unlock``/``write_unlock``: True if the queue's head may now be served."""
    if write:
        lk[L_WRITER] = NO_WRITER
    else:
        lk[L_READERS] -= 1
    return lk[L_QLEN] > 0 and (write or lk[L_READERS] == 0)


@register_jitable
def lock_grant_next(lk: np.ndarray, q: np.ndarray, t: int, group_only: bool) -> int:
    """Hand the lock at ``t`` to the queue's head if it can take it now: its row in ``q`` (its wait
    is ``t - q[row, Q_T]``; a zero wait is counted here), else ``GRANT_NONE``. With ``group_only``,
    a head that waits in Python is left queued (``GRANT_PYTHON``)."""
    if lk[L_QLEN] == 0:
        return GRANT_NONE
    k = lk[L_QHEAD]
    write = q[k, Q_WRITE]
    if lk[L_WRITER] != NO_WRITER or (write and lk[L_READERS]):
        return GRANT_NONE
    if group_only and not q[k, Q_GROUP]:
        return GRANT_PYTHON
    if write:
        lk[L_WRITER] = q[k, Q_ACTOR]
    else:
        lk[L_READERS] += 1
    lk[L_QHEAD] = (k + 1) % q.shape[0]
    lk[L_QLEN] -= 1
    if t == q[k, Q_T]:
        lk[L_ZERO_W if write else L_ZERO_R] += 1
    return k


class LockGrantee(Protocol):
    """Who takes a hand-over to a waiter queued from compiled code (the vCPU group)."""

    def lock_granted(self, actor: int, t: int) -> None: ...


class MmuLock:
    """A qrwlock; ``actor`` ids are vCPU indices (VM-wide actors use negative ids). ``max_waiters``
    bounds the queue: every actor waits at most once."""

    def __init__(self, env: SimEnv, sink: EventSink, max_waiters: int = 64) -> None:
        self.env = env
        self.sink = sink
        self.lk = np.zeros(L_COLS, dtype=np.int64)
        self.lk[L_WRITER] = NO_WRITER
        self.q = np.zeros((max_waiters, Q_COLS), dtype=np.int64)
        self._events: dict[int, Event] = {}  # lock_id -> the event of a waiter in Python
        self.grantee: LockGrantee | None = None
        # (actor, mode) -> (acquired at, lock_id); kept only when the log wants hold times.
        self._held_since: dict[tuple[int, str], tuple[int, int]] = {}
        # Waits: the non-zero ones as samples, the (common) zero ones only counted (in lk).
        self.wait_ns: dict[str, array] = {READ: array("q"), WRITE: array("q")}
        self.wait_by_actor: dict[int, int] = {}
        # lockdep: which actors hold the lock for read (kept only while the checker is on; the read
        # locks vCPU group members take and release in compiled code are not in it).
        self.lockdep = False
        self._read_holders: dict[int, int] = {}

    # -- the header, read as attributes ----------------------------------------------------------
    @property
    def readers(self) -> int:
        return int(self.lk[L_READERS])

    @property
    def writer(self) -> int | None:
        w = int(self.lk[L_WRITER])
        return None if w == NO_WRITER else w

    @property
    def contended(self) -> int:
        return int(self.lk[L_CONTENDED])

    @property
    def zero_waits(self) -> dict[str, int]:
        return {READ: int(self.lk[L_ZERO_R]), WRITE: int(self.lk[L_ZERO_W])}

    @property
    def waiters(self) -> int:
        return int(self.lk[L_QLEN])

    def lockdep_assert_held(self, actor: int, write: bool | None) -> None:
        """``lockdep_assert_held_write`` / ``lockdep_assert_held_read``: ``actor`` holds the lock in
        that mode; with ``write=None``, in either (``kvm_lockdep_assert_mmu_lock_held`` for an
        operation that runs shared or exclusive). Checked while the invariant checker is on."""
        if not self.lockdep:
            return
        if write is None:
            assert self.writer == actor or self._read_holders.get(actor), f"actor {actor} needs mmu_lock"
        elif write:
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
        return self._acquire(False, actor, t)

    def write_lock(self, actor: int, t: int) -> Event | None:
        """``write_lock(&kvm->mmu_lock)`` at time ``t``; ``None`` if taken at once."""
        return self._acquire(True, actor, t)

    def _acquire(self, write: bool, actor: int, t: int) -> Event | None:
        lk = self.lk
        mode = WRITE if write else READ
        if lock_acquire(lk, self.q, write, actor, t, False):
            if not write:
                self._note_reader(actor, 1)
            if self.sink.all:
                self._log_acquired(mode, actor, t, 0, int(lk[L_NEXT_ID]))
            return None
        lock_id = int(lk[L_NEXT_ID])
        ev = Event(self.env)
        self._events[lock_id] = ev
        if self.sink.all:
            self.sink.emit("vsim_mmu_lock_wait", t, actor, lock_id, mode)
        return ev

    def note_wait(self, write: bool, actor: int, waited: int) -> None:
        """A non-zero wait for the lock, as a sample (compiled code's are handed over here too)."""
        self.wait_ns[WRITE if write else READ].append(waited)
        self.wait_by_actor[actor] = self.wait_by_actor.get(actor, 0) + waited

    def _log_acquired(self, mode: str, actor: int, t: int, waited: int, lock_id: int) -> None:
        self._held_since[(actor, mode)] = (t, lock_id)
        self.sink.emit("vsim_mmu_lock_acquire", t, actor, lock_id, mode, waited)

    # -- release ---------------------------------------------------------------------------------
    def read_unlock(self, actor: int, t: int) -> None:
        """``read_unlock``; the last reader out hands the lock to the queue head."""
        assert self.lk[L_READERS] > 0, "read_unlock without a reader"
        self._note_reader(actor, -1)
        self._released(READ, actor, t)
        if lock_release(self.lk, False):
            self.grant(t)

    def write_unlock(self, actor: int, t: int) -> None:
        """``write_unlock``; hands the lock to the queue head."""
        assert self.lk[L_WRITER] == actor, "write_unlock by a non-owner"
        self._released(WRITE, actor, t)
        if lock_release(self.lk, True):
            self.grant(t)

    def _released(self, mode: str, actor: int, t: int) -> None:
        if self.sink.all:
            since, lock_id = self._held_since.pop((actor, mode))
            self.sink.emit("vsim_mmu_lock_release", t, actor, lock_id, mode, t - since)

    def waits(self, mode: str) -> list[int]:
        """Every acquisition's wait in ``mode`` (zeros first)."""
        return self.wait_samples(mode).tolist()

    def wait_samples(self, mode: str) -> np.ndarray:
        """``waits`` as one int64 array, for percentiles (a Python list costs 36 B per sample)."""
        return np.concatenate([np.zeros(self.zero_waits[mode], dtype=np.int64),
                               np.asarray(self.wait_ns[mode], dtype=np.int64)])  # fmt: skip

    def grant(self, t: int) -> None:
        """Serve the queue's head at ``t``: one writer, or every consecutive reader there. A Python
        waiter's event fires at ``(t, GRANT_PRIO)``; a group member's hand-over goes to the group."""
        lk, q = self.lk, self.q
        env = self.env
        while True:
            k = lock_grant_next(lk, q, t, False)
            if k < 0:
                return
            write, actor, t_req, lock_id, group = q[k].tolist()
            mode = WRITE if write else READ
            if t > t_req:
                self.note_wait(write, actor, t - t_req)
            if not write:
                self._note_reader(actor, 1)
            if self.sink.all:
                self._log_acquired(mode, actor, t, t - t_req, lock_id)
            if group:
                assert self.grantee is not None
                self.grantee.lock_granted(actor, t)
            else:
                ev = self._events.pop(lock_id)
                ev._ok = True  # trigger at (t, GRANT_PRIO) rather than (now, NORMAL)
                ev._value = t
                env.schedule(ev, GRANT_PRIO, t - env.now)
            if write:
                return
