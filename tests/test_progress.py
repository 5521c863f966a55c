"""Long runs tell the user: a progress line, ``--max-wall`` with partial results marked (issue 15)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import make_config
from rich.console import Console

from vsim import cli, progress
from vsim.vcpu import group
from vsim.vm import Vm

LONG = ["--set", "vm.vcpus=4", "--set", "workload.per_vcpu_memory=4MiB", "--set", "workload.passes=100000",
        "--set", "events.level=off", "--set", "sim.invariants=false"]  # fmt: skip


def test_max_wall_ends_a_run_with_partial_results_marked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run of 400 million accesses, stopped after a second: the run directory is complete and
    says it is partial (``status``, ``stats.json``), the vCPUs have not finished, and the counts
    are those reached."""
    out = tmp_path / "run"
    assert cli.main(["run", *LONG, "--max-wall", "1s", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    status = (out / "status").read_text()
    assert status.startswith("partial: --max-wall 1s reached at simulated time ") and err.count("\n") == 1
    assert "the results are partial" in err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["partial"] == status.strip()
    assert all(v["finished_ns"] == -1 for v in stats["vcpus"])
    assert 0 < stats["vcpu_total"]["accesses"] < 4 * 1024 * 100000
    assert stats["sim_time_ns"] > 0 and str(stats["sim_time_ns"]) in status
    timing = json.loads((out / "timing.json").read_text())
    assert timing["wall_s"] < 4  # the group's wake-ups yield to SimPy often enough to stop in time
    # vsim events and report say the run is partial before anything else.
    capsys.readouterr()
    assert cli.main(["events", str(out), "summary"]) == 0
    assert capsys.readouterr().err.startswith(f"vsim: warning: {out} is not a complete run (partial: --max-wall 1s")


def test_a_run_that_ends_in_time_is_complete(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--set", "vm.vcpus=2", "--set", "workload.per_vcpu_memory=64KiB", "--max-wall", "60s"]
    assert cli.main([*args, "--out", str(out), "--quiet"]) == 0
    assert (out / "status").read_text() == "complete\n"
    assert "partial" not in json.loads((out / "stats.json").read_text())


@pytest.mark.parametrize("value", ["abc", "0s", "-1s"])
def test_a_bad_max_wall_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    assert cli.main(["run", f"--max-wall={value}", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vsim: error: --max-wall: ") and err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_the_run_reports_progress_and_a_terminal_shows_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Vm.run`` calls back with the simulated time and accesses, both growing; the progress line
    draws them on a terminal, and nothing on a pipe."""
    monkeypatch.setattr("vsim.vm.PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.0)
    monkeypatch.setattr(group, "WAKE_BUDGET_S", 0.0)  # (the group yields to SimPy at every chunk)
    seen: list[tuple[int, int]] = []
    vm = Vm(make_config("vm.vcpus=4", "workload.per_vcpu_memory=1MiB", "workload.passes=50", "sim.invariants=false"))
    tty = io.StringIO()
    bar = progress.RunProgress(4 * 256 * 50, Console(file=tty, force_terminal=True, width=120))
    pipe = io.StringIO()
    quiet = progress.RunProgress(4 * 256 * 50, Console(file=pipe, force_terminal=False))

    def report(t: int, n: int) -> None:
        seen.append((t, n))
        bar.update(t, n)
        quiet.update(t, n)

    with bar, quiet:
        vm.run(progress=report)
    assert len(seen) > 2 and seen == sorted(seen) and seen[-1][1] <= 4 * 256 * 50
    assert "accesses" in tty.getvalue() and "ms simulated" in tty.getvalue()
    assert pipe.getvalue() == ""


def test_the_group_yielding_to_simpy_changes_no_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """A vCPU group's wake-up that yields after every call of the loop (to let the deadline and
    progress be checked) gives the same run as one that never yields."""
    sets = ["vm.vcpus=8", "workload.per_vcpu_memory=1MiB", "workload.passes=3", "workload.access=random",
            "mmu.mode=legacy_tdp", "sim.invariants=false", "host_mm.invalidations=20",
            "host_mm.interval=20us"]  # fmt: skip
    runs = []
    for budget in (0.0, 1e9):
        monkeypatch.setattr(group, "WAKE_BUDGET_S", budget)
        vm = Vm(make_config(*sets))
        vm.run(progress=lambda t, n: None)
        assert vm.group is not None and vm.group.faults > 0
        runs.append(([v.stat.as_dict() for v in vm.vcpus], vm.stat.as_dict(), vm.mmu_lock.waits("write")))
    assert runs[0] == runs[1]
