"""Latency tables from the event log: percentiles and a text histogram per span kind."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from vsim.events.reader import Event
from vsim.events.spans import pair_spans

PERCENTILES = (50.0, 90.0, 99.0, 99.9)

# Latencies logged as one event with their duration: (event, field, span name).
ONE_EVENT_SPANS = (
    ("vsim_remote_tlb_flush", "wait_ns", "remote TLB flush round trip"),
    ("vsim_mmu_notifier_invalidate", "total_ns", "mmu-notifier invalidation"),
)


def collect(events: Iterable[Event], by_vcpu: bool = False) -> dict[str, list[int]]:
    """Durations (ns) per span name, and per vCPU with ``by_vcpu``.

    ``mmu_lock wait (<mode>)`` takes every acquisition's ``wait_ns``, zero waits included (as in
    ``stats.json``). ``in guest`` is not a latency and is left out. Remote flushes and
    MMU-notifier invalidations come as single events carrying their duration.
    """
    out: dict[str, list[int]] = {}

    def add(name: str, vcpu: int, ns: int) -> None:
        out.setdefault(f"{name} [vcpu {vcpu}]" if by_vcpu else name, []).append(ns)

    def tap(evs: Iterable[Event]) -> Iterator[Event]:
        for ev in evs:
            if ev["event"] == "vsim_mmu_lock_acquire":
                add(f"mmu_lock wait ({ev['mode']})", ev["vcpu"], ev["wait_ns"])
            for kind, field, name in ONE_EVENT_SPANS:
                if ev["event"] == kind:
                    add(name, ev["vcpu"], ev[field])
            yield ev

    for s in pair_spans(tap(events)):
        if s.name != "in guest" and not s.name.startswith("mmu_lock wait"):
            add(s.name, s.vcpu, s.duration)
    return out


def percentile_row(samples: list[int]) -> dict[str, int]:
    """count, p50/p90/p99/p99.9 (observed values, numpy's ``inverted_cdf``) and max, in ns."""
    a = np.asarray(samples, dtype=np.int64)
    p = np.percentile(a, PERCENTILES, method="inverted_cdf")
    row = {"count": int(a.size)}
    row.update({f"p{q:g}": int(v) for q, v in zip(PERCENTILES, p, strict=True)})
    row["max"] = int(a.max())
    return row


def histogram(samples: list[int], width: int = 40) -> list[str]:
    """Power-of-two buckets of the samples as text bars."""
    a = np.asarray(samples, dtype=np.int64)
    top = max(int(a.max()), 1)
    edges = [0] + [1 << k for k in range(top.bit_length() + 1)]
    counts, _ = np.histogram(a, bins=edges)
    peak = max(int(counts.max()), 1)
    lines = []
    for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True):
        if c:
            bar = "#" * max(1, round(width * int(c) / peak))
            lines.append(f"  [{_fmt(lo):>9}, {_fmt(hi):>9}) {int(c):>9}  {bar}")
    return lines


def _fmt(ns: int) -> str:
    if ns >= 1_000_000:
        return f"{ns / 1e6:g}ms"
    if ns >= 1_000:
        return f"{ns / 1e3:g}us"
    return f"{ns}ns"
