"""``vsim events RUN_DIR {summary,filter,latency,timeline}`` and ``vsim report RUN_DIR``.

Every problem with the arguments or the log is one line on stderr and exit status 2; a truncated
log still gives everything before the damage, with a warning on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vsim.events.latency import collect, histogram, percentile_row
from vsim.events.reader import EventLogError, Selection, iter_events, iter_lines
from vsim.events.summary import summarize
from vsim.events.timeline import build_trace
from vsim.units import parse_duration


def add_parsers(sub: argparse._SubParsersAction, parser_class: type) -> None:
    e = sub.add_parser("events", help="inspect a run's event log")
    e.add_argument("run_dir", type=Path, help="a run directory written by vsim run")
    es = e.add_subparsers(dest="events_command", required=True, parser_class=parser_class)
    window = argparse.ArgumentParser(add_help=False)
    window.add_argument("--from", dest="t_from", metavar="TIME", help="window start, e.g. 2ms (inclusive)")
    window.add_argument("--to", dest="t_to", metavar="TIME", help="window end, e.g. 5ms (exclusive)")
    es.add_parser("summary", parents=[window], help="kvm_stat-like counts: exits by reason, faults by outcome")
    f = es.add_parser("filter", parents=[window], help="print the selected events, streaming")
    f.add_argument("--kind", action="append", default=[], help="event kind (repeatable)")
    f.add_argument("--vcpu", action="append", type=int, default=[], help="vCPU index (repeatable)")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--gfn", metavar="A[-B]", help="guest frame or half-open range [A, B); hex or decimal")
    g.add_argument("--gpa", metavar="A[-B]", help="guest physical address or half-open range [A, B)")
    f.add_argument("--table", action="store_true", help="aligned columns instead of JSON lines")
    lat = es.add_parser("latency", parents=[window], help="percentiles and histograms of span durations")
    lat.add_argument("--by-vcpu", action="store_true", help="one row per vCPU")
    t = es.add_parser("timeline", parents=[window], help="Chrome trace-event JSON for Perfetto")
    t.add_argument("-o", "--output", type=Path, required=True, help="trace file to write")
    r = sub.add_parser("report", help="write a self-contained HTML report of a run")
    r.add_argument("run_dir", type=Path)
    r.add_argument("-o", "--output", type=Path, help="HTML file (default: RUN_DIR/report.html)")


def _window(args: argparse.Namespace) -> tuple[int, int | None]:
    def ns(text: str) -> int:  # a bare integer is nanoseconds, as in config files
        return int(text) if text.isdigit() else parse_duration(text)

    try:
        t_from = ns(args.t_from) if args.t_from else 0
        t_to = ns(args.t_to) if args.t_to else None
    except ValueError as e:
        raise EventLogError(f"--from/--to: {e}") from None
    if t_to is not None and t_to <= t_from:
        raise EventLogError("--to must be after --from")
    return t_from, t_to


def _range(text: str, what: str, shift: int) -> tuple[int, int]:
    try:
        lo_s, _, hi_s = text.partition("-")
        lo = int(lo_s, 0)
        hi = int(hi_s, 0) if hi_s else lo + (1 << shift)
    except ValueError:
        raise EventLogError(f"--{what} {text}: expected A or A-B (hex 0x... or decimal)") from None
    if hi <= lo:
        raise EventLogError(f"--{what} {text}: empty range")
    return lo >> shift, -(-hi >> shift)


def _warn(msg: str) -> None:
    print(f"vsim: warning: {msg}", file=sys.stderr)


def _warn_partial(run_dir: Path) -> None:
    """A run stopped by ``--max-wall`` says so (its ``status`` file) before anything is read."""
    try:
        status = (run_dir / "status").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return  # (runs from before the status file, or not a run directory: the reader says so)
    if status != "complete":
        _warn(f"{run_dir} is not a complete run ({status})")


def run_events(args: argparse.Namespace) -> int:
    _warn_partial(args.run_dir)
    t_from, t_to = _window(args)
    cmd = args.events_command
    if cmd == "summary":
        _summary(args.run_dir, Selection(t_from, t_to))
    elif cmd == "filter":
        gfns = _range(args.gfn, "gfn", 0) if args.gfn else _range(args.gpa, "gpa", 12) if args.gpa else None
        sel = Selection(t_from, t_to, frozenset(args.kind), frozenset(args.vcpu), gfns)
        _filter(args.run_dir, sel, args.table)
    elif cmd == "latency":
        _latency(args.run_dir, Selection(t_from, t_to), args.by_vcpu)
    elif cmd == "timeline":
        trace = build_trace(iter_events(args.run_dir, Selection(t_from, t_to), _warn), t_from, t_to)
        _write(args.output, json.dumps(trace))
        print(f"wrote {args.output} ({len(trace['traceEvents']):,} trace events); open it in ui.perfetto.dev")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from vsim.report import build_report

    _warn_partial(args.run_dir)
    out = args.output or args.run_dir / "report.html"
    _write(out, build_report(args.run_dir))
    print(f"wrote {out}")
    return 0


def _write(path: Path, text: str) -> None:
    from vsim.runner import write_atomic

    try:
        write_atomic(path, text)
    except OSError as e:
        raise EventLogError(f"{path}: {e.strerror or e}") from None


def _summary(run_dir: Path, sel: Selection) -> None:
    s = summarize(iter_events(run_dir, sel, _warn))
    con = Console()
    span = "" if s.first_ns is None else f" ({s.first_ns / 1e6:.3f}–{s.last_ns / 1e6:.3f} ms)"  # type: ignore[operator]
    for title, counter in (("exits by reason", s.exits_by_reason), ("faults by outcome", s.faults_by_outcome),
                           ("events by kind", s.kinds)):  # fmt: skip
        t = Table(title=title + span)
        t.add_column(title.split(" by ")[1])
        t.add_column("count", justify="right")
        for k, n in sorted(counter.items(), key=lambda kv: -kv[1]):
            t.add_row(escape(k), f"{n:,}")
        if not counter:
            t.add_row("(none in this log)", "")
        con.print(t)
    cols = ["kvm_page_fault", "fault FIXED", "fault SPURIOUS", "fault RETRY", "kvm_exit", "vsim_mmu_lock_wait"]
    t = Table(title="per vCPU")
    t.add_column("vcpu", justify="right")
    for c in cols:
        t.add_column(c, justify="right")
    for v in sorted(s.per_vcpu):
        t.add_row(str(v), *(f"{s.per_vcpu[v][c]:,}" for c in cols))
    con.print(t)


def _filter(run_dir: Path, sel: Selection, table: bool) -> None:
    out = sys.stdout
    for line, ev in iter_lines(run_dir, sel, _warn):
        if table:
            fields = " ".join(f"{k}={v:#x}" if k in ("gpa", "old_spte", "new_spte") else f"{k}={v}"
                              for k, v in ev.items() if k not in ("event", "t_ns", "vcpu"))  # fmt: skip
            out.write(f"{ev['t_ns']:>14} {ev['vcpu']:>4} {ev['event']:<26} {fields}\n")
        else:
            out.write(line)


def _latency(run_dir: Path, sel: Selection, by_vcpu: bool) -> None:
    samples = collect(iter_events(run_dir, sel, _warn), by_vcpu)
    # Wide enough for the longest span name on one line, even when piped (Rich assumes 80 columns).
    con = Console(width=max(80, max(map(len, samples), default=0) + 70))
    t = Table(title="span durations (µs)")
    for c in ("span", "count", "p50", "p90", "p99", "p99.9", "max"):
        t.add_column(c, justify="left" if c == "span" else "right", no_wrap=c == "span")
    for name in sorted(samples):
        row = percentile_row(samples[name])
        cells = (f"{row[k] / 1000:,.3f}" for k in ("p50", "p90", "p99", "p99.9", "max"))
        t.add_row(escape(name), f"{row['count']:,}", *cells)  # ("page fault [vcpu 3]" is not markup)
    if not samples:
        t.add_row("(no spans in this log: run with events.level = faults or all)", "", "", "", "", "", "")
    con.print(t)
    if not by_vcpu:
        for name in sorted(samples):
            print(f"\n{name}:")
            print("\n".join(histogram(samples[name])))
