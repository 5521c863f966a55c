"""Numba's on-disk cache, kept consistent with the sources its compiled functions came from.

Numba checks only the source file of the function it caches. A compiled function also embeds the
constants it imports and the compiled callees from other modules: the vCPU group's loop calls
``run_accesses`` and the fault and exit steps, and all of them read ``group_state``'s column numbers.
Editing one of those files alone would load a stale function with wrong array offsets.
``drop_stale_caches`` hashes every source file compiled code depends on and, when the hash differs
from the one the caches were built with, removes the cached objects before anything is compiled.
(Caches that ``NUMBA_CACHE_DIR`` moves elsewhere are not managed: clear that directory by hand. A
read-only install caches in a per-user directory instead: ``choose_cache_dir``.)

``compile_clock`` measures the compilation a run does (the first run after an install, or after
a source change), so that rates can leave it out and the CLI can say what is happening.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
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


def _writable(path: Path) -> bool:
    """``path`` (or, if it does not exist yet, its parent) can be written by this user."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.access(path, os.W_OK)


def choose_cache_dir() -> Path | None:
    """Where numba caches compiled code: beside the sources when the install is writable (and
    ``NUMBA_CACHE_DIR`` is not set); else a per-user directory (``$XDG_CACHE_HOME/vsim/numba``
    or ``~/.cache/vsim/numba``), else one under the temporary directory, so that a read-only
    install still runs. Returns the directory chosen instead of the package's, or None."""
    from numba import config

    # (numba.config sets its options as module attributes when it loads: no declarations to check.)
    if config.CACHE_DIR or _writable(PACKAGE / "__pycache__"):  # type: ignore[attr-defined]
        return None
    home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    for root in (Path(home) / "vsim" / "numba", Path(tempfile.gettempdir()) / f"vsim-numba-{os.getuid()}"):
        with contextlib.suppress(OSError):
            root.mkdir(parents=True, exist_ok=True)
            if _writable(root):
                config.CACHE_DIR = str(root)  # type: ignore[attr-defined]
                return root
    return None


def sources_digest() -> str:
    h = hashlib.sha256()
    for rel in SOURCES:
        h.update((PACKAGE / rel).read_bytes())
    return h.hexdigest()


def drop_stale_caches() -> None:
    """Remove numba's cached objects (under the package, or in the directory ``choose_cache_dir``
    picked for a read-only install) if they were built from other sources."""
    digest = sources_digest()
    moved = choose_cache_dir()
    stamp = STAMP if moved is None else moved / "jit-sources.sha256"
    if stamp.is_file() and stamp.read_text() == digest:
        return
    for path in PACKAGE.rglob("__pycache__/*.nb[ic]") if moved is None else moved.rglob("*.nb[ic]"):
        with contextlib.suppress(OSError):
            path.unlink()
    with contextlib.suppress(OSError):
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest)


class CompileClock(event.Listener):
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
