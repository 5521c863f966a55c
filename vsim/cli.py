"""The ``vsim`` command line. Bad input prints one line and exits 2, with no traceback."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import NoReturn

from vsim import resources
from vsim.config import ConfigError, load_config
from vsim.progress import RunProgress
from vsim.units import parse_duration

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"vsim: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vsim", description="Discrete-event simulator of the KVM x86 MMU with many vCPUs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="simulate one scenario and write a run directory")
    r.add_argument("config", nargs="?", help="scenario TOML file (default: the built-in quickstart scenario)")
    r.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set vm.vcpus=64 (repeatable)",
    )
    r.add_argument("--out", help="run directory (default: runs/<name>-seed<N>-<config hash>)")
    r.add_argument("--force", action="store_true",
                   help="replace the run that --out already holds, and run even if the up-front estimate says "
                        "the run cannot finish here")  # fmt: skip
    r.add_argument(
        "--max-wall",
        metavar="DURATION",
        help="stop the run after this much wall time (e.g. 30s) and write what it reached, marked partial",
    )
    r.add_argument("--seed", type=int, help="random seed (same as --set seed=N)")
    r.add_argument("--quiet", action="store_true", help="print only the run directory")
    from vsim import cli_events, cli_sweep

    cli_events.add_parsers(sub, _Parser)
    cli_sweep.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    from vsim.cli_events import run_events, run_report
    from vsim.cli_sweep import run_plot_cli, run_sweep_cli
    from vsim.events.reader import EventLogError

    commands = {"events": run_events, "report": run_report, "sweep": run_sweep_cli, "plot": run_plot_cli}
    try:
        return commands[args.command](args)
    except (EventLogError, ConfigError) as e:
        print(f"vsim: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `vsim events ... filter | head`
        sys.stderr.close()
        return 0


def _say_compiling() -> None:
    print("vsim: compiling kernels (first run only; they are cached)", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    sets = list(args.sets)
    if args.seed is not None:
        sets.append(f"seed={args.seed}")
    try:
        cfg = load_config(args.config, sets)
    except ConfigError as e:
        print(f"vsim: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from vsim.runner import default_out_dir, run_scenario
    from vsim.summary import print_summary

    max_wall = None
    if args.max_wall is not None:
        try:
            max_wall = parse_duration(args.max_wall) / 1e9
        except ValueError as e:
            print(f"vsim: error: --max-wall: {e}", file=sys.stderr)
            return EXIT_USAGE
        if max_wall <= 0:
            print("vsim: error: --max-wall: must be more than 0s", file=sys.stderr)
            return EXIT_USAGE
    name = Path(args.config).stem if args.config else "quickstart"
    if args.out == "":
        print("vsim: error: --out '': give a directory (an empty --out would write into the current directory)",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    out = Path(args.out) if args.out is not None else default_out_dir(cfg, name)
    problem = _out_problem(out, args.out is not None, args.force)
    if problem:
        print(f"vsim: error: --out {out}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    est = resources.estimate(cfg)
    why = None
    if not args.force:
        disk = resources.free_disk(out) if cfg.events.level != "off" else None
        why = resources.refusal(est, out, resources.available_memory(), disk)
    why = why or resources.overflow_refusal(cfg, est)  # (not even --force: the clocks would wrap)
    if why:
        print(f"vsim: error: {why}", file=sys.stderr)
        return EXIT_USAGE
    for w in resources.warnings(est):
        print(f"vsim: warning: {w}", file=sys.stderr)
    # SIGTERM unwinds like Ctrl-C, so the unfinished run's directory is removed either way.
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        with RunProgress(est.accesses) as progress:
            result = run_scenario(cfg, out, on_compile=_say_compiling, progress=progress.update, max_wall_s=max_wall)
    except OSError as e:
        print(f"vsim: error: {out}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print(f"vsim: error: out of memory (the estimate was about {resources.size_text(est.memory)}); lower the "
              f"sizes. {out} {_kept(out)}", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    except (KeyboardInterrupt, Terminated) as e:
        print(f"vsim: {'terminated' if isinstance(e, Terminated) else 'interrupted'}: {out} {_kept(out)}",
              file=sys.stderr)  # fmt: skip
        return 143 if isinstance(e, Terminated) else 130
    if not args.quiet:
        print_summary(result.stats, result.timing, f"vsim run: {name} (seed {cfg.seed})")
    if "partial" in result.stats:
        print(f"vsim: {result.stats['partial']}: the results are partial", file=sys.stderr)
    print(f"run directory: {result.out_dir}")
    return 0


def _kept(out: Path) -> str:
    return "keeps the earlier run" if (out / "config.toml").is_file() else "was not written"


class Terminated(Exception):
    """SIGTERM, raised where the run is so that it unwinds."""


def raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


# What a run directory holds (``runner.run_scenario``, ``vsim report``), and its writers' temporaries.
RUN_FILES = frozenset({"config.toml", "stats.json", "timing.json", "events.jsonl", "report.html", "status"})


def _out_problem(out: Path, explicit: bool, force: bool) -> str | None:
    """Why ``vsim run`` may not write into ``out``, or None. A directory holding a run is replaced
    whole once the new run is complete (``runner.run_scenario``): the default directory of a rerun
    always, one named with ``--out`` only with ``--force``. A directory holding anything else is
    never touched."""
    try:
        if out.exists() and not out.is_dir():
            return "exists and is not a directory"
        if not out.is_dir():
            return None
        entries = list(out.iterdir())
    except OSError as e:  # a name or path too long, no permission to look, a loop of links
        return e.strerror or str(e)
    if not entries:
        return None
    others = sorted(e.name for e in entries if not _run_file(e))
    if others or not (out / "config.toml").is_file():
        first = others[0] if others else sorted(e.name for e in entries)[0]
        return f"is not empty and holds no vsim run (it has {first!r}); give another directory"
    if explicit and not force:
        return "holds a run already; --force replaces it"
    if out.resolve() == Path.cwd():
        return "is the current directory, which a run cannot replace whole; give a subdirectory"
    return None  # run_scenario replaces it whole when the new run is complete


def _run_file(e: Path) -> bool:
    """A file a run directory holds, or a temporary its writers leave (``.NAME.PID.tmp``)."""
    return e.is_file() and (e.name in RUN_FILES or (e.name.startswith(".") and e.name.endswith(".tmp")))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
