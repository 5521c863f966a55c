"""``kvm->srcu``: sleepable RCU protecting the memslots (spec §5.4).

vCPUs take the read side while they handle an exit and drop it before VM entry.
``synchronize_srcu`` waits for exactly the readers that started before it: a reader that starts
later never delays it. A grace period also lasts at least its own latency (expedited or normal).

Readers are kept as time intervals ``[start, end)``, not as a count. Actors may register a read
side a little ahead of the global clock (a vCPU knows when its exit handling will end before the
clock gets there). Deciding "started before" by time keeps the outcome independent of the order
in which actors were processed.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from simpy.events import Event

from vsim.events.sink import EventSink
from vsim.sched import GRANT_PRIO, SimEnv


class Srcu:
    """One SRCU domain (``kvm->srcu``)."""

    def __init__(self, env: SimEnv, sink: EventSink, next_sync: Callable[[], int]) -> None:
        self.env = env
        self.sink = sink
        self.next_sync = next_sync  # the earliest time any synchronize_srcu could still start
        self._next = 0
        self._readers: dict[int, list[int]] = {}  # token -> [start, end or -1]
        self._waits: list[tuple[set[int], Event]] = []
        self.grace_ns = array("q")

    def read_lock(self, t: int) -> int:
        """``srcu_read_lock`` at time ``t``; returns the token for the unlock."""
        self._next += 1
        self._readers[self._next] = [t, -1]
        if not self._next & 1023:
            self._prune()  # amortized: readers kept for a synchronize that is still possible
        return self._next

    def read_unlock(self, token: int, t: int) -> None:
        """``srcu_read_unlock`` at time ``t``."""
        if not self._waits and t < self.next_sync():
            del self._readers[token]  # no synchronize can start early enough to need it
            return
        self._readers[token][1] = t
        for waiting, ev in self._waits:
            waiting.discard(token)
            if not waiting and not ev.triggered:
                self._fire(ev)

    def readers_before(self, t: int) -> set[int]:
        """Tokens of the readers ``synchronize_srcu`` at ``t`` must wait for: started before ``t``
        and not finished by then (a reader ending exactly at ``t`` is still inside)."""
        return {tok for tok, (start, end) in self._readers.items() if start < t and (end < 0 or end >= t)}

    def wait_for(self, tokens: set[int]) -> Event | None:
        """An event that fires when the last of ``tokens`` has unlocked, at the latest unlock time
        (``None`` if none are still open); its value is that time."""
        open_ = {tok for tok in tokens if self._readers[tok][1] < 0}
        if not open_:
            return None
        ev = Event(self.env)
        ev._srcu_tokens = set(tokens)  # type: ignore[attr-defined]
        self._waits.append((open_, ev))
        return ev

    def last_end(self, tokens: set[int]) -> int:
        return max((self._readers[tok][1] for tok in tokens), default=0)

    def _fire(self, ev: Event) -> None:
        t = self.last_end(ev._srcu_tokens)  # type: ignore[attr-defined]
        ev._ok = True  # trigger at (t, GRANT_PRIO)
        ev._value = t
        self.env.schedule(ev, GRANT_PRIO, max(0, t - self.env.now))
        self._waits = [(w, e) for w, e in self._waits if e is not ev]

    def _prune(self) -> None:
        """Forget readers that ended before any synchronize that could still start."""
        if self._waits:
            return
        bound = self.next_sync()
        self._readers = {k: v for k, v in self._readers.items() if v[1] < 0 or v[1] >= bound}
