"""``kvm_mmu_hugepage_adjust`` (spec §1.11): choose the mapping level of a direct fault.

The level starts at ``fault->max_level`` and is capped by dirty logging (4K), by the slot's
``disallow_lpage`` counters (misaligned slot edges, later write tracking), and by the host page size
(``host_pfn_mapping_level``). ``req_level`` is what the host and slot allow; ``goal_level`` is what
the fault will map (the NX huge-page workaround, which would lower it, is not enabled).
"""

from __future__ import annotations

from vsim.memslots import KVM_MEM_LOG_DIRTY_PAGES, Memslot
from vsim.mmu.page_fault import KvmPageFault
from vsim.mmu.spte import PG_LEVEL_4K


def kvm_mmu_max_mapping_level(slot: Memslot, gfn: int, max_level: int) -> int:
    """``kvm_mmu_max_mapping_level``: lpage_info and host mapping bounds at ``gfn``."""
    level = min(max_level, slot.host.host_pfn_mapping_level())
    if level == PG_LEVEL_4K:
        return level
    return slot.lpage_allowed_level(gfn, level)


def kvm_mmu_hugepage_adjust(fault: KvmPageFault) -> None:
    """Set ``fault.req_level`` and ``fault.goal_level``."""
    slot = fault.slot
    fault.req_level = PG_LEVEL_4K
    fault.goal_level = PG_LEVEL_4K
    if slot is None or fault.max_level == PG_LEVEL_4K:
        return
    assert isinstance(slot, Memslot)
    if slot.flags & KVM_MEM_LOG_DIRTY_PAGES or slot.host.page_level == PG_LEVEL_4K:
        return
    fault.req_level = kvm_mmu_max_mapping_level(slot, fault.gfn, fault.max_level)
    fault.goal_level = fault.req_level
