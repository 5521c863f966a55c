"""The userspace VMM thread: ``KVM_SET_USER_MEMORY_REGION`` calls on a timed schedule.

``kvm_set_memory_region`` (``virt/kvm/kvm_main.c``, spec §5.2) runs under ``slots_lock``. It builds
the new memslot set and publishes it with ``kvm_swap_active_memslots`` (§5.3), whose generation
handling follows ``memslots.generation_scheme``:

* ``in_progress_bit``: the new set carries the old generation with bit 63 set; after
  ``synchronize_srcu`` the generation becomes the old one plus the step (today's kernel);
* ``double_increment``: step before publishing and again after ``synchronize_srcu`` (the 2014 fix);
* ``single_increment``: one step before publishing and none after (the bug before that fix).

The step is the number of address spaces. DELETE and MOVE first mark the slot INVALID and publish
that (``kvm_invalidate_memslot``), then ``kvm_arch_flush_shadow_memslot`` runs
``kvm_mmu_zap_all_fast``, then the final set is published: two swaps, so two generation updates.
The ``stress`` schedule adds and deletes a one-page dummy slot just below the test region, as
``memslot_modification_stress_test`` does.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from vsim.dirty_log import kvm_mmu_slot_apply_flags
from vsim.memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEMSLOT_INVALID, Memslot, Memslots
from vsim.mmu.fast_zap import kvm_mmu_zap_all_fast
from vsim.mmu.mmio import KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS, MMIO_SPTE_GEN_MASK
from vsim.mmu.spte import PG_LEVEL_4K
from vsim.sched import ACTOR_PRIO_BASE, At, Proc, VmWideActor

if TYPE_CHECKING:
    from vsim.config.schema import MemslotOp
    from vsim.vm import Vm

VMM_ACTOR_ID = -1  # the "vcpu" field of events the VMM logs
CHANGE_NAMES = {"create": "KVM_MR_CREATE", "flags": "KVM_MR_FLAGS_ONLY", "delete": "KVM_MR_DELETE",
                "move": "KVM_MR_MOVE"}  # fmt: skip
DUMMY_SLOT_ID = 1 << 15  # memslot_modification_stress_test uses a slot outside the test's


class Vmm(VmWideActor):
    """The VMM's memslot-update thread."""

    actor_id = VMM_ACTOR_ID

    def __init__(self, vm: Vm) -> None:
        super().__init__(vm.env, ACTOR_PRIO_BASE, vm.cfg.sim.mode == "reference", vm.mmu_lock)
        self.vm = vm
        self.ops = schedule(vm)
        self._op_id = 0

    def run(self) -> Proc[None]:
        yield At(self.env, 0, self.prio)
        if self.vm.program is not None:
            yield from self.vm.program.run(self)
        for op in self.ops:
            self.now = max(self.now, op.at)
            ev = self.sync()
            if ev is not None:
                yield ev
            yield from self.kvm_set_memory_region(op)
        self.done = True

    def kvm_set_memory_region(self, op: MemslotOp) -> Proc[None]:
        vm = self.vm
        self._op_id += 1
        t0 = self.now
        change = CHANGE_NAMES[op.op]
        if vm.sink.faults:
            vm.sink.emit("vsim_set_memory_region", t0, VMM_ACTOR_ID, self._op_id, change, op.slot)
        srcu_ns = zap_ns = 0
        others = [s for s in vm.memslots.slots if s.id != op.slot]
        if op.op in ("delete", "move"):
            # kvm_invalidate_memslot: publish the slot as INVALID, then zap everything.
            (old,) = [s for s in vm.memslots.slots if s.id == op.slot]
            invalid = replace(old, flags=old.flags | KVM_MEMSLOT_INVALID)
            srcu_ns += yield from self.kvm_swap_active_memslots(Memslots([*others, invalid]))
            zap_ns = yield from kvm_mmu_zap_all_fast(self)
        # kvm_prepare_memory_region: metadata (lpage_info, rmaps, dirty bitmap) for the new slot.
        self.now += vm.costs.memslot_update
        if op.op == "create":
            slots = [*vm.memslots.slots, vm.absent_slots.pop(op.slot)]
        elif op.op == "delete":
            vm.absent_slots[op.slot] = old
            slots = others
        elif op.op == "move":
            assert op.to_gpa is not None  # (the config requires it for a move)
            slots = [*others, old.moved_to(op.to_gpa >> 12)]
        else:
            (old,) = [s for s in vm.memslots.slots if s.id == op.slot]
            new = self._with_dirty_logging(old, op.log_dirty)
            slots = [new if s.id == op.slot else s for s in vm.memslots.slots]
        srcu_ns += yield from self.kvm_swap_active_memslots(Memslots(slots))
        if op.op == "flags":  # kvm_commit_memory_region -> kvm_mmu_slot_apply_flags
            yield from kvm_mmu_slot_apply_flags(self, old, new)
            if vm.checker is not None and op.log_dirty:
                vm.checker.on_harvest_returned(new, self.now)  # logging starts as the ioctl returns
        total = self.now - t0
        vm.stat.memslot_updates += 1
        vm.memslot_update_ns.append(total)
        vm.memslot_srcu_ns.append(srcu_ns)
        vm.memslot_zap_ns.append(zap_ns)
        if vm.sink.faults:
            vm.sink.emit("vsim_set_memory_region_done", self.now, VMM_ACTOR_ID, self._op_id, change, op.slot,
                         total, srcu_ns, zap_ns)  # fmt: skip

    def _with_dirty_logging(self, old: Memslot, on: bool) -> Memslot:
        """The FLAGS_ONLY slot: ``KVM_MEM_LOG_DIRTY_PAGES`` set with a new bitmap (all ones with
        manual-protect + ``INITIALLY_SET``), or cleared with the bitmap freed."""
        vm = self.vm
        if not on:
            return replace(old, flags=old.flags & ~KVM_MEM_LOG_DIRTY_PAGES, dirty_bitmap=None)
        dl = vm.cfg.dirty_log
        fill = 1 if dl.manual_protect and dl.initially_set else 0
        if old.host.page_level > PG_LEVEL_4K or dl.pml:
            # vCPUs will split huge leaves on write faults, or set D bits that harvesting clears
            # and other vCPUs' walks read (see Vm.horizon).
            vm.lockstep = True
        return replace(old, flags=old.flags | KVM_MEM_LOG_DIRTY_PAGES,
                       dirty_bitmap=np.full(old.npages, fill, dtype=np.uint8))  # fmt: skip

    def kvm_swap_active_memslots(self, new: Memslots) -> Proc[int]:
        """Publish ``new``, wait out the SRCU readers of the old set, settle the generation.
        Returns the grace period's length."""
        vm = self.vm
        scheme = vm.cfg.memslots.generation_scheme
        step = vm.cfg.memslots.address_spaces
        gen = vm.memslots.generation
        assert not gen & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
        first = gen | KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS if scheme == "in_progress_bit" else gen + step
        ev = self.sync()
        if ev is not None:
            yield ev
        vm.publish_memslots(new, first, self.now)
        grace = yield from self.synchronize_srcu()
        if scheme == "in_progress_bit":
            final = (first & ~KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS) + step
        elif scheme == "double_increment":
            final = first + step
        else:
            final = first  # single_increment: nothing after the grace period (the R1 bug)
        ev = self.sync()
        if ev is not None:
            yield ev
        vm.settle_memslots(final, self.now)
        yield from self.kvm_arch_memslots_updated(final)
        return grace

    def synchronize_srcu(self) -> Proc[int]:
        """``synchronize_srcu[_expedited]``: wait for the readers that started before now."""
        vm = self.vm
        t_s = self.now
        srcu = vm.srcu
        tokens = srcu.readers_before(t_s)
        if vm.sink.faults:
            vm.sink.emit("vsim_synchronize_srcu", t_s, VMM_ACTOR_ID, len(tokens))
        ev = srcu.wait_for(tokens)
        if ev is not None:
            self.sleeping_until = None
            self.now = max(self.now, (yield ev))
        else:
            self.now = max(self.now, srcu.last_end(tokens))
        gp = vm.costs.srcu_expedited_gp if vm.cfg.memslots.srcu_expedited else vm.costs.srcu_normal_gp
        self.now = max(self.now, t_s + gp)
        grace = self.now - t_s
        srcu.grace_ns.append(grace)
        if vm.sink.faults:
            vm.sink.emit("vsim_synchronize_srcu_done", self.now, VMM_ACTOR_ID, grace)
        return grace

    def kvm_arch_memslots_updated(self, gen: int) -> Proc[None]:
        """x86: ``kvm_mmu_invalidate_mmio_sptes``. Without the address-space residue, a 19-bit MMIO
        generation of 0 means it wrapped: old MMIO SPTEs could look current again, so zap all."""
        nr_as = self.vm.cfg.memslots.address_spaces
        if ((gen >> (nr_as - 1)) & MMIO_SPTE_GEN_MASK) == 0:
            self.vm.stat.mmio_generation_wraps += 1
            yield from kvm_mmu_zap_all_fast(self)


def schedule(vm: Vm) -> list[MemslotOp]:
    """The VMM's calls in time order: the configured ops plus the dummy-slot stress loop."""
    from vsim.config.schema import MemslotOp

    ops = list(vm.cfg.vmm.ops)
    st = vm.cfg.vmm.stress
    for k in range(st.iterations):
        t = st.start + 2 * k * st.interval
        ops.append(MemslotOp(at=t, op="create", slot=DUMMY_SLOT_ID))
        ops.append(MemslotOp(at=t + st.interval, op="delete", slot=DUMMY_SLOT_ID))
    return sorted(ops, key=lambda o: o.at)
