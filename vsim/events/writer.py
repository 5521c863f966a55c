"""Streaming ``events.jsonl`` writer: structlog JSON lines, rendered in bulk.

Each line is exactly what ``structlog.processors.JSONRenderer()`` prints for the event dict
``{"event": name, "t_ns": ..., "vcpu": ..., <fields>}``; tests hold the two byte-equal. Rendering
goes through per-kind ``%`` templates because a structlog call per record (~20 µs) would dominate a
run. The file is written under a temporary name and renamed on close, so a killed or failed run
never leaves a half-written ``events.jsonl`` in place of a good one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

import structlog

from vsim.events.kinds import KINDS, SCHEMA_VERSION
from vsim.events.rows import RowCodec
from vsim.events.sink import EventBatch, Record

_renderer = structlog.processors.JSONRenderer()


def render_structlog(event_dict: dict[str, object]) -> str:
    """The reference rendering of one event dict, through structlog's own JSON renderer."""
    return str(_renderer(None, "info", dict(event_dict))) + "\n"


def record_to_dict(record: Record) -> dict[str, object]:
    """The event dict of a ``(name, t_ns, vcpu, *fields)`` record."""
    name = str(record[0])
    kind = next(k for k in KINDS if k.name == name)
    d: dict[str, object] = {"event": name, "t_ns": record[1], "vcpu": record[2]}
    d.update(zip(kind.fields, record[3:], strict=True))
    return d


def render_records(records: list[Record]) -> str:
    """Render records to JSON lines (``vsim.events.rows``, as a sink renders its batches);
    byte-identical to :func:`render_structlog` of each dict."""
    codec = RowCodec()
    return codec.render(codec.encode(records)).decode()


class JsonlWriter:
    """Consumes event-sink buffers into ``path`` atomically (temp file, then rename on close)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._fh: IO[bytes] | None = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()
        self.lines = 0
        self._fh.write(render_structlog({"event": "vsim_log_header", "schema_version": SCHEMA_VERSION}).encode())

    def __call__(self, batch: EventBatch | list[Record]) -> None:
        assert self._fh is not None
        self._fh.write(batch.render() if isinstance(batch, EventBatch) else render_records(batch).encode())
        self.lines += len(batch)

    def close(self) -> None:
        """Finish the file and move it into place."""
        if self._fh is None:
            return
        self._fh.close()
        self._fh = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the partial file; whatever was at ``path`` before stays."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._tmp.unlink(missing_ok=True)
