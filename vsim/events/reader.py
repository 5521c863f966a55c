"""Reading ``events.jsonl`` back: streaming, with a time window and a record selection.

The reader never holds the whole log: ``iter_events`` yields one record at a time, and stops early
once past the window (the log is in time order). A log whose last line was cut off (a killed
copy) yields everything before the damage and reports a warning; a log from another schema
version, an unknown kind or a record whose fields do not match its kind is an ``EventLogError``
with one line naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vsim.events.kinds import KIND_BY_NAME, KINDS, SCHEMA_VERSION

Event = dict[str, Any]
COMMON = ("event", "t_ns", "vcpu")


class EventLogError(Exception):
    """A run directory or event log that cannot be read; ``str()`` is one line."""


@dataclass(frozen=True)
class Selection:
    """Which records to keep: a half-open time window ``[t_from, t_to)`` and optional filters."""

    t_from: int = 0
    t_to: int | None = None
    kinds: frozenset[str] = field(default_factory=frozenset)
    vcpus: frozenset[int] = field(default_factory=frozenset)
    gfn_range: tuple[int, int] | None = None  # [first, end) in 4K frames

    def __post_init__(self) -> None:
        unknown = sorted(k for k in self.kinds if k not in KIND_BY_NAME)
        if unknown:
            raise EventLogError(f"unknown event kind '{unknown[0]}'; kinds: {', '.join(k.name for k in KINDS)}")

    def keeps(self, ev: Event) -> bool:
        if self.kinds and ev["event"] not in self.kinds:
            return False
        if self.vcpus and ev["vcpu"] not in self.vcpus:
            return False
        if self.gfn_range is not None:
            gfn = ev.get("gfn", ev["gpa"] >> 12 if "gpa" in ev else None)
            if gfn is None or not self.gfn_range[0] <= gfn < self.gfn_range[1]:
                return False
        return True


def events_path(run_dir: str | Path) -> Path:
    d = Path(run_dir)
    if not d.is_dir():
        raise EventLogError(f"{d}: no such run directory")
    p = d / "events.jsonl"
    if not p.is_file():
        raise EventLogError(f"{d}: no events.jsonl (not a vsim run directory?)")
    return p


def iter_lines(
    run_dir: str | Path, sel: Selection = Selection(), warn: Callable[[str], None] | None = None
) -> Iterator[tuple[str, Event]]:
    """Yield ``(line, record)`` for each selected record, in log order."""
    path = events_path(run_dir)
    with path.open("rb") as f:
        try:
            header = json.loads(f.readline())
        except ValueError:  # not JSON, or not UTF-8
            header = None
        if not isinstance(header, dict) or header.get("event") != "vsim_log_header":
            raise EventLogError(f"{path}:1: not a vsim event log (no header line)")
        if header.get("schema_version") != SCHEMA_VERSION:
            raise EventLogError(
                f"{path}:1: event log schema version {header.get('schema_version')}; "
                f"this vsim reads version {SCHEMA_VERSION}"
            )
        n = 0
        for lineno, raw in enumerate(f, start=2):
            try:
                line = raw.decode("utf-8")
                ev = json.loads(line)
            except ValueError as e:  # UnicodeDecodeError and JSONDecodeError
                if not raw.endswith(b"\n"):
                    if warn is not None:
                        warn(f"{path}:{lineno}: truncated last line (a killed run?); read the {n} records before it")
                    return
                what = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else "not a JSON record"
                raise EventLogError(f"{path}:{lineno}: {what}") from None
            _check(ev, path, lineno)
            n += 1
            t = ev["t_ns"]
            if t < sel.t_from:
                continue
            if sel.t_to is not None and t >= sel.t_to:
                return
            if sel.keeps(ev):
                yield line, ev


def iter_events(
    run_dir: str | Path, sel: Selection = Selection(), warn: Callable[[str], None] | None = None
) -> Iterator[Event]:
    """Yield each selected record as a dict."""
    for _, ev in iter_lines(run_dir, sel, warn):
        yield ev


def _check(ev: Any, path: Path, lineno: int) -> None:
    if not isinstance(ev, dict) or "event" not in ev:
        raise EventLogError(f"{path}:{lineno}: not an event record")
    kind = KIND_BY_NAME.get(ev["event"])
    if kind is None:
        raise EventLogError(f"{path}:{lineno}: unknown event kind '{ev['event']}'")
    if len(ev) != 3 + len(kind.fields) or any(k not in ev for k in (*COMMON, *kind.fields)):
        extra = sorted(set(ev) - set(COMMON) - set(kind.fields))
        what = f"unknown field '{extra[0]}'" if extra else "missing fields"
        raise EventLogError(f"{path}:{lineno}: {kind.name}: {what}; fields: {', '.join(kind.fields)}")
    for name in (*COMMON[1:], *kind.fields):  # (JSON's true and false are not integers here)
        want = str if name in kind.str_fields else int
        if type(ev[name]) is not want:
            raise EventLogError(f"{path}:{lineno}: {kind.name}: field '{name}' is {type(ev[name]).__name__}, "
                                f"not {want.__name__}")  # fmt: skip


# Fields holding 64-bit addresses or SPTEs: a shadow-paging guest's virtual addresses (kernel
# halves at 0xffff8...) and SPTE bits reach 2**63, so these columns are unsigned.
U64_FIELDS = frozenset({"gpa", "old_spte", "new_spte"})
U64_MISSING = (1 << 64) - 1  # "-1" in an unsigned column: the kind lacks the field


def _columns() -> list[tuple[str, str]]:
    cols: dict[str, str] = {"t_ns": "i8", "vcpu": "i4", "event": "U26"}
    for k in KINDS:
        for f in k.fields:
            num = "u8" if f in U64_FIELDS else "i8"
            cols.setdefault(f, "U96" if f == "detail" else "U16" if f in k.str_fields else num)
    return list(cols.items())


def _missing(dtype: str) -> object:
    return "" if dtype[0] == "U" else U64_MISSING if dtype == "u8" else -1


def load(run_dir: str | Path, sel: Selection = Selection(), frame: bool | None = None,
         warn: Callable[[str], None] | None = None) -> Any:  # fmt: skip
    """All selected events as a numpy structured array (one column per field of any kind; -1 or
    "" where a kind lacks the field, and ``2**64 - 1`` in the unsigned address and SPTE columns,
    ``U64_FIELDS``), or a pandas DataFrame when pandas is installed (``frame`` None) or asked for
    (``frame`` True)."""
    cols = _columns()
    missing = [_missing(dt) for _, dt in cols]
    rows = [
        tuple(ev.get(name, m) for (name, _), m in zip(cols, missing, strict=True))
        for ev in iter_events(run_dir, sel, warn)
    ]
    arr = np.array(rows, dtype=cols)
    if frame is False:
        return arr
    try:
        import pandas as pd
    except ImportError:
        if frame:
            raise EventLogError("pandas is not installed; load(..., frame=False) gives a numpy array") from None
        return arr
    return pd.DataFrame(arr)
