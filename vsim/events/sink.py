"""Where model code sends events: a buffer that costs nothing when switched off.

Model code tests the sink's ``faults``/``all`` flags before building an event, so a run with logging
off pays one attribute test per would-be event. Records are ``(name, t_ns, vcpu, *fields)`` tuples;
compiled code hands over many at once as int64 rows (``vsim.events.rows``), the form the sink keeps
them in. When the buffer fills, the sink hands a batch to the consumer the runner attached (the JSONL
writer in ``vsim.events.writer``), so memory stays bounded however long the run.

Actors stamp some events a little ahead of the global clock (a vCPU logs ``kvm_page_fault`` at
exit time plus the exit cost before it next yields), but never before the clock. So on each flush
the sink sorts its buffer by time and then by actor (stably: one actor's simultaneous events keep
their emission order) and hands on only the records older than the clock; the rest wait for the
next flush. The log is thus in simulated-time order, and simultaneous events of different actors
come in actor order however far each ran ahead of the clock.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vsim.events.kinds import LEVELS
from vsim.events.rows import KIND_ID, ROW_COLS, RowCodec

Record = tuple[int | str, ...]


class EventBatch:
    """Records the sink hands on, in log order: JSON lines or record tuples on demand."""

    __slots__ = ("rows", "codec")

    def __init__(self, rows: np.ndarray, codec: RowCodec) -> None:
        self.rows = rows
        self.codec = codec

    def __len__(self) -> int:
        return len(self.rows)

    def render(self) -> bytes:
        """The JSON lines (``events.jsonl``), UTF-8 encoded."""
        return self.codec.render(self.rows)

    def records(self) -> list[Record]:
        """The ``(name, t_ns, vcpu, *fields)`` tuples."""
        return self.codec.decode(self.rows)


class EventSink:
    """Collects events at a level (``off``, ``faults`` or ``all``)."""

    __slots__ = ("faults", "all", "level", "codec", "_py", "_blocks", "_n", "_consumer", "_limit", "_next", "emitted",
                 "kept", "clock")  # fmt: skip

    def __init__(
        self, level: str = "off", consumer: Callable[[EventBatch], None] | None = None, limit: int = 1 << 14
    ) -> None:
        self.clock: Callable[[], float] | None = None  # the simulation's global clock (env.now)
        if level not in LEVELS:
            raise ValueError(f"event level must be one of {LEVELS}, got {level!r}")
        self.level = level
        self.faults = level in ("faults", "all")
        self.all = level == "all"
        self.codec = RowCodec()
        self._py: list[Record] = []  # records emitted one by one, not yet made rows
        self._blocks: list[np.ndarray] = []  # rows, in emission order (before _py)
        self._n = 0
        self._consumer = consumer
        self._limit = limit
        self._next = limit  # buffer length that triggers the next flush
        self.emitted = 0

    def emit(self, *record: int | str) -> None:
        """Append one ``(name, t_ns, vcpu, *fields)`` record."""
        self._py.append(record)
        self._n += 1
        if self._n >= self._next and self._consumer is not None:
            self.flush(final=False)

    def emit_rows(self, rows: np.ndarray, until: int | None = None) -> None:
        """Append records given as rows (``vsim.events.rows``; fewer columns are zero-filled).

        ``until``: no record stamped before it can still come (the emitter knows better than the
        clock: compiled code runs vCPUs far ahead of it), so a flush may hand on all older ones.
        """
        if self._py:
            self._blocks.append(self.codec.encode(self._py))
            self._py = []
        if rows.shape[1] == ROW_COLS:
            block = rows.copy()
        else:
            block = np.zeros((len(rows), ROW_COLS), dtype=np.int64)
            block[:, : rows.shape[1]] = rows
        self._blocks.append(block)
        self._n += len(rows)
        if self._n >= self._next and self._consumer is not None:
            self.flush(final=False, until=until)

    def _pending(self) -> np.ndarray:
        if self._py:
            self._blocks.append(self.codec.encode(self._py))
            self._py = []
        if len(self._blocks) != 1:
            self._blocks = [np.concatenate(self._blocks) if self._blocks else np.zeros((0, ROW_COLS), np.int64)]
        return self._blocks[0]

    def flush(self, final: bool = True, until: int | None = None) -> None:
        """Hand the buffered records, in time order, to the consumer (if any).

        With ``final=False`` only records stamped before the global clock (or ``until``, if later)
        go; later ones stay.
        """
        rows = self._pending()
        rows = rows[_log_order(rows)]
        cut = len(rows)
        if not final and self.clock is not None:
            bound = self.clock() if until is None else max(until, self.clock())
            cut = int(np.searchsorted(rows[:, 1], bound, side="left"))
        out, keep = rows[:cut], rows[cut:]
        self._blocks = [keep]
        self._n = len(keep)
        self.emitted += len(out)
        if self._consumer is not None and len(out):
            self._consumer(EventBatch(out, self.codec))
        # Records ahead of the clock stay; wait for a full buffer's worth of new ones, and at least
        # as many as stayed, before sorting again (actors far ahead of the clock would otherwise
        # make the flushes re-sort what stays, over and over).
        self._next = len(keep) + max(self._limit, len(keep))

    def records(self) -> list[Record]:
        """The records still buffered, in emission order (all of them without a consumer)."""
        return self.codec.decode(self._pending())

    @staticmethod
    def kind_id(name: str) -> int:
        return KIND_ID[name]


def _log_order(rows: np.ndarray) -> np.ndarray:
    """The stable order by (time, actor): emission order among simultaneous records of one actor."""
    t, actor = rows[:, 1], rows[:, 2] + 1  # actors from -1 (the VM) up to 4095
    if len(t) and int(t.max()) < 1 << 50:
        return np.argsort((t << 13) | actor, kind="stable")  # one key: numpy's radix sort
    return np.lexsort((actor, t))
