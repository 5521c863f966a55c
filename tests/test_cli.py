"""The vsim command end to end: run directories, determinism and clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_FILES = ["config.toml", "events.jsonl", "stats.json", "status", "timing.json"]
SMALL = ["--set", "vm.vcpus=3", "--set", "workload.per_vcpu_memory=256KiB", "--set", "sim.invariants=true"]


def vsim(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsim", *args], capture_output=True, text=True, cwd=cwd)


def test_run_writes_the_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = vsim("run", str(ROOT / "configs" / "quickstart.toml"), *SMALL, "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "pf_taken" in p.stdout and f"run directory: {out}" in p.stdout
    assert sorted(x.name for x in out.iterdir()) == RUN_FILES
    assert (out / "status").read_text() == "complete\n"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["vcpu_total"]["pf_fixed"] == 3 * 64
    assert stats["invariant_violations"] == []
    timing = json.loads((out / "timing.json").read_text())
    assert timing["simpy_events"] > 0 and timing["peak_rss_bytes"] > 0
    # The resolved config reproduces the run byte for byte.
    again = tmp_path / "again"
    assert vsim("run", str(out / "config.toml"), "--out", str(again), "--quiet").returncode == 0
    assert (again / "stats.json").read_bytes() == (out / "stats.json").read_bytes()
    assert (again / "events.jsonl").read_bytes() == (out / "events.jsonl").read_bytes()


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    args = [*SMALL, "--set", "workload.access=random", "--set", "workload.write_percent=50", "--quiet"]
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert vsim("run", *args, "--seed", seed, "--out", str(tmp_path / name)).returncode == 0
    read = lambda n, f: (tmp_path / n / f).read_bytes()  # noqa: E731
    assert read("a", "stats.json") == read("b", "stats.json")
    assert read("a", "events.jsonl") == read("b", "events.jsonl")
    assert read("a", "events.jsonl") != read("c", "events.jsonl")


def test_default_run_directory_is_named_after_config(tmp_path: Path) -> None:
    p = vsim("run", *SMALL, "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("quickstart-seed1-")


def main_in_process(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str]:
    """``vsim ARGS`` in this process: its exit status and what it printed to stderr."""
    from vsim import cli

    capsys.readouterr()
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse's errors
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[vm]\nvcpus = -4\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["run", str(bad)], "bad.toml:2: vm.vcpus"),
        (["run", "--set", "vm.nope=1"], "vm.nope: unknown key"),
        (["run", "--set", "costs.vmexit=fast"], "costs.vmexit"),
        (["run", str(tmp_path / "missing.toml")], "no such config file"),
        (["run", "--out", str(afile)], "not a directory"),
        (["run", "--seed", "x"], "invalid int value"),
        (["frobnicate"], "invalid choice"),
    ]
    p = vsim(*cases[0][0])  # one end to end; the rest in this process (an exception would fail the test)
    assert p.returncode == 2 and "Traceback" not in p.stderr and cases[0][1] in p.stderr, p.stderr
    for args, expect in cases[1:]:
        code, err = main_in_process(capsys, args)
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], (args, err)
    assert afile.read_text() == "x"
    assert not (tmp_path / "runs").exists()


def test_path_and_file_errors_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 item 6: a config that is a FIFO or a device (which would block or never end), one
    too large to be a config, one that is not UTF-8, a path through a file, an ``--out`` name or
    path too long for the file system, and a Dask scheduler nobody answers each give one line and
    exit 2, quickly and before anything is written."""
    import os
    import threading
    import time

    from vsim.sweeps import sweeper

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    # Should vsim ever read the FIFO, a writer unblocks it after a while, so the test fails, not hangs.
    unblock = threading.Timer(10, lambda: fifo.write_text("[vm]\n"))
    unblock.daemon = True
    unblock.start()
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * 200_000)  # 2 MB of comments: valid TOML, not a config
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"# caf\xe9\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["run", str(fifo)], "not a regular file"),
        (["run", "/dev/zero"], "not a regular file"),
        (["run", str(tmp_path)], "a directory"),
        (["run", str(big)], "too large for a config file"),
        (["run", str(latin)], "not UTF-8"),
        (["run", str(afile / "x.toml")], "Not a directory"),
        (["run", *SMALL, "--out", str(tmp_path / ("a" * 300))], "File name too long"),
        (["run", *SMALL, "--out", str(tmp_path / "/".join(["b" * 200] * 25))], "too long"),
    ]
    for args, expect in cases:
        code, err = main_in_process(capsys, args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expect in lines[0], (args, err)
    monkeypatch.setattr(sweeper, "SCHEDULER_CONNECT_S", 1)
    t0 = time.monotonic()
    code, err = main_in_process(capsys, ["sweep", "configs/sweep_mmu_scaling.toml", "--scheduler", "tcp://127.0.0.1:9",
                                         "--out", str(tmp_path / "sweep")])  # fmt: skip
    assert code == 2 and "cannot connect within 1 s" in err and len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - t0 < 15
    assert sorted(x.name for x in tmp_path.iterdir()) == ["afile", "big.toml", "fifo.toml", "latin.toml"]
    unblock.cancel()


def test_an_existing_run_is_replaced_whole_only_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 item 6: ``--out`` on a run refuses without ``--force``, which replaces the run whole
    (no stale ``report.html`` beside the new results); a directory holding anything else, and an
    empty ``--out``, are refused; the default directory of a rerun is replaced."""
    out = tmp_path / "run"
    assert vsim("run", *SMALL, "--quiet", "--out", str(out)).returncode == 0
    (out / "report.html").write_text("old")
    (out / ".events.jsonl.99.tmp").write_text("half")
    stats = (out / "stats.json").read_bytes()
    code, err = main_in_process(capsys, ["run", *SMALL, "--quiet", "--seed", "2", "--out", str(out)])
    assert code == 2 and "--force replaces it" in err
    assert (out / "stats.json").read_bytes() == stats and (out / "report.html").exists()  # untouched
    assert vsim("run", *SMALL, "--quiet", "--seed", "2", "--out", str(out), "--force").returncode == 0
    assert sorted(x.name for x in out.iterdir()) == RUN_FILES
    assert (out / "status").read_text() == "complete\n"
    assert (out / "stats.json").read_bytes() != stats
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep")
    code, err = main_in_process(capsys, ["run", *SMALL, "--quiet", "--out", str(other), "--force"])
    assert code == 2 and "holds no vsim run" in err and (other / "todo.txt").read_text() == "keep"
    monkeypatch.chdir(tmp_path)
    code, err = main_in_process(capsys, ["run", *SMALL, "--quiet", "--out", ""])
    assert code == 2 and "empty --out" in err and not (tmp_path / "config.toml").exists()
    for _ in range(2):  # a rerun into the default directory
        assert vsim("run", *SMALL, "--quiet", cwd=tmp_path).returncode == 0


def test_a_run_killed_midway_leaves_the_old_run_whole(tmp_path: Path) -> None:
    """Issue 15 item 6: a run directory is committed as a whole. A rerun killed (SIGKILL) or stopped
    before it finishes leaves the old run exactly as it was, never a mixture; the next run clears
    what the killed one left beside it."""
    import signal
    import time

    from vsim.config import load_config
    from vsim.runner import run_scenario
    from vsim.vm import WallClockTimeout

    out = tmp_path / "run"
    assert vsim("run", *SMALL, "--quiet", "--out", str(out)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(WallClockTimeout):  # stopped by its wall-clock limit
        run_scenario(load_config(None, ["vm.vcpus=16", "workload.per_vcpu_memory=64MiB"]), out, 1e-6)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    big = ["--set", "vm.vcpus=16", "--set", "workload.per_vcpu_memory=256MiB"]
    proc = subprocess.Popen([sys.executable, "-m", "vsim", "run", *big, "--out", str(out), "--force", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old run, untouched
    assert vsim("run", *SMALL, "--quiet", "--seed", "3", "--out", str(out), "--force").returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the killed run's directory is gone
    assert (out / "stats.json").read_bytes() != before["stats.json"]


@pytest.mark.parametrize(("sig", "code", "word"), [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_ctrl_c_or_sigterm_stops_a_run_with_one_line(tmp_path: Path, sig: str, code: int, word: str) -> None:
    """Issue 15 item 4: Ctrl-C (or SIGTERM) on ``vsim run`` stops it with one line and no
    traceback; the unfinished run's directory is removed and the earlier run stays."""
    import signal
    import time

    out = tmp_path / "run"
    assert vsim("run", *SMALL, "--quiet", "--out", str(out)).returncode == 0
    before = (out / "stats.json").read_bytes()
    big = ["--set", "vm.vcpus=16", "--set", "workload.per_vcpu_memory=256MiB"]
    proc = subprocess.Popen([sys.executable, "-m", "vsim", "run", *big, "--out", str(out), "--force", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=30)  # (it stops: the run would take far longer)
    assert proc.returncode == code and "Traceback" not in err
    assert err.strip().splitlines() == [f"vsim: {word}: {out} keeps the earlier run"]
    assert (out / "stats.json").read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["run"]
