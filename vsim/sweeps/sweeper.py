"""Running a sweep: each point in its own run directory, locally or on a Dask cluster, resumable.

Each point runs ``vsim run``'s code into ``SWEEP_DIR/points/<id>/`` and ends by writing
``result.json`` atomically. A point counts as done only when that file says ``ok``: re-running the
same sweep skips those points and runs the failed or missing ones again. A failing point never stops
the others: its error is recorded in its result. The table of results (``results.csv``, plus
``results.parquet`` when pyarrow is installed) has one row per point and replicate: the factor
columns first, then the metrics from ``stats.json``, the status and the wall time.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vsim.config import ScenarioConfig, dump_config
from vsim.resources import sweep_refusal
from vsim.runner import collect_stats, run_scenario, write_atomic
from vsim.sweeps.spec import Point, SweepError, SweepSpec, expand
from vsim.vm import Vm, WallClockTimeout

Task = dict[str, Any]


def metric(stats: dict[str, Any], path: str) -> Any:
    node: Any = stats
    for part in path.split("."):
        node = node[part]
    return node


def check_metrics(cfg: ScenarioConfig, metrics: tuple[str, ...]) -> None:
    """Fail before any run if a metric is not a number in stats.json."""
    shape = collect_stats(Vm(cfg.model_copy(update={"sim": cfg.sim.model_copy(update={"invariants": False})})), 0)
    for m in metrics:
        try:
            v = metric(shape, m)
        except (KeyError, TypeError):
            v = None
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise SweepError(f"--metrics: '{m}' is not a number in stats.json (e.g. vcpu_total.pf_fixed, sim_time_ns)")


def run_point(task: Task) -> Task:
    """Run one point (in a worker process or a Dask worker) and write its ``result.json``."""
    out = Path(task["dir"])
    out.mkdir(parents=True, exist_ok=True)
    result = {k: task[k] for k in ("id", "replicate", "seed", "factors")}
    t0 = time.perf_counter()
    try:
        import tomllib

        from vsim.config.schema import ScenarioConfig as _Cfg

        cfg = _Cfg.model_validate(tomllib.loads(task["config"]))
        res = run_scenario(cfg, out, task["timeout_s"])
        result.update(status="ok", error="", metrics={m: metric(res.stats, m) for m in task["metrics"]})
    except WallClockTimeout as e:
        result.update(status="timeout", error=str(e), metrics={})
    except Exception as e:  # a failing point is recorded, never fatal to the sweep
        last = traceback.extract_tb(e.__traceback__)[-1]
        result.update(status="failed", error=f"{type(e).__name__}: {e} ({Path(last.filename).name}:{last.lineno})",
                      metrics={})  # fmt: skip
    result["wall_s"] = round(time.perf_counter() - t0, 3)
    write_atomic(out / "result.json", json.dumps(result, indent=1) + "\n")
    return result


def _done(d: Path) -> Task | None:
    try:
        r = json.loads((d / "result.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return r if r.get("status") == "ok" else None


SCHEDULER_CONNECT_S = 5  # how long --scheduler may take to answer before the sweep gives up


def _connect(scheduler: str) -> Any:
    """A Dask ``Client`` of ``scheduler``, before the sweep writes anything; one line if it cannot."""
    try:
        from distributed import Client
    except ImportError:
        raise SweepError("--scheduler needs Dask distributed: pip install 'vsim[cluster]'") from None
    try:
        return Client(scheduler, timeout=f"{SCHEDULER_CONNECT_S}s")
    except (OSError, TimeoutError) as e:
        raise SweepError(f"--scheduler {scheduler}: cannot connect within {SCHEDULER_CONNECT_S} s ({e})") from None


def _execute(tasks: list[Task], jobs: int, client: Any, on_done: Callable[[Task], None],
             on_start: Callable[[int], None]) -> None:  # fmt: skip
    """Run ``tasks`` on the Dask ``client`` (``_connect``), else on ``jobs`` local processes."""
    if client is not None:
        from distributed import as_completed as dask_completed

        with client:
            futures = client.map(run_point, tasks, pure=False)
            on_start(len(tasks))
            for f in dask_completed(futures):
                on_done(f.result())
        return
    if jobs <= 1:
        for t in tasks:
            on_start(1)
            on_done(run_point(t))
        return
    pool = ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        futs = [pool.submit(run_point, t) for t in tasks]
        on_start(min(jobs, len(tasks)))
        for f in as_completed(futs):
            on_done(f.result())
    except BaseException:  # Ctrl-C, SIGTERM, a failure here: stop the workers now, not after the queue
        for proc in list(pool._processes.values()):
            proc.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def _worker_init(parent: int) -> None:
    """A local pool worker: Ctrl-C is the sweep's to handle (it stops the workers at once, so none
    prints a traceback), and the worker dies with the sweep (``PR_SET_PDEATHSIG``), so a killed
    sweep leaves no orphan running its queue."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the sweep died before the prctl
        os._exit(1)


def sweep(config: str | Path | None = None, sets: list[str] | None = None, spec: SweepSpec | None = None,
          out: str | Path | None = None, jobs: int | None = None, scheduler: str | None = None,
          progress: bool | None = None) -> Any:  # fmt: skip
    """Run a sweep and return its results table: a pandas DataFrame when pandas is installed,
    otherwise a list of row dicts. ``spec`` defaults to the file's ``[sweep]`` table."""
    rows, _ = run_sweep(config, sets or [], spec, out, jobs, scheduler, progress)
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows)


