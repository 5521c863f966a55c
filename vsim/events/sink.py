"""Where model code sends events: a buffer of plain tuples that costs nothing when switched off.

Model code tests the sink's ``faults``/``all`` flags before building an event, so a run with logging
off pays one attribute test per would-be event. Records are ``(name, t_ns, vcpu, *fields)`` tuples;
when the buffer fills, the sink hands it to the consumer the runner attached (the JSONL writer in
``vsim.events.writer``), so memory stays bounded however long the run.
"""

from __future__ import annotations

from collections.abc import Callable

from vsim.events.kinds import LEVELS

Record = tuple[object, ...]


class EventSink:
    """Collects event tuples at a level (``off``, ``faults`` or ``all``)."""

    __slots__ = ("faults", "all", "level", "_buf", "_consumer", "_limit", "emitted")

    def __init__(
        self, level: str = "off", consumer: Callable[[list[Record]], None] | None = None, limit: int = 1 << 14
    ) -> None:
        if level not in LEVELS:
            raise ValueError(f"event level must be one of {LEVELS}, got {level!r}")
        self.level = level
        self.faults = level in ("faults", "all")
        self.all = level == "all"
        self._buf: list[Record] = []
        self._consumer = consumer
        self._limit = limit
        self.emitted = 0

    def emit(self, *record: object) -> None:
        """Append one ``(name, t_ns, vcpu, *fields)`` record."""
        buf = self._buf
        buf.append(record)
        if len(buf) >= self._limit and self._consumer is not None:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered records to the consumer (if any) and start a new buffer."""
        self.emitted += len(self._buf)
        if self._consumer is not None and self._buf:
            self._consumer(self._buf)
        self._buf = []

    def records(self) -> list[Record]:
        """The records still buffered (all of them when no consumer is attached)."""
        return self._buf


NULL_SINK = EventSink("off")
