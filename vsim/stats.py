"""KVM-named statistics: per-vCPU (``struct kvm_vcpu_stat``) and per-VM (``struct kvm_vm_stat``).

The counters keep KVM's names (``exits``, ``pf_taken``, ``pf_fixed``, ``pages_4k``, ...). Counters
KVM does not have are vsim's own and say so in their names' docs below (``pf_retry``,
``tlb_hits``, ``hw_walks``, ``walk_refs``, ``host_page_allocs``). Latencies are kept as exact
integer samples and summarised with observed-value percentiles, so the summary is integral and
deterministic.
"""

from __future__ import annotations

from array import array

import numpy as np


class VcpuStat:
    """``struct kvm_vcpu_stat`` (the subset this version maintains) plus vsim's access counters.

    The counters are the class's ``int`` annotations, in report order (``VCPU_STATS``)."""

    exits: int  # every VM exit
    io_exits: int  # KVM_EXIT_IO exits to userspace (memstress GUEST_SYNC)
    pml_full_exits: int  # vsim: PML-full exits (KVM counts them only among all exits)
    irq_exits: int  # external-interrupt exits (kick IPIs)
    pf_taken: int  # faults that entered kvm_mmu_do_page_fault
    pf_fixed: int  # RET_PF_FIXED
    pf_spurious: int  # RET_PF_SPURIOUS
    pf_fast: int  # fixed locklessly by fast_page_fault
    pf_emulate: int  # RET_PF_EMULATE
    pf_mmio_spte_created: int  # MMIO SPTEs installed
    mmio_exits: int  # KVM_EXIT_MMIO exits to userspace
    insn_emulation: int  # instructions emulated (MMIO accesses here)
    pf_guest: int  # page faults KVM injected into the guest (shadow paging)
    invlpg: int  # INVLPG exits handled (shadow paging)
    gpte_reads: int  # vsim: guest PTEs FNAME(walk_addr) read from guest memory
    cr3_writes: int  # vsim: MOV to CR3 exits (shadow paging)
    guest_forks: int  # vsim: fork() calls by the guest kernel
    pf_retry: int  # vsim: RET_PF_RETRY (KVM has no counter; the guest simply faults again)
    tlb_flush: int  # local TLB flushes
    accesses: int  # vsim: guest memory accesses completed
    tlb_hits: int  # vsim: accesses that hit the TLB
    hw_walks: int  # vsim: 2D hardware walks (successful or ending in an EPT violation)
    walk_refs: int  # vsim: memory references made by those walks
    host_page_allocs: int  # vsim: first touches that made the host allocate and zero a page
    __slots__ = (*__annotations__, "fault_service_ns")

    def __init__(self) -> None:
        for name in VCPU_STATS:
            setattr(self, name, 0)
        self.fault_service_ns = array("q")  # each fault's service time (exit to re-entry), ns

    def as_dict(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in VCPU_STATS}


VCPU_STATS: tuple[str, ...] = tuple(VcpuStat.__annotations__)

# VM stats kept in an int64 array that compiled MMU operations update in place (``vsim.mmu.sp_pool``
# takes it as ``counts``); ``VmStat`` reads and writes them as attributes like the others.
ARRAY_STATS = ("pages_4k", "pages_2m", "pages_1g", "tdp_mmu_pages", "mmu_shadow_pages", "refaults", "mmu_cache_miss",
               "max_mmu_page_hash_collisions", "max_mmu_rmap_size")  # fmt: skip
(K_PAGES_4K, K_PAGES_2M, K_PAGES_1G, K_TDP_MMU_PAGES, K_MMU_SHADOW_PAGES, K_REFAULTS, K_MMU_CACHE_MISS,
 K_MAX_HASH_COLLISIONS, K_MAX_RMAP_SIZE) = range(len(ARRAY_STATS))  # fmt: skip
N_ARRAY_STATS = len(ARRAY_STATS)


class VmStat:
    """``struct kvm_vm_stat`` (the subset this version maintains), its counters the class's ``int``
    annotations in report order (``VM_STATS``). The ``ARRAY_STATS`` live in ``counts``, which the
    MMU's page-table pool shares; the others are slots."""

    pages_4k: int
    pages_2m: int
    pages_1g: int
    tdp_mmu_pages: int  # vsim: TDP MMU page tables allocated (KVM reports them as MMU memory)
    mmu_shadow_pages: int  # vsim: legacy shadow pages in use (n_used_mmu_pages)
    mmu_cache_miss: int  # shadow pages created because none of the gfn and role existed
    mmu_shadow_zapped: int
    mmu_recycled: int  # shadow pages zapped to make room, and rmap heads recycled
    max_mmu_page_hash_collisions: int
    mmu_pte_write: int  # emulated writes to shadowed guest page tables (kvm_mmu_track_write)
    mmu_pte_updated: int  # SPTEs zapped because the gpte they shadow was written
    mmu_flooded: int  # shadow pages zapped for write flooding or a misaligned write
    mmu_unsync: int  # shadow pages made unsync
    max_mmu_rmap_size: int
    remote_tlb_flush: int
    remote_tlb_flush_requests: int
    memslot_updates: int  # vsim: kvm_set_memory_region calls completed
    mmu_fast_zaps: int  # vsim: kvm_mmu_zap_all_fast calls
    mmio_generation_wraps: int  # vsim: MMIO generation wraps (each zaps all)
    tdp_sptes_zapped: int  # vsim: SPTEs cleared while zapping invalidated TDP roots
    refaults: int  # vsim: faults that re-mapped a gfn a zap had unmapped
    mmu_notifier_invalidations: int  # vsim: invalidate_range_start/end pairs from the host MM
    mmu_lock_yields: int  # vsim: slot walks that yielded mmu_lock to waiters (cond_resched)
    mmio_on_backed_gfn: int  # vsim: MMIO emulations of a gfn that had a memslot, after the update settled
    __slots__ = (*(n for n in __annotations__ if n not in ARRAY_STATS), "counts")

    def __init__(self) -> None:
        self.counts = np.zeros(N_ARRAY_STATS, dtype=np.int64)
        for name in VM_STATS:
            if name not in ARRAY_STATS:
                setattr(self, name, 0)

    def add(self, name: str, delta: int) -> None:
        setattr(self, name, getattr(self, name) + delta)

    def add_pages(self, level: int, delta: int) -> None:
        """``kvm_update_page_stats``."""
        self.counts[K_PAGES_4K + level - 1] += delta

    def as_dict(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in VM_STATS}


VM_STATS: tuple[str, ...] = tuple(VmStat.__annotations__)


class _ArrayStat:
    """A ``VmStat`` counter that lives in ``VmStat.counts[k]``."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __get__(self, obj: VmStat, objtype: type | None = None) -> int:
        return int(obj.counts[self.k])

    def __set__(self, obj: VmStat, value: int) -> None:
        obj.counts[self.k] = value


for _k, _name in enumerate(ARRAY_STATS):
    setattr(VmStat, _name, _ArrayStat(_k))


def percentiles(samples: array | np.ndarray | list[int]) -> dict[str, int]:
    """Count, p50/p90/p99/max (observed values, ``inverted_cdf``) and the sum, all integers."""
    a = np.asarray(samples, dtype=np.int64)
    if a.size == 0:
        return {"count": 0, "p50": 0, "p90": 0, "p99": 0, "max": 0, "sum": 0}
    p = np.percentile(a, [50, 90, 99], method="inverted_cdf")
    return {
        "count": int(a.size),
        "p50": int(p[0]),
        "p90": int(p[1]),
        "p99": int(p[2]),
        "max": int(a.max()),
        "sum": int(a.sum()),
    }
