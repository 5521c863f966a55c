"""Where model code sends events: a buffer of plain tuples that costs nothing when switched off.

Model code tests the sink's ``faults``/``all`` flags before building an event, so a run with logging
off pays one attribute test per would-be event. Records are ``(name, t_ns, vcpu, *fields)`` tuples;
when the buffer fills, the sink hands it to the consumer the runner attached (the JSONL writer in
``vsim.events.writer``), so memory stays bounded however long the run.

Actors stamp some events a little ahead of the global clock (a vCPU logs ``kvm_page_fault`` at
exit time plus the exit cost before it next yields), but never before the clock. So on each flush
the sink sorts its buffer by time and then by actor (stably: one actor's simultaneous events keep
their emission order) and hands on only the records older than the clock; the rest wait for the
next flush. The log is thus in simulated-time order, and simultaneous events of different actors
come in actor order however far each ran ahead of the clock.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from operator import itemgetter

from vsim.events.kinds import LEVELS

Record = tuple[object, ...]


class EventSink:
    """Collects event tuples at a level (``off``, ``faults`` or ``all``)."""

    __slots__ = ("faults", "all", "level", "_buf", "_consumer", "_limit", "_next", "emitted", "kept", "clock")

    def __init__(
        self, level: str = "off", consumer: Callable[[list[Record]], None] | None = None, limit: int = 1 << 14
    ) -> None:
        self.clock: Callable[[], float] | None = None  # the simulation's global clock (env.now)
        if level not in LEVELS:
            raise ValueError(f"event level must be one of {LEVELS}, got {level!r}")
        self.level = level
        self.faults = level in ("faults", "all")
        self.all = level == "all"
        self._buf: list[Record] = []
        self._consumer = consumer
        self._limit = limit
        self._next = limit  # buffer length that triggers the next flush
        self.emitted = 0

    def emit(self, *record: object) -> None:
        """Append one ``(name, t_ns, vcpu, *fields)`` record."""
        buf = self._buf
        buf.append(record)
        if len(buf) >= self._next and self._consumer is not None:
            self.flush(final=False)

    def extend(self, records: list[Record]) -> None:
        """Append many records at once (in the order they were emitted)."""
        buf = self._buf
        buf.extend(records)
        if len(buf) >= self._next and self._consumer is not None:
            self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        """Hand the buffered records, in time order, to the consumer (if any).

        With ``final=False`` only records stamped before the global clock go; later ones stay.
        """
        buf = self._buf
        buf.sort(key=_time)
        keep: list[Record] = []
        if not final and self.clock is not None:
            cut = bisect_left(buf, self.clock(), key=_t)
            buf, keep = buf[:cut], buf[cut:]
        self.emitted += len(buf)
        if self._consumer is not None and buf:
            self._consumer(buf)
        self._buf = keep
        # Records ahead of the clock stay; wait for a full buffer's worth of new ones, and at least
        # as many as stayed, before sorting again (actors far ahead of the clock would otherwise
        # make the flushes re-sort what stays, over and over).
        self._next = len(keep) + max(self._limit, len(keep))

    def records(self) -> list[Record]:
        """The records still buffered (all of them when no consumer is attached)."""
        return self._buf


_time = itemgetter(1, 2)  # (t_ns, vcpu)
_t = itemgetter(1)
