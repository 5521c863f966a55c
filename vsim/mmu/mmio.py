"""MMIO SPTEs (spec §6): caching "this gfn has no memslot" in the EPT, tagged with a generation.

With EPT, an MMIO SPTE has RWX = 110b, which the hardware treats as a misconfiguration: an access
exits with ``EPT_MISCONFIG`` instead of walking on. The SPTE holds the gfn and the 19 low bits of
the memslots generation (bits 0-7 in SPTE bits 3-10, bits 8-18 in SPTE bits 52-62); the
in-progress bit is never stored. ``handle_mmio_page_fault`` trusts the SPTE only while its
generation equals the current one and no memslot update is in progress (``check_mmio_spte``);
otherwise the fault takes the full path, which installs a fresh MMIO SPTE or, if the gfn now has a
memslot, a real mapping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsim.mmu.page_fault import RET_PF_EMULATE, RET_PF_INVALID, RET_PF_RETRY
from vsim.mmu.spte import PFN_SHIFT, SPTE_MMU_PRESENT

if TYPE_CHECKING:
    from vsim.vcpu.kvm_vcpu import KvmVcpu

VMX_EPT_RWX_MASK = 0b111
VMX_EPT_MISCONFIG_WX_VALUE = 0b110  # shadow_mmio_value with EPT
MMIO_SPTE_GEN_LOW_BITS, MMIO_SPTE_GEN_LOW_SHIFT = 8, 3
MMIO_SPTE_GEN_HIGH_BITS, MMIO_SPTE_GEN_HIGH_SHIFT = 11, 52
MMIO_SPTE_GEN_MASK = (1 << (MMIO_SPTE_GEN_LOW_BITS + MMIO_SPTE_GEN_HIGH_BITS)) - 1  # 19 bits
KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS = 1 << 63


def make_mmio_spte(gfn: int, generation: int) -> int:
    """``make_mmio_spte``: the MMIO SPTE for ``gfn`` under memslots ``generation``."""
    gen = generation & MMIO_SPTE_GEN_MASK
    low = gen & ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1)
    high = gen >> MMIO_SPTE_GEN_LOW_BITS
    return (
        VMX_EPT_MISCONFIG_WX_VALUE
        | (low << MMIO_SPTE_GEN_LOW_SHIFT)
        | (high << MMIO_SPTE_GEN_HIGH_SHIFT)
        | (gfn << PFN_SHIFT)
    )


def is_mmio_spte(spte: int) -> bool:
    """``is_mmio_spte``: the MMIO value in the RWX bits, and not present to KVM."""
    return (spte & VMX_EPT_RWX_MASK) == VMX_EPT_MISCONFIG_WX_VALUE and not spte & SPTE_MMU_PRESENT


def get_mmio_spte_generation(spte: int) -> int:
    low = (spte >> MMIO_SPTE_GEN_LOW_SHIFT) & ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1)
    high = (spte >> MMIO_SPTE_GEN_HIGH_SHIFT) & ((1 << MMIO_SPTE_GEN_HIGH_BITS) - 1)
    return low | (high << MMIO_SPTE_GEN_LOW_BITS)


def get_mmio_spte_gfn(spte: int) -> int:
    return (spte >> PFN_SHIFT) & ((1 << (MMIO_SPTE_GEN_HIGH_SHIFT - PFN_SHIFT)) - 1)


def check_mmio_spte(generation: int, spte: int) -> bool:
    """``check_mmio_spte``: valid only with no update in progress and an equal 19-bit generation."""
    if generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
        return False
    return (generation & MMIO_SPTE_GEN_MASK) == get_mmio_spte_generation(spte)


def vcpu_cache_mmio_info(vcpu: KvmVcpu, gfn: int, generation: int) -> None:
    """``vcpu_cache_mmio_info``: remember the MMIO gfn, except while memslots are in flux."""
    if generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
        return
    vcpu.mmio_gfn = gfn
    vcpu.mmio_gen = generation


def handle_mmio_page_fault(vcpu: KvmVcpu, gfn: int) -> int:
    """``handle_mmio_page_fault`` for a direct MMU: the per-vCPU cache, then a lockless walk."""
    vm = vcpu.vm
    gen = vm.memslots.generation
    if vcpu.mmio_gfn == gfn and vcpu.mmio_gen == gen:
        if vm.checker is not None:
            vm.checker.on_mmio_hit(vcpu, gfn, gen, None)
        return RET_PF_EMULATE
    assert vcpu.root is not None
    spte = vm.mmu.walk_last(vcpu.root, gfn)[3]
    if not is_mmio_spte(spte):
        return RET_PF_RETRY  # zapped or changed under us
    if not check_mmio_spte(gen, spte):
        return RET_PF_INVALID
    if vm.checker is not None:
        vm.checker.on_mmio_hit(vcpu, gfn, gen, spte)
    vcpu_cache_mmio_info(vcpu, gfn, gen)
    return RET_PF_EMULATE
