"""``vsim sweep`` and ``vsim plot``. Bad input is one line and exit 2 before any point runs; a
finished sweep exits with the number of failed points (capped at 100; 0 when all succeeded)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from vsim.sweeps.spec import SweepError, SweepSpec
from vsim.sweeps.table import spec_for
from vsim.units import parse_duration


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sweep", help="run a parameter sweep (local processes or a Dask cluster)")
    s.add_argument("config", nargs="?", help="scenario TOML, optionally with a [sweep] table")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...", help="a crossed factor")
    s.add_argument("--zip", action="append", default=[], metavar="KEY=V1,V2,...", help="a lock-step factor")
    s.add_argument("--replicates", type=int, help="runs per design point, with independent seeds")
    s.add_argument("--crn", action="store_true", help="common random numbers: the same seeds at every point")
    s.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="fixed override")
    s.add_argument("--seed", type=int, help="root seed of the sweep (same as --set seed=N)")
    s.add_argument("--metrics", help="comma-separated stats.json keys for the table")
    s.add_argument("--timeout", help="wall-clock limit per point, e.g. 600s")
    s.add_argument("--out", type=Path, help="sweep directory (default: sweeps/<name>-<hash>)")
    s.add_argument("--jobs", type=int, help="local worker processes (default: all cores)")
    s.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="run on this Dask distributed scheduler")
    s.add_argument("--force", action="store_true", help="run even if the up-front estimate says a point cannot finish")
    p = sub.add_parser("plot", help="plot a sweep's metric against a factor")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--x", required=True, help="factor on the x axis, e.g. vm.vcpus")
    p.add_argument("--y", required=True, help="metric, e.g. sim_time_ns")
    p.add_argument("--hue", help="factor that splits the lines")
    p.add_argument("--logx", action="store_true")
    p.add_argument("-o", "--output", type=Path, help="PNG path (default: in SWEEP_DIR)")


def _spec(args: argparse.Namespace) -> SweepSpec:
    spec = spec_for(args.config, None) if args.config and not (args.grid or args.zip) else SweepSpec()
    for item in args.grid:
        spec.add_option("grid", item)
    for item in args.zip:
        spec.add_option("zip", item)
    if args.replicates is not None:
        if args.replicates < 1:
            raise SweepError("--replicates: must be at least 1")
        spec.replicates = args.replicates
    if args.crn:
        spec.common_random_numbers = True
    if args.metrics:
        spec.metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    if args.timeout:
        try:
            spec.timeout_ns = parse_duration(args.timeout)
        except ValueError as e:
            raise SweepError(f"--timeout: {e}") from None
    return spec_for(args.config, spec)


def run_sweep_cli(args: argparse.Namespace) -> int:
    from vsim.cli import Terminated, raise_terminated
    from vsim.sweeps.plot import plot
    from vsim.sweeps.sweeper import run_sweep

    sets = list(args.sets) + ([f"seed={args.seed}"] if args.seed is not None else [])
    spec = _spec(args)
    signal.signal(signal.SIGTERM, raise_terminated)  # unwinds like Ctrl-C: the workers stop with the sweep
    try:
        rows, out = run_sweep(args.config, sets, spec, args.out, args.jobs, args.scheduler, None, args.force)
    except (KeyboardInterrupt, Terminated) as e:
        word = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"vsim: {word}: the points finished so far are kept (results.csv); the same command resumes the "
              "sweep", file=sys.stderr)  # fmt: skip
        return 143 if isinstance(e, Terminated) else 130
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"{len(rows) - failed} of {len(rows)} points ok, {failed} failed")
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['point_id']}: {r['status']}: {r['error']}")
    print(f"results: {out / 'results.csv'}")
    if failed < len(rows) and spec.factors:
        x = spec.factors[0]
        levels = {**spec.grid, **spec.zip}
        hue = next((f for f in spec.factors[1:] if len(set(map(str, levels[f]))) > 1), None)
        png = plot(out, x, spec.metrics[0], hue)
        print(f"plot: {png}")
    return min(failed, 100)


def run_plot_cli(args: argparse.Namespace) -> int:
    from vsim.sweeps.plot import plot

    print(f"wrote {plot(args.sweep_dir, args.x, args.y, args.hue, args.logx, args.output)}")
    return 0
