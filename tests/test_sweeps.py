"""Sweeps: design expansion, seeds and ids, failure isolation, resume, timeouts, plots, Dask."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vsim
from vsim.sweeps import SweepError, SweepSpec, expand
from vsim.sweeps import sweeper as sweeper_mod
from vsim.sweeps.sweeper import run_sweep
from vsim.sweeps.table import read_table

SMALL = ["workload.per_vcpu_memory=256KiB", "events.level=off"]


def spec(**kw) -> SweepSpec:  # type: ignore[no-untyped-def]
    s = SweepSpec()
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def vsim_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsim", *args], capture_output=True, text=True, cwd=cwd)


def test_grid_zip_replicates_expand_in_design_order() -> None:
    s = spec(
        grid={"vm.vcpus": [1, 2], "vm.backing_page_size": ["4K", "2M"]},
        zip={"workload.write_percent": [0, 100], "workload.access": ["sequential", "random"]},
        replicates=3,
    )
    pts = expand(None, SMALL, s)
    assert len(pts) == 2 * 2 * 2 * 3
    assert [p.factors["vm.vcpus"] for p in pts[:12]] == [1] * 12
    assert [(p.factors["workload.write_percent"], p.factors["workload.access"]) for p in pts[:6:3]] == [
        (0, "sequential"), (100, "random")]  # fmt: skip
    assert pts[0].config.vm.vcpus == 1 and pts[0].config.workload.access == "sequential"
    assert [p.replicate for p in pts[:3]] == [0, 1, 2]
    assert len({p.seed for p in pts}) == len(pts)  # independent streams everywhere
    assert len({p.id for p in pts}) == len(pts)


def test_common_random_numbers_share_seeds_across_levels() -> None:
    pts = expand(None, SMALL, spec(grid={"vm.vcpus": [1, 2, 3]}, replicates=2, common_random_numbers=True))
    by_rep = {r: {p.seed for p in pts if p.replicate == r} for r in (0, 1)}
    assert len(by_rep[0]) == len(by_rep[1]) == 1 and by_rep[0] != by_rep[1]


def test_ids_are_stable_and_follow_the_resolved_config() -> None:
    s = spec(grid={"vm.vcpus": [1, 2]})
    a, b = expand(None, SMALL, s), expand(None, SMALL, s)
    assert [p.id for p in a] == [p.id for p in b]
    c = expand(None, [*SMALL, "costs.vmexit=700ns"], s)
    assert {p.id for p in a}.isdisjoint(p.id for p in c)


def test_zip_lengths_must_match() -> None:
    with pytest.raises(SweepError, match="same length"):
        SweepSpec.from_table({"zip": {"vm.vcpus": [1, 2], "workload.passes": [1]}}, "x.toml")
    with pytest.raises(SweepError, match="sweep.grd: unknown key"):
        SweepSpec.from_table({"grd": {}}, "x.toml")


def test_bad_factor_fails_before_any_run(tmp_path: Path) -> None:
    for grid, expect in (("vm.vcpus=1,0", "vm.vcpus: Input should be greater"), ("vm.vcpu=1,2", "vm.vcpu: unknown")):
        p = vsim_cli("sweep", "--grid", grid, "--out", str(tmp_path / "s"))
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and expect in p.stderr
        assert "Traceback" not in p.stderr
    assert not (tmp_path / "s").exists()


def test_failure_is_isolated_and_resume_reruns_only_what_is_not_done(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    real = sweeper_mod.run_scenario

    def flaky(cfg, out, timeout):  # type: ignore[no-untyped-def]
        calls.append(cfg.vm.vcpus)
        if cfg.vm.vcpus == 2 and len(calls) < 10:
            raise RuntimeError("injected failure")
        return real(cfg, out, timeout)

    monkeypatch.setattr(sweeper_mod, "run_scenario", flaky)
    s = spec(grid={"vm.vcpus": [1, 2, 3]})
    rows, out = run_sweep(None, SMALL, s, tmp_path / "s", 1, None, False)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "RuntimeError: injected failure" in rows[1]["error"] and rows[2]["vcpu_total.pf_fixed"] == 3 * 64
    # Kill point 3 "mid-run": its result is gone and a half-written temp file is left behind.
    p3 = out / "points" / rows[2]["point_id"]
    (p3 / "result.json").unlink()
    (p3 / ".result.json.1234.tmp").write_text('{"status": "ok"')
    calls.clear()
    calls.extend([0] * 10)  # the injected failure is over
    rows2, _ = run_sweep(None, SMALL, s, tmp_path / "s", 1, None, False)
    assert calls[10:] == [2, 3]  # point 1 was done; the failed and the killed ones ran again
    assert not list(p3.glob(".*.tmp"))  # the rerun replaced the point's directory whole, temporaries too
    assert [r["status"] for r in rows2] == ["ok", "ok", "ok"]
    assert read_table(out)[1]["vcpu_total.pf_fixed"] == 2 * 64


def test_results_csv_grows_as_points_finish(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Issue 15 item 7: a sweep stopped after two points (here a Ctrl-C in the third) leaves a
    results.csv with the two, and a resume completes it."""
    real = sweeper_mod.run_scenario

    def stop_at_third(cfg, out, timeout):  # type: ignore[no-untyped-def]
        if cfg.vm.vcpus == 3:
            raise KeyboardInterrupt
        return real(cfg, out, timeout)

    monkeypatch.setattr(sweeper_mod, "run_scenario", stop_at_third)
    s = spec(grid={"vm.vcpus": [1, 2, 3]})
    with pytest.raises(KeyboardInterrupt):
        run_sweep(None, SMALL, s, tmp_path / "s", 1, None, False)
    done = read_table(tmp_path / "s")
    assert [(r["vm.vcpus"], r["status"]) for r in done] == [(1, "ok"), (2, "ok")]
    monkeypatch.setattr(sweeper_mod, "run_scenario", real)
    rows, out = run_sweep(None, SMALL, s, tmp_path / "s", 1, None, False)
    assert [r["vm.vcpus"] for r in read_table(out)] == [1, 2, 3] and all(r["status"] == "ok" for r in rows)


