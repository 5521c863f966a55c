"""Numba's caches are dropped when any source compiled code depends on changes (vsim.jit)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from vsim import jit


def test_every_compiled_module_and_what_it_compiles_in_is_hashed() -> None:
    """A module with compiled functions, or one they import values from, that the digest missed
    would let a stale cached function load after an edit."""
    compiled = {p for p in jit.PACKAGE.rglob("*.py") if "@njit" in p.read_text()}
    listed = {jit.PACKAGE / rel for rel in jit.SOURCES}
    assert compiled <= listed
    for path in compiled:
        for mod in re.findall(r"^from (vsim[\w.]*) import", path.read_text(), re.M):
            dep = jit.PACKAGE.parent / (mod.replace(".", "/") + ".py")
            assert dep in listed, f"{path.name} compiles in values from {mod}"


def test_a_changed_source_drops_the_cached_objects(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pkg = tmp_path / "vsim"
    for rel in jit.SOURCES:
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(f"# {rel}\n")
    cached = pkg / "vcpu" / "__pycache__" / "batch.run_accesses-76.py311.1.nbc"
    cached.parent.mkdir()
    monkeypatch.setattr(jit, "PACKAGE", pkg)
    monkeypatch.setattr(jit, "STAMP", pkg / "__pycache__" / "jit-sources.sha256")
    cached.write_bytes(b"x")
    jit.drop_stale_caches()  # no stamp yet: dropped
    assert not cached.exists()
    cached.write_bytes(b"x")
    jit.drop_stale_caches()  # same sources: kept
    assert cached.exists()
    (pkg / "vcpu" / "group_state.py").write_text("# columns moved\n")
    jit.drop_stale_caches()
    assert not cached.exists()


def test_compile_clock_times_compilation_and_says_so_once() -> None:
    """A run that compiles reports it once and times it (rates leave it out); one that does not,
    reports nothing."""
    from numba import njit

    from vsim.jit import compile_clock

    calls: list[int] = []

    def fresh(x: int) -> int:  # a new function each time: it must compile
        return x + 1

    with compile_clock(lambda: calls.append(1)) as clock:
        f = njit(fresh)
        assert f(1) == 2 and f(2) == 3  # the second call reuses the first compilation
        g = njit(fresh)
        assert g(3) == 4
    assert calls == [1] and clock.seconds > 0
    with compile_clock(lambda: calls.append(2)) as again:
        assert f(5) == 6
    assert calls == [1] and again.seconds == 0


def test_a_read_only_install_caches_compiled_code_in_a_user_directory(tmp_path: Path) -> None:
    """When the package's ``__pycache__`` cannot be written (a read-only install), numba's cache
    moves to ``$XDG_CACHE_HOME/vsim/numba`` before any compiled function is defined, and cached
    functions compile and store there (numba would otherwise raise "no locator available")."""
    mod = tmp_path / "src" / "kern.py"
    mod.parent.mkdir()
    mod.write_text("from numba import njit\n\n@njit(cache=True)\ndef twice(x):\n    return 2 * x\n")
    script = (
        "import os, sys\n"
        "real = os.access\n"
        "os.access = lambda p, m, **k: False if str(p).endswith('vsim/__pycache__') else real(p, m, **k)\n"
        "import vsim, numba\n"
        f"sys.path.insert(0, {str(mod.parent)!r})\n"
        "import kern\n"
        "assert kern.twice(21) == 42\n"
        "print(numba.config.CACHE_DIR)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    where = tmp_path / "cache" / "vsim" / "numba"
    assert p.stdout.strip() == str(where)
    assert list(where.rglob("*.nbi")) and (where / "jit-sources.sha256").is_file()
