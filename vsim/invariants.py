"""The opt-in invariant checker (spec §13). ``sim.invariants = true`` turns it on; tests run with it.

Checks made in this version:

* §13.9 SPTE legality: every SPTE written obeys the (Host-writable, MMU-writable, W) lattice.
* §13.2 a present leaf never changes pfn in place (present → non-present → present).
* No stale translation: at the end of the run, every translation in every vCPU's TLB is backed by a
  present leaf SPTE of at least its size that grants at least its permission.
* Page stats agree with the page tables: ``pages_4k/2m/1g`` equal the present leaves counted.

A violation is recorded (and logged as ``vsim_invariant_violation``) rather than raised, so a run
shows every violation it hits; ``stats.json`` reports them and tests require none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsim.mmu.spte import (
    PT_WRITABLE,
    REMOVED_SPTE,
    SPTE_MMU_PRESENT,
    is_last_spte,
    spte_is_legal,
    spte_to_pfn,
)

if TYPE_CHECKING:
    from vsim.vm import Vm


class InvariantChecker:
    """Records violations of the spec's invariants as ``(t_ns, rule, detail)``."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.violations: list[tuple[int, str, str]] = []

    def _violate(self, rule: str, detail: str) -> None:
        t = self.vm.env.now
        self.violations.append((t, rule, detail))
        if self.vm.sink.faults:
            self.vm.sink.emit("vsim_invariant_violation", t, -1, rule, detail)

    def on_spte_changed(self, gfn: int, old: int, new: int, level: int) -> None:
        if is_last_spte(new, level) and not spte_is_legal(new):
            self._violate("spte_legality", f"gfn {gfn:#x} level {level} spte {new:#x}")
        old_leaf = bool(old & SPTE_MMU_PRESENT) and old != REMOVED_SPTE and is_last_spte(old, level)
        new_leaf = bool(new & SPTE_MMU_PRESENT) and new != REMOVED_SPTE and is_last_spte(new, level)
        if old_leaf and new_leaf and spte_to_pfn(old) != spte_to_pfn(new):
            self._violate("leaf_pfn_changed_in_place", f"gfn {gfn:#x} pfn {spte_to_pfn(old):#x}->{spte_to_pfn(new):#x}")

    def check_end_of_run(self) -> None:
        self.check_tlbs()
        self.check_page_stats()

    def check_tlbs(self) -> None:
        """Every cached translation is backed by the current SPTEs (no stale translation)."""
        mmu = self.vm.mmu
        for v in self.vm.vcpus:
            if v.root is None:
                continue
            for size_class, key, writable in v.tlb.entries():
                gfn = key << (9 * size_class)
                table, idx, level, spte = mmu.walk_last(v.root, gfn)
                leaf = bool(spte & SPTE_MMU_PRESENT) and spte != REMOVED_SPTE and is_last_spte(spte, level)
                if not leaf or level - 1 < size_class:
                    self._violate("stale_tlb_entry", f"vcpu {v.id} gfn {gfn:#x} size class {size_class}")
                elif writable and not spte & PT_WRITABLE:
                    self._violate("stale_tlb_write", f"vcpu {v.id} gfn {gfn:#x} writable in TLB only")

    def check_page_stats(self) -> None:
        counts = self.vm.mmu.count_leaves()
        st = self.vm.stat
        got = {1: st.pages_4k, 2: st.pages_2m, 3: st.pages_1g}
        if counts != got:
            self._violate("page_stats", f"stats {got} but page tables hold {counts}")
