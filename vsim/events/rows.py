"""Event records as int64 rows, and their JSON lines rendered in compiled code.

The sink keeps records as rows ``(kind, t_ns, vcpu, field, ...)``: ``kind`` indexes ``KINDS``, and a
string field holds the id of its (interned, JSON-escaped) value. Sorting a buffer of rows, cutting
it at the clock and rendering it are then array operations, and compiled model code (the vCPU
group) hands over thousands of records as one array. A Python object per record would cost more
than the event it records.

Each line is the kind's ``%`` template (``TEMPLATES``) filled in; ``vsim.events.writer`` renders
single records with the same templates, and tests hold both byte-equal to structlog's
``JSONRenderer``.
"""

from __future__ import annotations

import json
import re

import numpy as np
from numba import njit

from vsim.events.kinds import KINDS, EventKind

UNSIGNED_FIELDS = frozenset({"gpa", "error_code", "old_spte", "new_spte"})
"""64-bit fields whose values may reach 2**63 (a shadow-paging guest's kernel addresses): a row holds
them as two's complement, and they are rendered unsigned."""
ROW_FIELDS = max(len(k.fields) for k in KINDS)
ROW_COLS = 3 + ROW_FIELDS
KIND_ID = {k.name: i for i, k in enumerate(KINDS)}
_MAX_INT = 20  # characters of the longest int64
_PAIRS = np.frombuffer("".join(f"{i:02d}" for i in range(100)).encode(), dtype=np.uint8).copy()
_POW10 = np.array([10**i for i in range(_MAX_INT)], dtype=np.uint64)
_HUNDRED = np.uint64(100)
_TEN = np.uint64(10)


def _template(kind: EventKind) -> str:
    parts = [f'{{"event": "{kind.name}", "t_ns": %d, "vcpu": %d']
    for f in kind.fields:
        parts.append(f', "{f}": "%s"' if f in kind.str_fields else f', "{f}": %d')
    return "".join(parts) + "}\n"


TEMPLATES: dict[str, str] = {k.name: _template(k) for k in KINDS}
_PAD = [(0,) * (ROW_COLS - n) for n in range(ROW_COLS + 1)]  # zeros after a record of n items
_U64 = 1 << 64
_U64_TOP = 1 << 63


def _segments() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per kind: the template's literal pieces around its fields, and which fields are strings."""
    pieces = [[s.encode() for s in re.split(r"%[ds]", TEMPLATES[k.name])] for k in KINDS]
    width = max(len(p) for ps in pieces for p in ps)
    seg = np.zeros((len(KINDS), ROW_COLS, width), dtype=np.uint8)
    seglen = np.zeros((len(KINDS), ROW_COLS), dtype=np.int64)
    nfields = np.array([len(ps) - 1 for ps in pieces], dtype=np.int64)
    # Per field (row column - 1): 1 a string id, 2 an unsigned 64-bit value, 0 a signed one.
    ftype = np.zeros((len(KINDS), ROW_COLS), dtype=np.int64)
    for i, (k, ps) in enumerate(zip(KINDS, pieces, strict=True)):
        for j, p in enumerate(ps):
            seg[i, j, : len(p)] = np.frombuffer(p, dtype=np.uint8)
            seglen[i, j] = len(p)
        for j, f in enumerate(k.fields):
            ftype[i, 2 + j] = 1 if f in k.str_fields else 2 if f in UNSIGNED_FIELDS else 0
    return seg, seglen, nfields, ftype


_SEG, _SEGLEN, _NFIELDS, _FTYPE = _segments()
_SEGFLAT = _SEG.reshape(-1)  # piece (kind, j) starts at (kind * ROW_COLS + j) * _SEG.shape[2]
_LINE_MAX = int(_SEGLEN.sum(axis=1).max()) + ROW_COLS * _MAX_INT


