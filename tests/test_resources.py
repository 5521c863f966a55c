"""Runs too big for the machine are refused up front with an estimate, in one line (issue 15)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_config

from vsim import cli, resources
from vsim.config import load_config
from vsim.sweeps.spec import SweepError, SweepSpec
from vsim.sweeps.sweeper import run_sweep

GiB = 1 << 30


def test_the_estimate_is_the_documented_sum() -> None:
    """16 vCPUs × 64 MiB under the TDP MMU, worked by hand from docs/model.md's constants: the
    base, 40 B per guest page, and per vCPU its objects, its TLB entries and its chunk arrays."""
    est = resources.estimate(load_config(None, ["sim.invariants=false"]))
    pages = 16 * 64 * 256
    vcpu = (96 << 10) + (1536 + 1024 + 16) * 9 + 4096 * 18
    assert est.memory == (330 << 20) + 40 * pages + 16 * vcpu
    assert est.faults == pages and est.accesses == pages  # one memstress pass, every 4K page faults once
    assert est.events == 215 * pages  # two records per fault at the default level


def test_the_estimate_scales_with_what_the_config_sizes() -> None:
    base = resources.estimate(make_config("sim.invariants=false"))
    legacy = resources.estimate(make_config("sim.invariants=false", "mmu.mode=legacy_tdp"))
    checked = resources.estimate(make_config("sim.invariants=true"))
    huge = resources.estimate(make_config("sim.invariants=false", "vm.backing_page_size=2M"))
    dirty = resources.estimate(make_config("selftest.name=dirty_log_perf", "selftest.iterations=3",
                                           "workload.passes=4"))  # fmt: skip
    pages = base.faults
    assert legacy.memory - base.memory == 20 * pages and checked.memory - base.memory == 12 * pages
    assert huge.faults == pages // 512
    assert dirty.faults == 4 * pages and dirty.accesses == 4 * pages
    uniform = resources.estimate(make_config("workload.kind=uniform", "workload.accesses=1000"))
    assert uniform.accesses == 16 * 1000


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["run", *args])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    ("sets", "words"),
    [
        (["workload.per_vcpu_memory=1TiB"], ["16 TiB guest", "vm.vcpus × workload.per_vcpu_memory", "of memory"]),
        (["vm.vcpus=4096", "workload.per_vcpu_memory=4KiB", "tlb.entries_4k=1048576", "tlb.ways_4k=4096"],
         ["4,096 vCPUs", "tlb.entries_*", "of memory"]),
        (["workload.kind=uniform", "workload.accesses=1000000000000"], ["1.6e+13 guest accesses", "at least 9 days"]),
        (["workload.kind=uniform", f"workload.accesses={2**63 - 1}"], ["guest accesses", "days"]),
    ],
)  # fmt: skip
def test_a_bomb_is_refused_with_one_line_and_nothing_written(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sets: list[str],
    words: list[str],
) -> None:
    """The bombs of issue 15's table, on a machine with 23 GiB free (this project's)."""
    monkeypatch.setattr(resources, "available_memory", lambda: 23 * GiB)
    out = tmp_path / "run"
    code, err = _main(capsys, *[a for s in sets for a in ("--set", s)], "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and err.startswith("vsim: error: this run ")
    assert all(w in err for w in words), err
    assert "--force" in err and not out.exists() and not list(tmp_path.iterdir())


def test_memory_is_compared_with_what_the_machine_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quickstart needs about 0.35 GiB: refused on a machine with 100 MiB free, not with 1 GiB."""
    args = ["--set", "vm.vcpus=2", "--set", "workload.per_vcpu_memory=64KiB", "--quiet"]
    monkeypatch.setattr(resources, "available_memory", lambda: 100 << 20)
    code, err = _main(capsys, *args, "--out", str(tmp_path / "a"))
    assert code == 2 and "this machine has 100 MiB available" in err
    monkeypatch.setattr(resources, "available_memory", lambda: GiB)
    code, err = _main(capsys, *args, "--out", str(tmp_path / "b"))
    assert code == 0 and err == ""


def test_events_that_cannot_fit_on_disk_are_refused_and_big_ones_warned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["--set", "vm.vcpus=2", "--set", "workload.per_vcpu_memory=64KiB"]
    monkeypatch.setattr(resources, "free_disk", lambda p: 1000)
    code, err = _main(capsys, *args, "--out", str(tmp_path / "a"))
    assert code == 2 and "of events to" in err and "1000 B free" not in err and "events.level" in err
    code, err = _main(capsys, *args, "--set", "events.level=off", "--out", str(tmp_path / "b"), "--quiet")
    assert code == 0  # no events, no disk check
    monkeypatch.setattr(resources, "free_disk", lambda p: None)
    monkeypatch.setattr(resources, "EVENTS_WARN_BYTES", 1000)
    code, err = _main(capsys, *args, "--out", str(tmp_path / "c"), "--quiet")
    assert code == 0 and err.startswith("vsim: warning: this run writes about ") and err.count("\n") == 1


def test_force_runs_anyway_and_out_of_memory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(*a: object, **k: object) -> None:
        raise MemoryError

    monkeypatch.setattr(resources, "available_memory", lambda: 1)
    monkeypatch.setattr("vsim.runner.run_scenario", oom)
    code, err = _main(capsys, "--force", "--out", str(tmp_path / "run"))
    assert code == 2 and err.startswith("vsim: error: out of memory (the estimate was about ") and err.count("\n") == 1


def test_a_sweep_with_a_point_that_cannot_fit_is_refused_before_it_starts(tmp_path: Path) -> None:
    spec = SweepSpec()
    spec.add_option("grid", "workload.per_vcpu_memory=64KiB,1TiB")
    with pytest.raises(SweepError, match=r"point workload.per_vcpu_memory=1TiB.*this run (needs|writes) about"):
        run_sweep(None, ["vm.vcpus=64"], spec, tmp_path / "s", 1, None, False)  # (64 TiB: 1.3 TB of arrays)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("sets", "words"),
    [
        (["costs.vmexit=9000000000s"], "costs.vmexit: a cost must be at most 1s (got 9000000000s)"),
        (["host_mm.interval=100000000s"], "host_mm.interval: a time or interval must be at most 1000000s"),
    ],
)
def test_costs_and_intervals_are_bounded_so_int64_cannot_overflow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sets: list[str], words: str
) -> None:
    """Issue 15's `costs.vmexit=9000000000s` hung in the vCPU group (int64 overflow): refused."""
    code, err = _main(capsys, *[a for s in sets for a in ("--set", s)], "--out", str(tmp_path / "r"))
    assert code == 2 and words in err and err.count("\n") == 1


def test_a_run_whose_clock_could_wrap_is_refused_even_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """10^12 accesses of 1 s each exceed 2^62 ns: no --force makes that run."""
    sets = ["workload.kind=uniform", "workload.accesses=1000000000000", "costs.guest_access=1s"]
    code, err = _main(capsys, *[a for s in sets for a in ("--set", s)], "--force", "--out", str(tmp_path / "r"))
    assert code == 2 and "beyond the 4.6e+18 ns that vsim's integer clocks hold" in err and err.count("\n") == 1
    cfg = make_config()
    est = resources.estimate(cfg)
    assert resources.sim_time_bound(cfg, est) < 1 << 62  # the quickstart is nowhere near
