"""Dirty logging (spec §10): the per-slot bitmap, enabling and disabling, GET and CLEAR.

``mark_page_dirty_in_slot`` sets a page's byte in ``slot.dirty_bitmap``. The rest are the VMM
thread's ioctls, run as generators on the ``Vmm`` actor because they take ``mmu_lock``, walk the TDP
MMU for a time proportional to what they visit, and flush remote TLBs:

* ``kvm_mmu_slot_apply_flags`` (from ``kvm_commit_memory_region``): on enable, nothing with
  manual-protect + ``INITIALLY_SET``; otherwise eager splitting (if on) and write protection of
  every leaf under the read lock, then an unconditional flush. On disable, huge pages are recovered
  in place (6.13+), with a flush if any were.
* With PML (``dirty_log.pml``) SPTEs stay writable: enabling clears D on the 4K leaves (and
  write-protects the huge ones), harvesting clears D instead of W, and GET first kicks every vCPU
  so that it drains its PML buffer. ``KVM_REQ_UPDATE_CPU_DIRTY_LOGGING`` switches each vCPU's PML
  on or off before anything else.
* ``kvm_get_dirty_log_protect``: with manual-protect a copy of the bitmap; otherwise, under the write
  lock, each dirty word is exchanged for zero and its 4K leaves are write-protected, then one flush.
* ``kvm_clear_dirty_log_protect``: under the write lock, clear the bits given, re-protect exactly
  those (``kvm_arch_mmu_enable_log_dirty_pt_masked``: with ``INITIALLY_SET`` first split and
  write-protect the huge pages around them), then one flush.

Slots are walked one page table (512 gfns) at a time; each piece lands at its own instant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from vsim.memslots import KVM_MEM_LOG_DIRTY_PAGES, Memslot
from vsim.mmu.spte import PG_LEVEL_2M, PG_LEVEL_4K, SPTE_ENT_PER_PAGE, pages_per_level
from vsim.requests import KVM_REQ_UPDATE_CPU_DIRTY_LOGGING, kvm_flush_remote_tlbs, kvm_make_all_cpus_request
from vsim.sched import Proc

if TYPE_CHECKING:
    from vsim.vmm import Vmm

WORD = 64  # gfns per dirty-bitmap word


def mark_page_dirty_in_slot(slot: Memslot | None, gfn: int) -> None:
    """``mark_page_dirty_in_slot``: set ``gfn``'s bit if the slot is dirty-logged."""
    if slot is not None and slot.dirty_bitmap is not None:
        slot.dirty_bitmap[gfn - slot.base_gfn] = 1


NO_BITMAP = np.zeros(0, dtype=np.uint8)


def dirty_bit(slot: Memslot | None, gfn: int) -> tuple[np.ndarray, int]:
    """Where compiled code marks ``gfn`` dirty: the slot's bitmap and the page's index in it, or
    no bitmap and -1 when the slot is not dirty-logged."""
    if slot is not None and slot.dirty_bitmap is not None:
        return slot.dirty_bitmap, gfn - slot.base_gfn
    return NO_BITMAP, -1


