"""The ``vsim`` command line. Bad input prints one line and exits 2, with no traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from vsim.config import ConfigError, load_config

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
    r.add_argument("--out", type=Path, help="run directory (default: runs/<name>-seed<N>-<config hash>)")
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

    name = Path(args.config).stem if args.config else "quickstart"
    out = args.out if args.out is not None else default_out_dir(cfg, name)
    if out.exists() and not out.is_dir():
        print(f"vsim: error: --out {out}: exists and is not a directory", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = run_scenario(cfg, out, on_compile=_say_compiling)
    except OSError as e:
        print(f"vsim: error: {out}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    if not args.quiet:
        print_summary(result.stats, result.timing, f"vsim run: {name} (seed {cfg.seed})")
    print(f"run directory: {result.out_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
