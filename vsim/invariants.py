"""The opt-in invariant checker (spec §13). ``sim.invariants = true`` turns it on; tests run with it.

Checks made in this version:

* §13.9 SPTE legality: every SPTE written obeys the (Host-writable, MMU-writable, W) lattice.
* §13.2 a present leaf never changes pfn in place (present → non-present → present).
* No stale translation: at the end of the run, every translation in every vCPU's TLB is backed by a
  present leaf SPTE of at least its size that grants at least its permission.
* Page stats agree with the page tables: ``pages_4k/2m/1g`` equal the present leaves counted.
* §13.4 MMIO hit validity: an MMIO SPTE or MMIO-cache hit is accepted only with an equal 19-bit
  generation and no update in progress.
* §13.10 generation monotonicity: the generation (without the in-progress bit) never decreases, and
  once an update settles it has moved by the step (the number of address spaces).
* §13.7 root reload: no VM entry on an obsolete (invalidated) root.
* §13.1 no stale translation after a flush: a vCPU that enters the guest after a remote flush
  completed has flushed its TLB since every SPTE restriction (leaf zapped, W cleared) that flush
  covered, or else holds no translation more permissive than the SPTEs.
* No stale MMIO: an access emulated as MMIO for a gfn that has a memslot, after the update that
  created the memslot has completed.

A violation is recorded (and logged as ``vsim_invariant_violation``) rather than raised, so a run
shows every violation it hits; ``stats.json`` reports them and tests require none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vsim.mmu.mmio import (
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    MMIO_SPTE_GEN_MASK,
    get_mmio_spte_generation,
    is_mmio_spte,
)
from vsim.mmu.spte import (
    PT_WRITABLE,
    REMOVED_SPTE,
    SPTE_MMU_PRESENT,
    SPTE_MMU_WRITABLE,
    is_last_spte,
    spte_is_legal,
    spte_to_pfn,
)
from vsim.requests import IN_GUEST_MODE, KVM_REQ_TLB_FLUSH

if TYPE_CHECKING:
    from vsim.memslots import Memslot
    from vsim.vcpu.kvm_vcpu import KvmVcpu
    from vsim.vm import Vm


class InvariantChecker:
    """Records violations of the spec's invariants as ``(t_ns, rule, detail)``."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.violations: list[tuple[int, str, str]] = []
        self._last_restriction = -1  # time of the latest SPTE restriction not yet covered by a flush
        # (done, latest restriction it covers) for every remote flush, in request order.
        self._flushes: list[tuple[int, int]] = []
        self._covered_base = -1  # the latest restriction covered by a flush done before the clock
        self._local_flush: dict[int, int] = {}  # vCPU id -> time of its last full TLB flush
        self._carry: dict[int, list[int]] = {}  # slot -> written pages still in PML buffers
        # Test-region pages the guest wrote since the last harvest of their slot returned; the vCPUs
        # set them as writes complete (the batch kernel included).
        self.written = np.zeros(vm.cfg.vm.vcpus * vm.cfg.workload.per_vcpu_memory // 4096, dtype=np.uint8)

    def _violate(self, rule: str, detail: str, t: int | None = None, actor: int = -1) -> None:
        """Record a violation seen by ``actor`` at its time ``t`` (the global clock by default)."""
        t = self.vm.env.now if t is None else t
        self.violations.append((t, rule, detail))
        if self.vm.sink.faults:
            self.vm.sink.emit("vsim_invariant_violation", t, actor, rule, detail)

    def on_spte_changed(self, gfn: int, old: int, new: int, level: int, t: int, actor: int) -> None:
        if is_last_spte(new, level) and not spte_is_legal(new):
            self._violate("spte_legality", f"gfn {gfn:#x} level {level} spte {new:#x}", t, actor)
        old_leaf = bool(old & SPTE_MMU_PRESENT) and old != REMOVED_SPTE and is_last_spte(old, level)
        new_leaf = bool(new & SPTE_MMU_PRESENT) and new != REMOVED_SPTE and is_last_spte(new, level)
        if old_leaf and (not (new & SPTE_MMU_PRESENT) or new == REMOVED_SPTE or
                         (new_leaf and old & PT_WRITABLE and not new & PT_WRITABLE)):  # fmt: skip
            self._last_restriction = max(self._last_restriction, t)
        if new_leaf and self.vm.host_mm is not None:
            slot = self.vm.memslots.gfn_to_memslot(gfn)
            if slot is not None and spte_to_pfn(new) != slot.gfn_to_pfn(gfn):
                self._violate("stale_pfn", f"gfn {gfn:#x} mapped to pfn {spte_to_pfn(new):#x}, the host has "
                              f"{slot.gfn_to_pfn(gfn):#x}", t, actor)  # fmt: skip
        if old_leaf and is_mmio_spte(new):
            self._violate("present_leaf_to_mmio", f"gfn {gfn:#x} level {level}: a present leaf became an MMIO "
                          "SPTE (the TDP MMU would BUG)", t, actor)  # fmt: skip
        if old_leaf and new_leaf and spte_to_pfn(old) != spte_to_pfn(new):
            self._violate("leaf_pfn_changed_in_place", f"gfn {gfn:#x} pfn {spte_to_pfn(old):#x}->{spte_to_pfn(new):#x}",
                          t, actor)  # fmt: skip

    def on_write_tracked(self, gfn: int, t: int) -> None:
        """§13.3: when ``account_shadowed`` returns at ``t``, no vCPU can still write ``gfn`` through
        its TLB: each writable translation of it belongs to a vCPU whose flush is already due (a
        pending ``KVM_REQ_TLB_FLUSH`` whose IPI has arrived, or that it takes at its next entry)."""
        keys = self.vm.mmu.tlb_keys_of_gfn(gfn)
        for v in self.vm.vcpus:
            if v.root is None or v.root.invalid:
                continue
            if v.requests & KVM_REQ_TLB_FLUSH and (v.mode != IN_GUEST_MODE or v.kick_at <= t):
                continue
            if any(v.tlb.peek(c, key) > 0 for c, key in keys):
                self._violate("write_tracked_writable_tlb", f"vcpu {v.id} can still write gfn {gfn:#x}, which "
                              "is now a shadowed guest page table", t)  # fmt: skip

    def on_flush(self, t: int, done: int) -> None:
        """A remote flush requested at ``t`` covers every restriction made up to ``t``."""
        if self._last_restriction >= 0:
            self._flushes.append((done, self._last_restriction))

    def on_harvest(self, slot: Memslot, snapshot: np.ndarray, t: int) -> None:
        """§13.5: a harvest holds every page written since the previous one returned."""
        a = slot.base_gfn - self.vm.region_base_gfn
        if a < 0 or a + slot.npages > len(self.written):
            return
        missing = np.flatnonzero(self.written[a : a + slot.npages] & ~snapshot)
        # Writes still in a vCPU's PML buffer reach the bitmap at its next exit: a later harvest.
        in_flight = {g - slot.base_gfn for v in self.vm.vcpus for g in v.pml_buf[: v.pml_n[0]].tolist()}
        self._carry[slot.id] = [k for k in missing.tolist() if k in in_flight]
        missing = np.array([k for k in missing.tolist() if k not in in_flight], dtype=np.int64)
        if missing.size:
            gfn = slot.base_gfn + int(missing[0])
            self._violate("dirty_log_incomplete", f"slot {slot.id}: {missing.size} written pages not harvested "
                          f"(first gfn {gfn:#x})", t)  # fmt: skip

    def on_harvest_returned(self, slot: Memslot, t: int) -> None:
        """GET (without manual-protect), CLEAR or the enabling ioctl returned to userspace."""
        a = slot.base_gfn - self.vm.region_base_gfn
        if a >= 0:
            self.written[a : a + slot.npages] = 0
            for k in self._carry.pop(slot.id, []):
                self.written[a + k] = 1

    def on_local_flush(self, vcpu: KvmVcpu) -> None:
        """The vCPU emptied its TLB: every restriction made so far is covered, including one made
        at a later time by an actor running ahead (the walks that refill the TLB see it)."""
        self._local_flush[vcpu.id] = max(vcpu.now, self._last_restriction)

    def on_entry(self, vcpu: KvmVcpu) -> None:
        """§13.1 at VM entry: a completed flush's restrictions are out of this vCPU's TLB."""
        # Flushes done by the global clock are covered for every vCPU (none is behind it): fold them.
        now = self.vm.env.now
        if any(done <= now for done, _ in self._flushes):
            self._covered_base = max([self._covered_base] + [r for done, r in self._flushes if done <= now])
            self._flushes = [(done, r) for done, r in self._flushes if done > now]
        covered = max((r for done, r in self._flushes if done <= vcpu.now), default=self._covered_base)
        covered = max(covered, self._covered_base)
        if covered >= 0 and self._local_flush.get(vcpu.id, -1) < covered:
            self._check_tlb(vcpu, "stale_tlb_after_flush", vcpu.now)

    def entry_check_due(self, vcpu: KvmVcpu) -> bool:
        """Whether ``on_entry`` may yet check this vCPU's TLB (some completed or pending flush covers
        a restriction its last local flush does not): the vCPU group then leaves the entry to
        Python, which calls ``on_entry``."""
        covered = max([self._covered_base] + [r for _, r in self._flushes])
        return covered >= 0 and self._local_flush.get(vcpu.id, -1) < covered

    def on_mmio_hit(self, vcpu: KvmVcpu, gfn: int, generation: int, spte: int | None) -> None:
        stored = get_mmio_spte_generation(spte) if spte is not None else vcpu.mmio_gen & MMIO_SPTE_GEN_MASK
        if generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS or stored != generation & MMIO_SPTE_GEN_MASK:
            self._violate("mmio_hit_validity", f"vcpu {vcpu.id} gfn {gfn:#x} generation {stored} vs {generation:#x}",
                          vcpu.now, vcpu.id)  # fmt: skip

    def on_mmio_invalid_slot(self, vcpu: KvmVcpu, gfn: int) -> None:
        """§12 R2: an access to a slot being deleted or moved must retry, never become MMIO."""
        self._violate("mmio_on_invalid_slot", f"vcpu {vcpu.id} gfn {gfn:#x} emulated as MMIO while its slot "
                      "is INVALID", vcpu.now, vcpu.id)  # fmt: skip

    def on_obsolete_install(self, vcpu: KvmVcpu, gfn: int) -> None:
        """§12 R3: a fault maps into a root a fast zap has invalidated."""
        self._violate("install_into_obsolete_root", f"vcpu {vcpu.id} gfn {gfn:#x}", vcpu.now, vcpu.id)

    def on_obsolete_entry(self, vcpu: KvmVcpu) -> None:
        """§13.7: a vCPU never enters the guest on an obsolete root."""
        self._violate("obsolete_root_entry", f"vcpu {vcpu.id} entered on an invalid root", vcpu.now, vcpu.id)

    def on_stale_mmio(self, vcpu: KvmVcpu, gfn: int) -> None:
        self._violate("stale_mmio", f"vcpu {vcpu.id} gfn {gfn:#x} emulated as MMIO but has a memslot", vcpu.now,
                      vcpu.id)  # fmt: skip

    def on_generation(self, old: int, new: int, t: int) -> None:
        flag = KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
        o, n = old & ~flag, new & ~flag
        if n < o:
            self._violate("generation_monotonic", f"generation went from {o} to {n}", t)
        if not new & flag and old & flag and n != o + self.vm.cfg.memslots.address_spaces:
            step = self.vm.cfg.memslots.address_spaces
            self._violate("generation_step", f"update settled at {n}, expected {o + step}", t)

    def check_end_of_run(self) -> None:
        self.check_tlbs()
        self.check_page_stats()
        check_rmaps = getattr(self.vm.mmu, "check_rmaps", None)
        if check_rmaps is not None:  # the legacy MMU: rmap and SPTEs agree, parent_ptes and links agree
            for problem in check_rmaps():
                self._violate("rmap_spte_agreement", problem)
        check_shadow = getattr(self.vm.mmu, "check_shadow", None)
        if check_shadow is not None:  # shadow paging: role discipline (§13.8), write tracking (§13.3)
            for rule, problem in check_shadow():
                self._violate(rule, problem)

    def check_tlbs(self) -> None:
        """Every cached translation is backed by the current SPTEs (no stale translation)."""
        for v in self.vm.vcpus:
            if not v.requests & KVM_REQ_TLB_FLUSH:  # else it flushes before it can use an entry
                self._check_tlb(v, "stale_tlb")

    def _check_tlb(self, v: KvmVcpu, rule: str, t: int | None = None) -> None:
        # A vCPU on an invalidated root cannot enter without reloading, which flushes its TLB
        # (on_obsolete_entry checks that); its entries are not translations it can use.
        if v.root is None or v.root.invalid:
            return
        mmu = self.vm.mmu
        ad = self.vm.cfg.mmu.ept_ad
        for size_class, key, writable in v.tlb.entries():
            gfn = key << (9 * size_class)
            table, idx, level, spte = mmu.walk_last(v.root, gfn)
            leaf = bool(spte & SPTE_MMU_PRESENT) and spte != REMOVED_SPTE and is_last_spte(spte, level)
            if not ad and spte & SPTE_MMU_WRITABLE:
                # Without A/D bits aging drops W (and RWX) with no flush, and a read fault gives
                # only R and X back: a cached writable translation of an MMU-writable page stays.
                spte |= PT_WRITABLE
            if not leaf or level - 1 < size_class:
                self._violate(f"{rule}_entry", f"vcpu {v.id} gfn {gfn:#x} size class {size_class}", t, v.id)
            elif writable and not spte & PT_WRITABLE:
                self._violate(f"{rule}_write", f"vcpu {v.id} gfn {gfn:#x} writable in TLB only", t, v.id)

    def check_page_stats(self) -> None:
        counts = self.vm.mmu.count_leaves()
        st = self.vm.stat
        got = {1: st.pages_4k, 2: st.pages_2m, 3: st.pages_1g}
        if counts != got:
            self._violate("page_stats", f"stats {got} but page tables hold {counts}")