def test_force_still_refuses_a_point_whose_clock_could_wrap(tmp_path: Path) -> None:
    """``vsim sweep --force`` overrides the memory, disk and time estimates, not the int64 bound
    that ``vsim run --force`` keeps too."""
    sets = ["workload.kind=uniform", "workload.accesses=1000000000000", "events.level=off"]
    s = spec(grid={"costs.guest_access": ["1ns", "1s"]}, timeout_ns=2 * 10**9)  # (were it run, it would end)
    with pytest.raises(SweepError, match="integer clocks"):
        run_sweep(None, sets, s, tmp_path / "s", 1, None, False, True)
    assert not (tmp_path / "s").exists()


def test_timeout_and_exit_status_count_failures(tmp_path: Path) -> None:
    # (Long enough that neither finishes within the first steps: a run that ends is not a timeout.)
    p = vsim_cli("sweep", "--grid", "vm.vcpus=2,3", "--set", "workload.per_vcpu_memory=8MiB", "--set",
                 "workload.passes=20000", "--set", "events.level=off", "--timeout", "1us", "--jobs", "1", "--out",
                 str(tmp_path / "s"))  # fmt: skip
    assert p.returncode == 2  # two points failed
    assert "0 of 2 points ok, 2 failed" in p.stdout and "timeout: wall-clock timeout" in p.stdout
    rows = read_table(tmp_path / "s")
    assert [r["status"] for r in rows] == ["timeout", "timeout"]


