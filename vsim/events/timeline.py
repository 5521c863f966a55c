"""Chrome trace-event JSON (Perfetto, ``chrome://tracing``) from an event log.

Process 1, "vCPUs", has one track per vCPU, on which spans nest: ``in guest``,
``exit <reason>``, ``page fault`` and ``mmu_lock wait``. Process 2, "mmu_lock", has one track per
holder, showing when each vCPU (or the VMM) held the lock and in which mode. Process 0, "VM", has the
VMM's track (memslot updates with their SRCU grace periods nested) and the invariant violations as
instant events. Every span is a ``B``/``E`` pair on its track. Spans cut by the window,
or still open when the log ends, are closed at the window's edge.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vsim.events.reader import Event
from vsim.events.spans import Span, pair_spans

PID_VM, PID_VCPUS, PID_LOCK = 0, 1, 2


def build_trace(events: Iterable[Event], t_from: int, t_to: int | None) -> dict[str, Any]:
    """The trace for ``events`` (already cut to the window) as a JSON-ready dict."""
    out: list[dict[str, Any]] = []
    instants: list[dict[str, Any]] = []
    seen_vcpus: set[int] = set()
    last_t = t_from

    def tagged(evs: Iterable[Event]) -> Iterable[Event]:
        nonlocal last_t
        for ev in evs:
            last_t = ev["t_ns"]
            if ev["vcpu"] >= 0:
                seen_vcpus.add(ev["vcpu"])
            if ev["event"] == "vsim_invariant_violation":
                instants.append({"name": ev["rule"], "ph": "i", "s": "g", "ts": ev["t_ns"] / 1000, "pid": PID_VM,
                                 "tid": 0, "args": {"detail": ev["detail"]}})  # fmt: skip
            yield ev

    opened: dict = {}
    spans = list(pair_spans(tagged(events), opened))
    end = t_to if t_to is not None else last_t
    for v, name, start, detail in opened.values():
        spans.append(Span(v, name, start, max(start, end), detail))
    for s in spans:
        pid = PID_LOCK if s.name.startswith("mmu_lock held") else PID_VCPUS if s.vcpu >= 0 else PID_VM
        start = max(s.start, t_from)
        args = {"detail": s.detail} if s.detail else {}
        out.append({"name": s.name, "ph": "B", "ts": start / 1000, "pid": pid, "tid": s.vcpu, "args": args})
        out.append({"name": s.name, "ph": "E", "ts": s.end / 1000, "pid": pid, "tid": s.vcpu})
    out.sort(key=lambda e: (e["pid"], e["tid"]))  # stable: group by track, then nest each track
    out = _nest(out)
    meta: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": PID_VM, "args": {"name": "VM"}},
        {"name": "process_name", "ph": "M", "pid": PID_VCPUS, "args": {"name": "vCPUs"}},
        {"name": "process_name", "ph": "M", "pid": PID_LOCK, "args": {"name": "mmu_lock holders"}},
        {"name": "thread_name", "ph": "M", "pid": PID_VM, "tid": -1, "args": {"name": "VMM"}},
    ]
    for v in sorted(seen_vcpus):
        meta.append({"name": "thread_name", "ph": "M", "pid": PID_VCPUS, "tid": v, "args": {"name": f"vCPU {v}"}})
        meta.append({"name": "thread_name", "ph": "M", "pid": PID_LOCK, "tid": v, "args": {"name": f"vCPU {v}"}})
    return {"traceEvents": meta + out + instants, "displayTimeUnit": "ns"}


def _nest(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order each track's B/E records so spans nest: at equal timestamps, close the innermost
    open span first and open longer spans before shorter ones (a stack discipline)."""
    result: list[dict[str, Any]] = []
    i = 0
    while i < len(events):
        j = i
        key = (events[i]["pid"], events[i]["tid"])
        while j < len(events) and (events[j]["pid"], events[j]["tid"]) == key:
            j += 1
        result.extend(_nest_track(events[i:j]))
        i = j
    return result


def _nest_track(track: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Pair each B with its E by name in order, then emit by a stack walk over (start, -end).
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    pending: dict[str, list[dict[str, Any]]] = {}
    for e in track:
        if e["ph"] == "B":
            pending.setdefault(e["name"], []).append(e)
        else:
            b = pending[e["name"]].pop(0)
            pairs.append((b, e))
    pairs.sort(key=lambda p: (p[0]["ts"], -p[1]["ts"]))
    out: list[dict[str, Any]] = []
    stack: list[dict[str, Any]] = []
    for b, e in pairs:
        while stack and stack[-1]["ts"] <= b["ts"]:
            out.append(stack.pop())
        if stack and e["ts"] > stack[-1]["ts"]:
            e = {**e, "ts": stack[-1]["ts"]}  # clip to the enclosing span
        out.append(b)
        stack.append(e)
    while stack:
        out.append(stack.pop())
    return out