def run_sweep(config: str | Path | None, sets: list[str], spec: SweepSpec | None, out: str | Path | None,
              jobs: int | None, scheduler: str | None, progress: bool | None,
              force: bool = False) -> tuple[list[Task], Path]:  # fmt: skip
    """Expand, validate, run what is not done yet, and write the results table. A sweep with a
    point that cannot finish here (``resources.sweep_refusal``) is refused unless ``force``."""
    from vsim.sweeps.table import spec_for, write_table

    spec = spec_for(config, spec)
    points = expand(str(config) if config is not None else None, sets, spec)
    check_metrics(points[0].config, spec.metrics)
    out_dir = Path(out) if out is not None else _default_dir(config, points)
    results, todo = _scan(points, out_dir, spec)
    jobs = jobs or os.cpu_count() or 1
    if todo:
        pending = {t["id"] for t in todo}
        named = [(" ".join(f"{k}={v}" for k, v in p.factors.items()) or p.id, p.config) for p in points
                 if p.id in pending]  # fmt: skip
        why = sweep_refusal(named, min(jobs, len(todo)), scheduler is None, out_dir, force)
        if why:
            raise SweepError(why)
    client = _connect(scheduler) if todo and scheduler is not None else None
    out_dir.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir):
        # Under the lock, what is done is final: read it again (another sweep may have just ended).
        results, todo = _scan(points, out_dir, spec)
        if client is not None and not todo:
            client.close()
        console = Console(stderr=True)
        show = console.is_terminal if progress is None else progress
        bar = Progress(TextColumn("[bold]sweep"), BarColumn(), TextColumn("{task.fields[status]}"),
                       TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                       disable=not show)  # fmt: skip
        counts = {"done": len(results), "failed": 0, "running": 0}
        workers = [1]

        def status() -> str:
            return f"{counts['done']}/{len(points)} done, {counts['failed']} failed, {counts['running']} running"

        with bar:
            tid = bar.add_task("sweep", total=len(points), completed=len(results), status=status())

            def started(n: int) -> None:
                workers[0] = n
                counts["running"] = min(n, len(todo))
                bar.update(tid, status=status())

            def finished(r: Task) -> None:
                results[r["id"]] = r
                counts["done" if r["status"] == "ok" else "failed"] += 1
                left = len(points) - counts["done"] - counts["failed"]
                counts["running"] = min(workers[0], left)
                bar.update(tid, advance=1, status=status())
                # results.csv grows as points finish (in point order), so a stopped sweep has one.
                write_table(out_dir, [_row(p, results[p.id], spec) for p in points if p.id in results], parquet=False)

            if todo:
                _execute(todo, jobs, client, finished, started)
        rows = [_row(p, results[p.id], spec) for p in points]
        write_table(out_dir, rows)
        write_atomic(out_dir / "sweep.json", json.dumps({"factors": spec.factors, "metrics": list(spec.metrics),
                                                         "points": len(points)}, indent=1) + "\n")  # fmt: skip
        return rows, out_dir


def _scan(points: list[Point], out_dir: Path, spec: SweepSpec) -> tuple[dict[str, Task], list[Task]]:
    """The points already done (their results, by id) and the tasks of the others."""
    results: dict[str, Task] = {}
    todo: list[Task] = []
    for p in points:
        d = out_dir / "points" / p.id
        prev = _done(d)
        if prev is not None and sorted(prev.get("metrics", {})) == sorted(spec.metrics):
            results[p.id] = prev
        else:
            todo.append(_task(p, d, spec))
    return results, todo


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Hold ``SWEEP_DIR/.lock`` while the sweep runs, so that a second sweep on the directory
    refuses instead of running its points again. (``flock``: the kernel drops the lock when the
    process ends, however it ends, so a killed sweep never leaves the directory locked.)"""
    with open(out_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise SweepError(f"{out_dir}: another sweep (pid {holder}) is running in this directory; wait for it, "
                             "or give another --out") from None  # fmt: skip
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def _task(p: Point, d: Path, spec: SweepSpec) -> Task:
    return {"id": p.id, "replicate": p.replicate, "seed": p.seed, "factors": p.factors, "dir": str(d),
            "config": dump_config(p.config), "metrics": list(spec.metrics),
            "timeout_s": None if spec.timeout_ns is None else spec.timeout_ns / 1e9}  # fmt: skip


def _row(p: Point, r: Task, spec: SweepSpec) -> dict[str, Any]:
    row: dict[str, Any] = dict(p.factors)
    row.update(replicate=p.replicate, seed=p.seed, point_id=p.id)
    for m in spec.metrics:
        row[m] = r.get("metrics", {}).get(m)
    row.update(status=r["status"], wall_s=r["wall_s"], error=r["error"])
    return row


def _default_dir(config: str | Path | None, points: list[Point]) -> Path:
    import hashlib

    name = Path(config).stem if config is not None else "quickstart"
    digest = hashlib.sha256("".join(p.id for p in points).encode()).hexdigest()[:10]
    return Path("sweeps") / f"{name}-{digest}"