def test_cli_sweep_writes_table_and_plot_and_python_api_matches(tmp_path: Path) -> None:
    cfg = tmp_path / "sw.toml"
    cfg.write_text('[workload]\nper_vcpu_memory = "1MiB"\n[events]\nlevel = "off"\n'
                   '[sweep]\ngrid = { "vm.vcpus" = [1, 2], "vm.backing_page_size" = ["4K", "2M"] }\n'
                   'replicates = 2\nmetrics = ["sim_time_ns", "vm.pages_2m"]\n')  # fmt: skip
    p = vsim_cli("sweep", str(cfg), "--out", str(tmp_path / "s"), "--jobs", "2")
    assert p.returncode == 0, p.stderr
    rows = read_table(tmp_path / "s")
    assert list(rows[0])[:2] == ["vm.vcpus", "vm.backing_page_size"]
    # 1 MiB per vCPU: only 2 vCPUs fill a whole 2M page that the memslot can map huge.
    assert [r["vm.pages_2m"] for r in rows if r["replicate"] == 0] == [0, 0, 0, 1]
    png = tmp_path / "s" / "sim_time_ns_vs_vm_vcpus.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and f"plot: {png}" in p.stdout
    q = vsim_cli("plot", str(tmp_path / "s"), "--x", "vm.vcpus", "--y", "vm.pages_2m", "--hue",
                 "vm.backing_page_size", "--logx", "-o", str(tmp_path / "p.png"))  # fmt: skip
    assert q.returncode == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    bad = vsim_cli("plot", str(tmp_path / "s"), "--x", "vm.nope", "--y", "sim_time_ns")
    assert bad.returncode == 2 and "not a column" in bad.stderr
    api = vsim.sweep(cfg, out=tmp_path / "s", jobs=1, progress=False)  # resumes: every point is done
    assert [r["sim_time_ns"] for r in api] == [r["sim_time_ns"] for r in rows]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dask_loopback_cluster_matches_local(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                              "--port", str(port), "--no-dashboard"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", addr, "--nthreads", "1",
                               "--no-dashboard", "--local-directory", str(tmp_path / "dw")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        from distributed import Client

        deadline = time.time() + 60
        while True:
            try:
                with Client(addr, timeout="5s") as c:
                    c.wait_for_workers(1, timeout=60)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        s = spec(grid={"vm.vcpus": [1, 3]}, zip={"workload.access": ["sequential", "random"]}, replicates=2)
        local, _ = run_sweep(None, SMALL, s, tmp_path / "local", 2, None, False)
        remote, _ = run_sweep(None, SMALL, s, tmp_path / "dask", None, addr, False)
        strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
        assert strip(remote) == strip(local) and all(r["status"] == "ok" for r in remote)
        a = json.loads((tmp_path / "local" / "points" / local[0]["point_id"] / "stats.json").read_text())
        b = json.loads((tmp_path / "dask" / "points" / local[0]["point_id"] / "stats.json").read_text())
        assert a == b
    finally:
        for proc in (worker, sched):
            proc.terminate()
            proc.wait(timeout=30)


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            kids.update(int(x) for x in task.read_text().split())
    return kids


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(p)
    return alive


# A local sweep of 8 points on 2 workers that runs for a few seconds (faults in Python, so that a
# second command can start while it runs).
EIGHT_POINTS = ["sweep", "--grid", "vm.vcpus=1,2,3,4,5,6,7,8", "--set", "workload.per_vcpu_memory=32MiB", "--set",
                "sim.fault_kernel=false", "--set", "events.level=off", "--jobs", "2"]  # fmt: skip


def _start_sweep(out: Path) -> tuple[subprocess.Popen[str], set[int]]:
    """A local sweep of 8 points on 2 workers, once it has finished a point: ``(process, workers)``."""
    args = [sys.executable, "-m", "vsim", *EIGHT_POINTS, "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: set[int] = set()
    before = len(list(out.glob("points/*/result.json")))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        workers |= _children(proc.pid)
        if len(list(out.glob("points/*/result.json"))) > before:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be stopped"
    return proc, workers | _children(proc.pid)


def test_ctrl_c_and_kill_stop_a_sweep_and_its_workers_and_resume_runs_each_point_once(tmp_path: Path) -> None:
    """Issue 15 item 4: SIGINT stops a sweep within a couple of seconds with one line, no traceback
    and no worker left; SIGKILL of the sweep takes its workers with it (no orphan runs the queue);
    the points finished before are kept, and the resume runs only the others."""
    import signal

    out = tmp_path / "s"
    proc, workers = _start_sweep(out)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 5 and proc.returncode == 130
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "interrupted" in err, err
    time.sleep(0.5)
    assert workers and not _alive(workers)
    kept = {p.parent.name: p.stat().st_mtime_ns for p in (out / "points").glob("*/result.json")}
    assert 1 <= len(kept) < 8 and len(read_table(out)) == len(kept)
    proc, workers = _start_sweep(out)  # the resume; killed outright this time
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    time.sleep(1)
    assert workers and not _alive(workers)
    r = vsim_cli(*EIGHT_POINTS, "--out", str(out))
    assert r.returncode == 0, r.stderr
    done = {p.parent.name: p.stat().st_mtime_ns for p in (out / "points").glob("*/result.json")}
    assert len(done) == 8 and all(done[k] == t for k, t in kept.items())  # none of the first ones ran again
    assert [row["status"] for row in read_table(out)] == ["ok"] * 8


def test_a_second_sweep_on_the_same_directory_refuses_and_no_point_runs_twice(tmp_path: Path) -> None:
    """Issue 15 item 5: while a sweep runs, another on its directory refuses with one line (exit 2)
    and writes nothing; the first runs every point once; afterwards the same command finds all
    done and runs none."""
    out = tmp_path / "s"
    first, _ = _start_sweep(out)
    r = vsim_cli(*EIGHT_POINTS, "--out", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"another sweep (pid {first.pid}) is running" in r.stderr
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    done = {p.parent.name: p.stat().st_mtime_ns for p in (out / "points").glob("*/result.json")}
    assert len(done) == 8 and [row["status"] for row in read_table(out)] == ["ok"] * 8
    again = vsim_cli(*EIGHT_POINTS, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert {p.parent.name: p.stat().st_mtime_ns for p in (out / "points").glob("*/result.json")} == done
