"""MMU-notifier invalidations (``virt/kvm/kvm_main.c``, spec §1.6): the host MM takes pages away.

A host-MM actor (NUMA balancing, KSM, compaction or ``MADV_DONTNEED``, as configured in
``[host_mm]``) invalidates a range of guest memory again and again. Each invalidation is the
kernel's pair:

* ``kvm_mmu_notifier_invalidate_range_start``: under ``kvm->srcu``, for the memslots overlapping the
  range, take ``mmu_lock`` for write on the first hit and ``kvm_mmu_invalidate_begin``
  (``mmu_invalidate_in_progress++``, the range grows to the union); zap the leaves
  (``kvm_mmu_unmap_gfn_range`` → ``tdp_mmu_zap_leafs``); flush remote TLBs before unlocking if
  anything was zapped.
* the primary MMU changes its PTEs: the host pages get new pfns (migrated, or freed and later
  re-allocated), taking ``work`` ns;
* ``kvm_mmu_notifier_invalidate_range_end``: under the write lock, ``kvm_mmu_invalidate_end``
  (``mmu_invalidate_seq++``, then ``in_progress--``).

A fault snapshots ``mmu_invalidate_seq`` before it resolves the pfn and retries if an invalidation
covers its gfn or finished since (``mmu_invalidate_retry_gfn``), checked before and after the pfn
lookup without the lock (v6.8, R8's fix) and authoritatively under it.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

import numpy as np

from vsim.mmu.spte import pages_per_level
from vsim.requests import kvm_flush_remote_tlbs
from vsim.sched import ACTOR_PRIO_BASE, At, Proc, VmWideActor

if TYPE_CHECKING:
    from vsim.vm import Vm

HOST_MM_ACTOR_ID = -2


class HostMm(VmWideActor):
    """The host-MM thread that invalidates guest memory on a schedule."""

    actor_id = HOST_MM_ACTOR_ID

    def __init__(self, vm: Vm, rng: np.random.Generator) -> None:
        super().__init__(vm.env, ACTOR_PRIO_BASE + 1, vm.cfg.sim.mode == "reference", vm.mmu_lock)
        self.vm = vm
        self.cfg = vm.cfg.host_mm
        self.rng = rng
        self.invalidations = 0

    def ranges(self) -> Generator[tuple[int, int], None, None]:
        """The gfn ranges to invalidate, in order: whole host pages over the test region."""
        vm = self.vm
        span = pages_per_level(vm.memslots.slots[0].host.page_level) if vm.memslots.slots else 1
        total = len(vm.vcpus) * vm.cfg.workload.per_vcpu_memory // 4096
        size = -(-self.cfg.pages // span) * span
        count = max(1, total // size)
        for k in range(self.cfg.invalidations):
            i = k % count if self.cfg.pattern == "sequential" else int(self.rng.integers(count))
            lo = vm.region_base_gfn + i * size
            yield lo, min(lo + size, vm.region_base_gfn + total)

    def run(self) -> Proc[None]:
        yield At(self.env, 0, self.prio)
        cfg = self.cfg
        for k, (lo, hi) in enumerate(self.ranges()):
            self.now = max(self.now, cfg.start + k * cfg.interval)
            yield from self.invalidate_range(lo, hi)
        self.done = True

    def invalidate_range(self, lo: int, hi: int) -> Proc[None]:
        """One ``invalidate_range_start`` / primary-MMU change / ``invalidate_range_end``."""
        vm = self.vm
        c = vm.costs
        ev = self.sync()
        if ev is not None:
            yield ev
        t0 = self.now
        token = vm.srcu.read_lock(self.now)
        slots = [s for s in vm.memslots.slots if s.base_gfn < hi and lo < s.end_gfn]
        if slots:
            yield from self.mmu_lock_acquire(write=True)
            vm.kvm_mmu_invalidate_begin(lo, hi, self.actor_id)
            visited, flush = vm.mmu.zap_leafs(lo, hi, self.actor_id, self.now)
            self.now += c.mmu_notifier_invalidate + visited * c.tdp_zap_spte
            if flush:  # flush_on_ret: before the lock is dropped
                self.now = kvm_flush_remote_tlbs(vm, self.now, me=self.actor_id)
            yield from self.mmu_lock_release(write=True)
        vm.srcu.read_unlock(token, self.now)
        # The primary MMU now changes its PTEs: the pages get new pfns.
        free = self.cfg.action == "dontneed"
        for s in slots:
            a, b = max(lo, s.base_gfn), min(hi, s.end_gfn)
            shift = 9 * (s.host.page_level - 1)
            first = (s.host_offset + a - s.base_gfn) >> shift
            last = (s.host_offset + b - 1 - s.base_gfn) >> shift
            for idx in range(first, last + 1):
                s.host.replace_page(idx, free)
        self.now += self.cfg.work
        if slots:
            yield from self.mmu_lock_acquire(write=True)
            vm.kvm_mmu_invalidate_end(self.actor_id)
            yield from self.mmu_lock_release(write=True)
        self.invalidations += 1
        vm.stat.mmu_notifier_invalidations += 1
        if vm.sink.faults:
            vm.sink.emit("vsim_mmu_notifier_invalidate", t0, self.actor_id, lo, hi - lo, self.now - t0)
