"""The sweep's design source and its results table (``results.csv``, and Parquet with pyarrow)."""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path
from typing import Any

from vsim.config.load import read_toml
from vsim.runner import write_atomic
from vsim.sweeps.spec import SweepError, SweepSpec


def spec_for(config: str | Path | None, spec: SweepSpec | None) -> SweepSpec:
    """The given spec, else the config file's ``[sweep]`` table; a sweep needs at least a factor
    or replicates."""
    if spec is None:
        table = read_toml(config)[0].get("sweep", {}) if config is not None else {}
        spec = SweepSpec.from_table(table, str(config))
    if not spec.factors and spec.replicates == 1:
        raise SweepError("nothing to sweep: give a [sweep] table, --grid/--zip factors or --replicates")
    return spec


def write_table(out_dir: Path, rows: list[dict[str, Any]], parquet: bool = True) -> None:
    """``results.csv`` (and, with ``parquet`` and pyarrow installed, ``results.parquet``) of ``rows``,
    each file replaced atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_atomic(out_dir / "results.csv", buf.getvalue())
    if not parquet:
        return
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return
    tmp = out_dir / ".results.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(out_dir / "results.parquet")


def read_table(sweep_dir: Path) -> list[dict[str, Any]]:
    """``results.csv`` with numbers parsed back."""
    p = sweep_dir / "results.csv"
    if not p.is_file():
        raise SweepError(f"{sweep_dir}: no results.csv (not a sweep directory?)")
    rows = list(csv.DictReader(p.open(encoding="utf-8")))
    return [{k: _num(v) for k, v in r.items()} for r in rows]


def _num(v: str) -> Any:
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return cast(v)
    return v
