"""The event schema: every event vsim can log, its level and its fields, in log order.

Names are KVM tracepoint names where KVM has one (``kvm_exit``, ``kvm_entry``, ``kvm_page_fault``,
``kvm_mmu_spte_requested``, ``kvm_tdp_mmu_spte_changed``, ``fast_page_fault``,
``kvm_userspace_exit``); events KVM has no tracepoint for carry a ``vsim_`` prefix. Every record also
has ``t_ns`` (simulated time) and ``vcpu`` (-1 for the VM itself). Ids tie the ends of a span
together: ``exit_id`` (an exit and its re-entry) and ``id`` (a page fault and its return) count
per vCPU; ``lock_id`` (one ``mmu_lock`` acquisition: wait, acquire, release) counts per VM. ``docs/events.md`` documents
each kind; a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1

LEVELS = ("off", "faults", "all")


@dataclass(frozen=True)
class EventKind:
    """One kind of event: its name, the lowest level that logs it, and its extra fields."""

    name: str
    level: str
    fields: tuple[str, ...]
    # Fields rendered as JSON strings (enumerations); the rest are integers.
    str_fields: tuple[str, ...] = ()


KINDS: tuple[EventKind, ...] = (
    EventKind("kvm_exit", "all", ("exit_id", "reason", "gpa"), ("reason",)),
    EventKind("kvm_entry", "all", ("exit_id",)),
    EventKind("kvm_page_fault", "faults", ("id", "gpa", "error_code")),
    EventKind("vsim_page_fault_ret", "faults", ("id", "ret", "level"), ("ret",)),
    EventKind("fast_page_fault", "all", ("gfn", "old_spte", "new_spte", "ret"), ("ret",)),
    EventKind("kvm_mmu_spte_requested", "all", ("gfn", "pfn", "level")),
    EventKind("kvm_tdp_mmu_spte_changed", "all", ("as_id", "gfn", "level", "old_spte", "new_spte")),
    EventKind("kvm_mmu_set_spte", "all", ("as_id", "gfn", "level", "old_spte", "new_spte")),
    EventKind("vsim_mmu_lock_wait", "all", ("lock_id", "mode"), ("mode",)),
    EventKind("vsim_mmu_lock_acquire", "all", ("lock_id", "mode", "wait_ns"), ("mode",)),
    EventKind("vsim_mmu_lock_release", "all", ("lock_id", "mode", "held_ns"), ("mode",)),
    EventKind("kvm_userspace_exit", "all", ("exit_id", "reason"), ("reason",)),
    EventKind("kvm_mmio", "faults", ("type", "gpa"), ("type",)),
    EventKind("vsim_set_memory_region", "faults", ("op_id", "change", "slot"), ("change",)),
    EventKind(
        "vsim_set_memory_region_done",
        "faults",
        ("op_id", "change", "slot", "total_ns", "srcu_ns", "zap_ns"),
        ("change",),
    ),
    EventKind("vsim_synchronize_srcu", "faults", ("readers",)),
    EventKind("vsim_synchronize_srcu_done", "faults", ("grace_ns",)),
    EventKind("vsim_memslots_generation", "faults", ("as_id", "generation", "in_progress")),
    EventKind("vsim_mmu_notifier_invalidate", "faults", ("gfn", "npages", "total_ns")),
    EventKind("vsim_remote_tlb_flush", "faults", ("ipis", "wait_ns")),
    EventKind("vsim_invariant_violation", "faults", ("rule", "detail"), ("rule", "detail")),
)

KIND_BY_NAME: dict[str, EventKind] = {k.name: k for k in KINDS}
