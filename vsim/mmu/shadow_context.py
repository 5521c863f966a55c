"""Shadow paging's MMU context: the guest's paging mode and memory, the state that write tracking
and unsync share, and the helpers every part of the shadow MMU uses.

The shadow MMU is built in layers over the legacy MMU, each a class on top of the one before, so
that each part is checked against what it uses: this context, then write tracking
(``vsim.mmu.page_track``), unsync and sync (``vsim.mmu.unsync``), the checker's inspection
(``vsim.mmu.shadow_checks``), and the fault path (``ShadowPagingMmu``, ``vsim.mmu.shadow_mmu``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsim.mmu.legacy_mmu import LegacyMmu
from vsim.mmu.spte import PFN_MASK, PFN_SHIFT
from vsim.requests import kvm_flush_remote_tlbs

if TYPE_CHECKING:
    from vsim.guest.memory import GuestMemory
    from vsim.guest.paging import PagingMode
    from vsim.memslots import Memslot
    from vsim.mmu.mmu_page_view import KvmMmuPage
    from vsim.vm import Vm


class ShadowContext(LegacyMmu):
    """``vcpu->arch.mmu`` for a shadow-paged guest (one guest paging mode for the VM), with
    ``kvm->arch``'s write-tracking state."""

    mode = "shadow"
    indirect = True

    def __init__(self, vm: Vm, guest_mode: PagingMode, guest_mem: GuestMemory, initial_tables: int = 64) -> None:
        super().__init__(vm, initial_tables)
        self.guest_mode = guest_mode
        self.guest_mem = guest_mem
        self.track_slot: dict[KvmMmuPage, Memslot | None] = {}  # the slot each accounted page's gfn was in
        self.accounted: dict[int, int] = {}  # gfn -> indirect shadow pages accounted for it
        self.indirect_shadow_pages = 0  # kvm->arch.indirect_shadow_pages
        c = vm.costs
        self._c_gpte = c.walk_gpte
        self._c_track = c.track_write
        self._c_sync = c.sync_spte
        self._flush_on_mmu_writable = vm.cfg.mmu.wrprot_flush_on_mmu_writable  # False brings back R5

    @staticmethod
    def child_table(spte: int) -> int:
        """The pool index of the table a non-leaf SPTE points to."""
        return (spte & PFN_MASK) >> PFN_SHIFT

    def flush_remote(self, actor: int, t: int) -> int:
        """``kvm_flush_remote_tlbs`` from ``actor`` at ``t``; returns when it goes on."""
        return kvm_flush_remote_tlbs(self.vm, t, me=actor)
