"""A run's progress line on a terminal (application layer): simulated time, accesses done of the
expected number (``vsim.resources.estimate``), and an ETA. Shown only on a terminal, and only once
a run has taken a couple of seconds; it disappears when the run ends."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

SHOW_AFTER_S = 2.0


class RunProgress:
    """``update`` is ``Vm.run``'s progress callback."""

    def __init__(self, expected_accesses: int, console: Console | None = None, show: bool | None = None) -> None:
        self.expected = max(1, expected_accesses)
        self.console = console if console is not None else Console(stderr=True)
        self.show = self.console.is_terminal if show is None else show
        self.t0 = time.perf_counter()
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, sim_ns: int, accesses: int) -> None:
        if not self.show or time.perf_counter() - self.t0 < SHOW_AFTER_S:
            return
        if self._bar is None:
            columns = (TextColumn("[bold]vsim run"), BarColumn(bar_width=20), TextColumn("{task.fields[info]}"),
                       TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
            self._bar = Progress(*columns, console=self.console, transient=True)
            self._task = self._bar.add_task("run", total=self.expected, info="")
            self._bar.start()
        assert self._task is not None
        info = f"{sim_ns / 1e6:,.1f} ms simulated, {_count(accesses)} of ~{_count(self.expected)} accesses"
        self._bar.update(self._task, completed=min(accesses, self.expected), info=info)


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}G" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"
