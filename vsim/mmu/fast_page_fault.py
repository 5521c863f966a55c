"""``fast_page_fault`` (spec §1.5): the lockless fix-up of a present SPTE.

It only ever adds permission (W on an MMU-writable SPTE that dirty logging or access tracking
write-protected), so it needs neither ``mmu_lock`` nor a TLB flush. Only direct MMUs qualify.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from numba.extending import register_jitable

from vsim.dirty_log import mark_page_dirty_in_slot
from vsim.memslots import KVM_MEM_LOG_DIRTY_PAGES
from vsim.mmu.page_fault import (
    RET_PF_FIXED,
    RET_PF_INVALID,
    RET_PF_NAMES,
    RET_PF_SPURIOUS,
    KvmPageFault,
)
from vsim.mmu.spte import (
    PG_LEVEL_4K,
    PT_PRESENT_R,
    PT_WRITABLE,
    is_access_track_spte,
    is_last_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    restore_acc_track_spte,
)

if TYPE_CHECKING:
    from vsim.mmu.page_tables import PageTables
    from vsim.vcpu.kvm_vcpu import KvmVcpu

FAST_PF_MAX_RETRIES = 4  # gives up after ++retry_count > 4


def page_fault_can_be_fast(fault: KvmPageFault, ad_enabled: bool = True) -> bool:
    """``page_fault_can_be_fast``: never MMIO; not-present only with A/D off; present only writes."""
    if fault.rsvd:
        return False
    if not fault.present:
        return not ad_enabled
    return fault.write


@register_jitable
def is_access_allowed(write: bool, spte: int) -> bool:
    """``is_access_allowed``: the SPTE already permits the faulting access."""
    if write:
        return bool(spte & PT_WRITABLE)
    return bool(spte & PT_PRESENT_R)


@register_jitable
def fast_pf_fix(old: int, level: int, write: bool, logged: bool) -> tuple[int, int]:
    """What ``fast_page_fault`` makes of the last SPTE ``old`` on the walk, at ``level``, for a
    write or a read, in a dirty-logged slot or not: ``(RET_PF_FIXED, new)`` to cmpxchg,
    ``(RET_PF_SPURIOUS, old)`` if the access is already allowed, ``(RET_PF_INVALID, old)`` for
    the slow path (with the SPTE it got as far as building, which the tracepoint shows)."""
    if not is_shadow_present_pte(old) or not is_last_spte(old, level):
        return RET_PF_INVALID, old
    if is_access_allowed(write, old):
        return RET_PF_SPURIOUS, old
    new = old
    if is_access_track_spte(new):  # aged without A/D bits: give R and X back
        new = restore_acc_track_spte(new)
    if write and is_mmu_writable_spte(old):
        new |= PT_WRITABLE
        # A huge leaf in a dirty-logged slot must be remapped at 4K by the slow path.
        if level > PG_LEVEL_4K and logged:
            return RET_PF_INVALID, new
    if not is_access_allowed(write, new):
        return RET_PF_INVALID, new
    return RET_PF_FIXED, new


def fast_page_fault(mmu: PageTables, vcpu: KvmVcpu, fault: KvmPageFault) -> int:
    """Try to fix ``fault`` with a cmpxchg on the last SPTE; ``RET_PF_INVALID`` means go slow."""
    vid = vcpu.id
    t = vcpu.now
    root = vcpu.root
    assert root is not None
    ret = RET_PF_INVALID
    old = new = 0
    retries = 0
    slot = vcpu.gfn_to_memslot(fault.gfn)
    logged = slot is not None and bool(slot.flags & KVM_MEM_LOG_DIRTY_PAGES)
    while True:
        table, idx, level, old = mmu.fast_pf_get_last_sptep(root, fault.gfn)
        fix, new = fast_pf_fix(old, level, fault.write, logged)
        if fix != RET_PF_FIXED:
            ret = fix
            break
        base = fault.gfn & ~((1 << (9 * (level - 1))) - 1)
        if mmu.try_cmpxchg(table, idx, level, base, old, new, vid, t):
            ret = RET_PF_FIXED
            vcpu.stat.pf_fast += 1
            if new & PT_WRITABLE and not old & PT_WRITABLE:
                mark_page_dirty_in_slot(slot, fault.gfn)
            break
        retries += 1
        if retries > FAST_PF_MAX_RETRIES:
            break
    if mmu.vm.sink.all:
        mmu.vm.sink.emit("fast_page_fault", t, vid, fault.gfn, old, new, RET_PF_NAMES[ret])
    return ret
