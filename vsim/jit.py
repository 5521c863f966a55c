"""Numba's on-disk cache, kept consistent with the sources its compiled functions came from.

Numba checks only the source file of the function it caches. A compiled function also embeds the
constants it imports and the compiled callees from other modules: the vCPU group's loop calls
``run_accesses`` and the fault and exit steps, and all of them read ``group_state``'s column numbers.
Editing one of those files alone would load a stale function with wrong array offsets.
``drop_stale_caches`` hashes every source file compiled code depends on and, when the hash differs
from the one the caches were built with, removes the cached objects before anything is compiled.
(Caches that ``NUMBA_CACHE_DIR`` moves elsewhere are not managed: clear that directory by hand.)

``compile_clock`` measures the compilation a run does (the first run after an install, or after
a source change), so that rates can leave it out and the CLI can say what is happening.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from numba.core import event

PACKAGE = Path(__file__).resolve().parent
SOURCES = (
    "vcpu/batch.py",
    "vcpu/group_kernel.py",
    "vcpu/group_fault.py",
    "vcpu/group_exits.py",
    "vcpu/group_direct.py",
    "vcpu/group_state.py",
    "vcpu/tlb.py",
    "mmu/spte.py",
    "mmu/sp_pool.py",
    "mmu/tdp_mmu_map.py",
    "mmu/direct_map.py",
    "mmu/arch_mmu.py",
    "mmu/fast_page_fault.py",
    "mmu/mmu_page.py",
    "mmu/pte_list.py",
    "mmu/rmap.py",
    "mmu/mmu_lock.py",
    "host_mm.py",
    "mmu/page_fault.py",
    "stats.py",
    "requests.py",
    "sched.py",
    "events/rows.py",
    "events/kinds.py",
)
"""Every module with compiled functions, and every module whose values they compile in."""
STAMP = PACKAGE / "__pycache__" / "jit-sources.sha256"


def sources_digest() -> str:
    h = hashlib.sha256()
    for rel in SOURCES:
        h.update((PACKAGE / rel).read_bytes())
    return h.hexdigest()


def drop_stale_caches() -> None:
    """Remove numba's cached objects under the package if they were built from other sources."""
    digest = sources_digest()
    if STAMP.is_file() and STAMP.read_text() == digest:
        return
    for path in PACKAGE.rglob("__pycache__/*.nb[ic]"):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # a read-only install: numba cannot cache there either
        STAMP.parent.mkdir(exist_ok=True)
        STAMP.write_text(digest)


class CompileClock(event.Listener):  # type: ignore[misc]
    """Wall time spent compiling (numba's ``numba:compile`` events; nested ones count once), and a
    callback at the first compilation, so a caller can say that it is happening."""

    def __init__(self, on_first: Callable[[], None] | None = None) -> None:
        self.seconds = 0.0
        self._depth = 0
        self._t0 = 0.0
        self._on_first = on_first

    def on_start(self, ev: event.Event) -> None:
        if self._depth == 0:
            if self._on_first is not None:
                self._on_first()
                self._on_first = None
            self._t0 = time.perf_counter()
        self._depth += 1

    def on_end(self, ev: event.Event) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._t0


@contextlib.contextmanager
def compile_clock(on_first: Callable[[], None] | None = None) -> Iterator[CompileClock]:
    """Measure the compilation done inside the block."""
    clock = CompileClock(on_first)
    with event.install_listener("numba:compile", clock):
        yield clock