class RowCodec:
    """Turns records into rows and rows into records or JSON lines; owns the string ids."""

    def __init__(self) -> None:
        self.strings: list[str] = []
        self._ids: dict[str, int] = {}
        self._tab = np.zeros((0, 1), dtype=np.uint8)
        self._tablen = np.zeros(0, dtype=np.int64)
        self._tab_n = 0  # strings in _tab
        self._scratch = np.zeros(0, dtype=np.uint8)

    def intern(self, s: str) -> int:
        """The id of string value ``s``."""
        i = self._ids.get(s)
        if i is None:
            i = self._ids[s] = len(self.strings)
            self.strings.append(s)
        return i

    def encode(self, records: list[tuple[int | str, ...]]) -> np.ndarray:
        """Rows of ``(name, t_ns, vcpu, *fields)`` records."""
        intern = self.intern
        kind_id = KIND_ID
        pad = _PAD
        flat = []
        for r in records:
            flat.append(kind_id[r[0]])  # type: ignore[index]
            flat.extend([intern(x) if isinstance(x, str) else x if x < _U64_TOP else x - _U64 for x in r[1:]])
            flat.extend(pad[len(r)])
        return np.fromiter(flat, dtype=np.int64, count=len(flat)).reshape(-1, ROW_COLS)

    def decode(self, rows: np.ndarray) -> list[tuple[int | str, ...]]:
        """The ``(name, t_ns, vcpu, *fields)`` record of each row."""
        out = []
        for row in rows.tolist():
            kind = KINDS[row[0]]
            fields = [self.strings[x] if f in kind.str_fields else x + _U64 if x < 0 and f in UNSIGNED_FIELDS else x
                      for f, x in zip(kind.fields, row[3:], strict=False)]  # fmt: skip
            out.append((kind.name, row[1], row[2], *fields))
        return out

    def render(self, rows: np.ndarray) -> bytes:
        """The JSON lines of ``rows``, in order, UTF-8 encoded."""
        if self._tab_n < len(self.strings):
            self._build_table()
        need = len(rows) * (_LINE_MAX + int(self._tab.shape[1]))
        if len(self._scratch) < need:  # reused: a fresh buffer per batch costs its page faults
            self._scratch = np.empty(max(need, 2 * len(self._scratch)), dtype=np.uint8)
        out = self._scratch
        n = _render(rows, _SEGFLAT, _SEG.shape[2], _SEGLEN, _NFIELDS, _FTYPE, self._tab, self._tablen, out)
        return out[:n].tobytes()

    def _build_table(self) -> None:
        enc = [json.dumps(s)[1:-1].encode() for s in self.strings]  # escaped as structlog's JSON is
        self._tab = np.zeros((len(enc), max(len(e) for e in enc)), dtype=np.uint8)
        self._tablen = np.array([len(e) for e in enc], dtype=np.int64)
        for i, e in enumerate(enc):
            self._tab[i, : len(e)] = np.frombuffer(e, dtype=np.uint8)
        self._tab_n = len(enc)


@njit(cache=True)
def _render(rows, seg, width, seglen, nfields, ftype, tab, tablen, out):  # type: ignore[no-untyped-def]
    pos = 0
    for r in range(rows.shape[0]):
        kd = rows[r, 0]
        nf = nfields[kd]
        for f in range(nf + 1):
            n = seglen[kd, f]
            o = (kd * seglen.shape[1] + f) * width
            for i in range(n):  # (element loops: slices would build a view per piece)
                out[pos + i] = seg[o + i]
            pos += n
            if f == nf:
                break
            v = rows[r, 1 + f]
            if ftype[kd, f] == 1:
                n = tablen[v]
                for i in range(n):
                    out[pos + i] = tab[v, i]
                pos += n
                continue
            if v >= 0 or ftype[kd, f] == 2:
                u = np.uint64(v)  # (an unsigned field of 2**63 or more is held as two's complement)
            else:
                out[pos] = 45  # '-'
                pos += 1
                u = np.uint64(-v)
            n = 1
            while n < _MAX_INT and u >= _POW10[n]:
                n += 1
            p = pos + n - 1  # digits from the last, two at a time
            while u >= _HUNDRED:
                q = u // _HUNDRED
                d = 2 * np.int64(u - q * _HUNDRED)
                out[p] = _PAIRS[d + 1]
                out[p - 1] = _PAIRS[d]
                p -= 2
                u = q
            if u >= _TEN:
                d = 2 * np.int64(u)
                out[p] = _PAIRS[d + 1]
                out[p - 1] = _PAIRS[d]
            else:
                out[p] = 48 + np.int64(u)
            pos += n
    return pos
