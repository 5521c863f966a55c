"""A ``kvm_stat``-like summary of an event log: counts by kind, exits by reason, faults by outcome,
per vCPU and in total."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from vsim.events.reader import Event


@dataclass
class Summary:
    kinds: Counter[str] = field(default_factory=Counter)
    exits_by_reason: Counter[str] = field(default_factory=Counter)
    faults_by_outcome: Counter[str] = field(default_factory=Counter)
    per_vcpu: dict[int, Counter[str]] = field(default_factory=dict)
    first_ns: int | None = None
    last_ns: int | None = None


def summarize(events: Iterable[Event]) -> Summary:
    s = Summary()
    for ev in events:
        kind = ev["event"]
        s.kinds[kind] += 1
        v = s.per_vcpu.setdefault(ev["vcpu"], Counter())
        v[kind] += 1
        if kind == "kvm_exit":
            s.exits_by_reason[ev["reason"]] += 1
            v[f"exit {ev['reason']}"] += 1
        elif kind == "vsim_page_fault_ret":
            s.faults_by_outcome[ev["ret"]] += 1
            v[f"fault {ev['ret']}"] += 1
        if s.first_ns is None:
            s.first_ns = ev["t_ns"]
        s.last_ns = ev["t_ns"]
    return s