def _words(n: int) -> int:
    return -(-n // WORD)


def _pieces(slot: Memslot) -> range:
    return range(slot.base_gfn, slot.end_gfn, SPTE_ENT_PER_PAGE)


def _walk_slot(
    vmm: Vmm,
    slot: Memslot,
    write: bool,
    piece: Callable[[int, int], tuple[int, bool]],
    can_yield: bool = True,
    flush_on_yield: bool = False,
) -> Proc[bool]:
    """Hold ``mmu_lock`` (write or read) over a walk of ``slot``; ``piece(lo, hi)`` does one page
    table's range and returns ``(ns spent, flush needed)``. Returns whether a flush is still due.

    With ``can_yield``, when others wait for the lock between two pieces the walk yields it
    (``tdp_mmu_iter_cond_resched`` / ``cond_resched_rwlock_*``), flushing first if
    ``flush_on_yield`` and a flush is pending, and goes on with the next piece: it never revisits
    what it did (the forward-progress rule of R9's fix)."""
    vm = vmm.vm
    write = write or not vm.mmu.shared_range_ops  # rmap walks always take the write lock
    yield from vmm.mmu_lock_acquire(write)
    flush = False
    pieces = _pieces(slot)
    for k, lo in enumerate(pieces):
        if can_yield and k and vm.mmu_lock.waiters:
            if flush and flush_on_yield:
                vmm.now = kvm_flush_remote_tlbs(vm, vmm.now)
                flush = False
            vm.stat.mmu_lock_yields += 1
            yield from vmm.mmu_lock_release(write)
            yield from vmm.mmu_lock_acquire(write)
        ev = vmm.sync()
        if ev is not None:
            yield ev
        ns, f = piece(lo, min(lo + SPTE_ENT_PER_PAGE, slot.end_gfn))
        vmm.now += ns
        flush = flush or f
    yield from vmm.mmu_lock_release(write)
    return flush


def kvm_mmu_slot_apply_flags(vmm: Vmm, old: Memslot, new: Memslot) -> Proc[None]:
    """x86 ``kvm_mmu_slot_apply_flags`` for a dirty-logging change of ``new``."""
    vm = vmm.vm
    c = vm.costs
    mmu = vm.mmu
    actor = vmm.actor_id
    dl = vm.cfg.dirty_log
    enabling = bool(new.flags & KVM_MEM_LOG_DIRTY_PAGES and not old.flags & KVM_MEM_LOG_DIRTY_PAGES)
    disabling = bool(old.flags & KVM_MEM_LOG_DIRTY_PAGES and not new.flags & KVM_MEM_LOG_DIRTY_PAGES)
    if dl.pml and (enabling or disabling):
        # kvm_mmu_update_cpu_dirty_logging: switch PML on in every VMCS (or off) before anything.
        vm.nr_memslots_dirty_logging += 1 if enabling else -1
        _, vmm.now = kvm_make_all_cpus_request(vm, KVM_REQ_UPDATE_CPU_DIRTY_LOGGING, vmm.now)
    if enabling:
        if dl.manual_protect and dl.initially_set:
            return
        if dl.eager_split and new.host.page_level > PG_LEVEL_4K:
            # kvm_mmu_slot_try_split_huge_pages, read lock for the TDP MMU.
            def split(lo: int, hi: int) -> tuple[int, bool]:
                return mmu.try_split_huge_pages(lo, hi, PG_LEVEL_4K, actor, vmm.now) * c.tdp_split_spte, False

            yield from _walk_slot(vmm, new, False, split)

        # Without PML kvm_mmu_slot_remove_write_access(new, PG_LEVEL_4K); with PML clear D on the
        # 4K leaves (kvm_mmu_slot_leaf_clear_dirty) and write-protect the huge ones.
        def wrprot(lo: int, hi: int) -> tuple[int, bool]:
            if dl.pml:
                visited, f = mmu.clear_dirty_range(lo, hi, actor, vmm.now)
                v2, f2 = mmu.wrprot_range(lo, hi, PG_LEVEL_2M, False, actor, vmm.now)
                return (visited + v2) * c.tdp_wrprot_spte, f or f2
            visited, f = mmu.wrprot_range(lo, hi, PG_LEVEL_4K, False, actor, vmm.now)
            return visited * c.tdp_wrprot_spte, f

        yield from _walk_slot(vmm, new, False, wrprot)
        vmm.now = kvm_flush_remote_tlbs(vm, vmm.now)  # unconditional, after the unlock
    elif disabling:
        from vsim.mmu.tdp_mmu import TdpMmu  # (x86 code over the MMU, which imports this module)

        batch_flushes = vm.cfg.mmu.batch_collapse_flushes

        def recover(lo: int, hi: int) -> tuple[int, bool]:
            # Before 6.13 the TDP MMU flushes at each zap (cost-anchors 3.11).
            if isinstance(mmu, TdpMmu) and not batch_flushes:
                visited, zapped = mmu.zap_collapsible_sptes(new, lo, hi, actor, vmm.now)
                for _ in range(zapped):
                    vmm.now = kvm_flush_remote_tlbs(vm, vmm.now)
                return visited * c.tdp_zap_spte, False
            visited, f = mmu.recover_huge_pages(new, lo, hi, actor, vmm.now)
            return visited * c.tdp_zap_spte, f

        if new.host.page_level > PG_LEVEL_4K and (yield from _walk_slot(vmm, new, False, recover, True, True)):
            vmm.now = kvm_flush_remote_tlbs(vm, vmm.now)


def kvm_get_dirty_log(vmm: Vmm, slot: Memslot) -> Proc[np.ndarray]:
    """``KVM_GET_DIRTY_LOG`` (``kvm_get_dirty_log_protect``): returns the harvested bitmap."""
    vm = vmm.vm
    c = vm.costs
    bitmap = slot.dirty_bitmap
    assert bitmap is not None, "GET_DIRTY_LOG on a slot that is not dirty-logged"
    if vm.cfg.dirty_log.pml:
        # kvm_arch_sync_dirty_log: kick every vCPU so that it drains its PML buffer on the exit
        # (a plain kick: nobody waits for it).
        ev = vmm.sync()
        if ev is not None:
            yield ev
        kvm_make_all_cpus_request(vm, 0, vmm.now, wait=False)
    if vm.cfg.dirty_log.manual_protect:
        ev = vmm.sync()
        if ev is not None:
            yield ev
        snapshot = bitmap.copy()
        if vm.checker is not None:
            vm.checker.on_harvest(slot, snapshot, vmm.now)
        vmm.now += _words(slot.npages) * c.dirty_log_word
        return snapshot
    snapshot = np.zeros_like(bitmap)

    def xchg_and_protect(lo: int, hi: int) -> tuple[int, bool]:
        a, b = lo - slot.base_gfn, hi - slot.base_gfn
        snapshot[a:b] = bitmap[a:b]  # xchg(word, 0) for every word of the piece
        bitmap[a:b] = 0
        gfns = np.flatnonzero(snapshot[a:b]) + lo
        visited, f = vm.mmu.clear_dirty_pt_masked(gfns, vm.cfg.dirty_log.pml, vmm.actor_id, vmm.now)
        return _words(hi - lo) * c.dirty_log_word + visited * c.tdp_wrprot_spte, f

    yield from _walk_slot(vmm, slot, True, xchg_and_protect, can_yield=False)
    if vm.checker is not None:
        vm.checker.on_harvest(slot, snapshot, vmm.now)
    if snapshot.any():
        vmm.now = kvm_flush_remote_tlbs(vm, vmm.now)  # kvm_flush_remote_tlbs_memslot
    yield from _returned(vmm, slot)
    return snapshot


def kvm_clear_dirty_log(vmm: Vmm, slot: Memslot, mask: np.ndarray) -> Proc[int]:
    """``KVM_CLEAR_DIRTY_LOG`` over the whole slot with ``mask`` (what GET returned); returns the
    pages re-protected."""
    vm = vmm.vm
    c = vm.costs
    bitmap = slot.dirty_bitmap
    assert bitmap is not None, "CLEAR_DIRTY_LOG on a slot that is not dirty-logged"
    cleared_total = 0
    any_cleared = False

    def clear(lo: int, hi: int) -> tuple[int, bool]:
        nonlocal cleared_total, any_cleared
        a, b = lo - slot.base_gfn, hi - slot.base_gfn
        cleared = bitmap[a:b] & mask[a:b]  # atomic fetch_andnot on each word
        bitmap[a:b] &= ~mask[a:b]
        gfns = np.flatnonzero(cleared) + lo
        ns = _words(hi - lo) * c.dirty_log_word
        if len(gfns):
            cleared_total += len(gfns)
            any_cleared = True
            ns += _enable_log_dirty_pt_masked(vmm, slot, gfns)
        return ns, False

    yield from _walk_slot(vmm, slot, True, clear, can_yield=False)
    if any_cleared:
        vmm.now = kvm_flush_remote_tlbs(vm, vmm.now)  # kvm_flush_remote_tlbs_memslot
    yield from _returned(vmm, slot)
    return cleared_total


def _enable_log_dirty_pt_masked(vmm: Vmm, slot: Memslot, gfns: np.ndarray) -> int:
    """``kvm_arch_mmu_enable_log_dirty_pt_masked`` for sorted ``gfns``; returns the ns spent."""
    vm = vmm.vm
    c = vm.costs
    mmu = vm.mmu
    actor = vmm.actor_id
    ns = 0
    dl = vm.cfg.dirty_log
    if dl.manual_protect and dl.initially_set and slot.host.page_level > PG_LEVEL_4K:
        start, end = int(gfns[0]), int(gfns[-1])
        if dl.eager_split:
            ns += mmu.try_split_huge_pages(start, end + 1, PG_LEVEL_4K, actor, vmm.now) * c.tdp_split_spte
        # kvm_mmu_slot_gfn_write_protect(PG_LEVEL_2M) on the huge pages holding the first and last gfn.
        for g in {start, end} if start // pages_per_level(2) != end // pages_per_level(2) else {start}:
            visited, _ = mmu.wrprot_range(g, g + 1, PG_LEVEL_2M, True, actor, vmm.now)
            ns += visited * c.tdp_wrprot_spte
    visited, _ = mmu.clear_dirty_pt_masked(gfns, dl.pml, actor, vmm.now)
    return ns + visited * c.tdp_wrprot_spte


def _returned(vmm: Vmm, slot: Memslot) -> Proc[None]:
    """The ioctl returns to userspace: writes from now on must show up in a later harvest."""
    ev = vmm.sync()
    if ev is not None:
        yield ev
    if vmm.vm.checker is not None:
        vmm.vm.checker.on_harvest_returned(slot, vmm.now)
