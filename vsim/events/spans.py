"""Pairing the two ends of each span in the event log.

* ``exit <reason>``: ``kvm_exit`` → ``kvm_entry`` (same vCPU and ``exit_id``);
* ``in guest``: ``kvm_entry`` → the vCPU's next ``kvm_exit``;
* ``page fault``: ``kvm_page_fault`` → ``vsim_page_fault_ret`` (same vCPU and ``id``);
* ``mmu_lock wait (<mode>)``: ``vsim_mmu_lock_wait`` → ``vsim_mmu_lock_acquire`` (``lock_id``);
* ``mmu_lock held (<mode>)``: ``vsim_mmu_lock_acquire`` → ``vsim_mmu_lock_release`` (``lock_id``);
* ``memslot update (<change>)``: ``vsim_set_memory_region`` → ``..._done`` (``op_id``, the VMM);
* ``SRCU grace period``: ``vsim_synchronize_srcu`` → ``vsim_synchronize_srcu_done`` (the VMM).

Pairing streams: only spans still open are held in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from vsim.events.reader import Event


@dataclass(frozen=True)
class Span:
    vcpu: int
    name: str
    start: int
    end: int
    detail: str = ""

    @property
    def duration(self) -> int:
        return self.end - self.start


def pair_spans(events: Iterable[Event], open_spans: dict | None = None) -> Iterator[Span]:
    """Yield each span when its closing record arrives. ``open_spans``, if given, is left holding
    the spans still open at the end of the input: key -> (vcpu, name, start, detail)."""
    opened: dict = open_spans if open_spans is not None else {}
    for ev in events:
        kind = ev["event"]
        v = ev["vcpu"]
        t = ev["t_ns"]
        if kind == "kvm_exit":
            if (key := ("guest", v)) in opened:
                yield _close(opened.pop(key), t)
            opened[("exit", v, ev["exit_id"])] = (v, f"exit {ev['reason']}", t, "")
        elif kind == "kvm_entry":
            if (key2 := ("exit", v, ev["exit_id"])) in opened:
                yield _close(opened.pop(key2), t)
            opened[("guest", v)] = (v, "in guest", t, "")
        elif kind == "kvm_page_fault":
            opened[("pf", v, ev["id"])] = (v, "page fault", t, f"gpa {ev['gpa']:#x}")
        elif kind == "vsim_page_fault_ret":
            if (key3 := ("pf", v, ev["id"])) in opened:
                o = opened.pop(key3)
                yield Span(o[0], o[1], o[2], t, f"{o[3]} {ev['ret']}")
        elif kind == "vsim_mmu_lock_wait":
            opened[("wait", ev["lock_id"])] = (v, f"mmu_lock wait ({ev['mode']})", t, "")
        elif kind == "vsim_mmu_lock_acquire":
            if (key4 := ("wait", ev["lock_id"])) in opened:
                yield _close(opened.pop(key4), t)
            opened[("held", ev["lock_id"])] = (v, f"mmu_lock held ({ev['mode']})", t, "")
        elif kind == "vsim_mmu_lock_release" and (key5 := ("held", ev["lock_id"])) in opened:
            yield _close(opened.pop(key5), t)
        elif kind == "vsim_set_memory_region":
            opened[("memslot", ev["op_id"])] = (v, f"memslot update ({ev['change']})", t, f"slot {ev['slot']}")
        elif kind == "vsim_set_memory_region_done" and (key6 := ("memslot", ev["op_id"])) in opened:
            yield _close(opened.pop(key6), t)
        elif kind == "vsim_synchronize_srcu":
            opened[("srcu", v)] = (v, "SRCU grace period", t, f"{ev['readers']} readers")
        elif kind == "vsim_synchronize_srcu_done" and (key7 := ("srcu", v)) in opened:
            yield _close(opened.pop(key7), t)


def _close(o: tuple[int, str, int, str], t: int) -> Span:
    return Span(o[0], o[1], o[2], t, o[3])
