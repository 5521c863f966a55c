"""``struct kvm_page_fault``, the ``RET_PF_*`` codes and the page-fault error code.

The dispatcher that counts ``pf_taken``/``pf_fixed``/``pf_spurious``/``pf_emulate`` from the return
code (``kvm_mmu_do_page_fault``) lives with the vCPU's exit handling; each MMU mode supplies its
``page_fault`` pipeline (``kvm_tdp_mmu_page_fault`` for the TDP MMU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vsim.mmu.spte import PG_LEVEL_1G, PG_LEVEL_4K

if TYPE_CHECKING:
    from vsim.memslots import Memslot

# mmu_internal.h
RET_PF_CONTINUE = 0
RET_PF_RETRY = 1
RET_PF_EMULATE = 2
RET_PF_WRITE_PROTECTED = 3
RET_PF_INVALID = 4
RET_PF_FIXED = 5
RET_PF_SPURIOUS = 6
RET_PF_NAMES = {
    RET_PF_CONTINUE: "CONTINUE",
    RET_PF_RETRY: "RETRY",
    RET_PF_EMULATE: "EMULATE",
    RET_PF_WRITE_PROTECTED: "WRITE_PROTECTED",
    RET_PF_INVALID: "INVALID",
    RET_PF_FIXED: "FIXED",
    RET_PF_SPURIOUS: "SPURIOUS",
}

# Page-fault error code bits (PFERR_*).
PFERR_PRESENT_MASK = 1 << 0
PFERR_WRITE_MASK = 1 << 1
PFERR_USER_MASK = 1 << 2
PFERR_RSVD_MASK = 1 << 3
PFERR_FETCH_MASK = 1 << 4
PFERR_GUEST_FINAL_MASK = 1 << 32

KVM_MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G


@dataclass(slots=True)
class KvmPageFault:
    """``struct kvm_page_fault`` for a direct (TDP) fault."""

    addr: int
    gfn: int
    error_code: int
    id: int
    write: bool
    present: bool
    user: bool = False
    prefetch: bool = False
    max_level: int = KVM_MAX_HUGEPAGE_LEVEL
    req_level: int = PG_LEVEL_4K
    goal_level: int = PG_LEVEL_4K
    slot: Memslot | None = None
    pfn: int = -1
    map_writable: bool = False
    mmu_seq: int = 0

    @property
    def rsvd(self) -> bool:
        return bool(self.error_code & PFERR_RSVD_MASK)


def ept_violation_error_code(write: bool, present: bool) -> int:
    """``handle_ept_violation``: PFERR bits from the exit qualification of a final-GPA violation."""
    code = PFERR_GUEST_FINAL_MASK
    if write:
        code |= PFERR_WRITE_MASK
    if present:
        code |= PFERR_PRESENT_MASK
    return code
