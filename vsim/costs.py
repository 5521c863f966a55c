"""The cost model: every timed step of the simulated KVM path, in integer nanoseconds.

One object holds every cost. Each default names its anchor in ``../shared/docs/cost-anchors.md``
(section or row number) in the field description; ``vsim run --set costs.<name>=<duration>``
overrides any of them with the same checks as the config file.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from vsim.units import format_duration, parse_config_duration, parse_cost

# A config's time or interval, and one step's cost: both bounded so int64 arithmetic cannot overflow.
Duration = Annotated[int, BeforeValidator(parse_config_duration), PlainSerializer(format_duration, return_type=str)]
Cost = Annotated[int, BeforeValidator(parse_cost), PlainSerializer(format_duration, return_type=str)]


def _cost(default: int, anchor: str) -> int:
    return Field(default=default, ge=0, description=anchor)


class CostModel(BaseModel):
    """Timed steps of a vCPU's life in KVM; each field's description is its anchor."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    vmexit: Cost = _cost(
        600, "§8 null exit round trip 1.0–1.5 µs (rows 1.1 vmcall 3898 cycles, 1.5, 1.6): the exit half"
    )
    vmentry: Cost = _cost(600, "§8 null exit round trip 1.0–1.5 µs (rows 1.1, 1.5, 1.6): the entry half")
    userspace_exit: Cost = _cost(
        4500, "§8 exit to userspace adds ~13,000 cycles ≈ 4–5 µs (row 1.1 inl_from_qemu vs inl_from_kernel)"
    )
    fast_page_fault: Cost = _cost(
        200, "§8 lockless fast page fault ≈1.2 µs including the exit (row 2.8) minus the 1.0–1.2 µs round trip"
    )
    faultin_present: Cost = _cost(
        800,
        "§8 EPT-violation fault with the page already in the host ≈2–3 µs (rows 2.9, 2.11): "
        "2.5 µs minus the 1.2 µs round trip and the map step",
    )
    host_fault: Cost = _cost(
        500,
        "row 2.9: first-touch fault incl. host fault and zeroing ≈2.3–2.7 µs at 1 vCPU; "
        "host page-allocation part (zeroing is zero_4k per 4 KiB)",
    )
    zero_4k: Cost = _cost(
        250,
        "row 2.9 residual after host_fault; ASSUMPTION ≈16 GB/s clear_page, so 2 MiB ≈128 µs and 1 GiB ≈65 ms",
    )
    tdp_mmu_map: Cost = _cost(
        400, "§8 ≈2–3 µs for an uncontended EPT-violation fault (rows 2.9, 2.11): kvm_tdp_mmu_map's share"
    )
    legacy_direct_map: Cost = _cost(
        1400,
        "row 3.5: faults serialized under the legacy MMU's lock cost ≈140 µs per fault at 96 vCPUs, i.e. "
        "≈1.46 µs of lock hold per fault (direct_map with rmap and shadow-page bookkeeping)",
    )
    prefetch_spte: Cost = _cost(
        100, "ASSUMPTION (no published figure): direct_pte_prefetch maps one neighbouring SPTE and its rmap"
    )
    sp_alloc: Cost = _cost(
        100,
        "row 2.6 ('a few hundred cycles is dwarfed by the base cost'): ASSUMPTION, per page table taken "
        "from the vCPU cache and linked",
    )
    emulate: Cost = _cost(
        300, "row 1.4: in-KVM emulation of a memory load ≈916 cycles (Sandy Bridge) ≈ 0.3 µs at 3 GHz"
    )
    memslot_update: Cost = _cost(
        5000,
        "row 4.2: a slot add costs ≈15.8 µs with tree memslots; ASSUMPTION: 5 µs of it outside the grace period",
    )
    srcu_expedited_gp: Cost = _cost(
        10000,
        "rows 4.2 and 4.6 (§8: MOVE/DELETE incl. expedited SRCU ≈40–55 µs); ASSUMPTION: 10 µs per expedited "
        "grace period with no readers",
    )
    srcu_normal_gp: Cost = _cost(20_000_000, "row 4.6: a normal grace period ≈20 ms with CONFIG_HZ=100")
    # At least 1 ns: the kick's latency is the lookahead that lets batched vCPUs run ahead of the VMM.
    ipi_latency: Cost = Field(
        default=1000,
        ge=1,
        description="row 5.6: IPI round trip ≈1–3 µs on modern Xeons; ≈1 µs from send to the target's exit",
    )
    ipi_send: Cost = _cost(200, "row 5.6: ≈200 ns per receiver on the sender (base ≈1 µs + 200 ns each)")
    tlb_flush: Cost = _cost(
        150,
        "row 5.9: INVEPT latency has no published figure; ASSUMPTION a few hundred cycles. The refill is "
        "modelled by the walks that follow",
    )
    ipi_ack: Cost = _cost(
        900,
        "§8 and rows 3.18/5.7: a remote flush kicking 64 running vCPUs costs ≈73 µs; less the sends and one "
        "latency (64 × 200 ns + 1 µs ≈ 14 µs) that leaves ≈0.9 µs per target for the requester to collect acks",
    )
    tdp_zap_spte: Cost = _cost(
        60,
        "row 3.8: ≈61 ns per 4K SPTE created by eager splitting; ASSUMPTION: zapping one SPTE costs the same",
    )
    mmu_notifier_invalidate: Cost = _cost(
        1000, "§8 / row 4.2: an mmu_notifier invalidation of one 4K page ≈1 µs with tree memslots"
    )
    pml_drain_entry: Cost = _cost(
        20, "row 6.1 (the buffer is drained at every exit); ASSUMPTION ≈20 ns to mark one logged gpa dirty"
    )
    page_idle_page: Cost = _cost(
        300,
        "ASSUMPTION (no published figure): access_tracking_perf_test's per-page pagemap read and page_idle "
        "bitmap read and write, with the primary MMU's rmap walk",
    )
    uffd_page_in: Cost = _cost(
        3800,
        "row 2.11: a demand fault at 1 vCPU costs ≈6.7 µs through userfaultfd vs ≈2.9 µs without; the "
        "handler's read, UFFDIO_COPY and the wake-up",
    )
    tdp_split_spte: Cost = _cost(61, "row 3.8: eager splitting ≈16 ms/GiB ≈ 61 ns per 4K SPTE created (rows 3.6, 3.7)")
    tdp_wrprot_spte: Cost = _cost(
        72,
        "row 3.3: 'Get dirty log' 5.468 s for 96 vCPUs × 3 GiB (75.5M 4K pages) ≈ 72 ns per page write-protected",
    )
    dirty_log_word: Cost = _cost(
        10, "ASSUMPTION (no published figure): read or exchange one 64-page dirty-bitmap word and copy it out"
    )
    walk_gpte: Cost = _cost(
        50,
        "ASSUMPTION (no published figure): FNAME(walk_addr) reads one gpte through its hva (__get_user) and "
        "checks it; also the cost of setting its A/D bits",
    )
    track_write: Cost = _cost(
        200,
        "ASSUMPTION (no published figure): kvm_mmu_track_write for one emulated unit: the write lock, the "
        "hash bucket and zapping the written SPTE (row 1.4 puts the emulation itself at ≈0.3–0.37 µs)",
    )
    sync_spte: Cost = _cost(
        60, "ASSUMPTION: FNAME(sync_spte) re-reads a gpte and rebuilds its SPTE (a walk_gpte read plus make_spte)"
    )
    guest_page_fault: Cost = _cost(
        1000,
        "ASSUMPTION (no cost-anchors row): a native anonymous minor fault ≈1 µs: the #PF delivery and "
        "handle_mm_fault, without the page zeroing and PTE stores vsim models separately",
    )
    guest_context_switch: Cost = _cost(
        1200, "row 1.13: lmbench context switch 2p/0K ≈1.22–1.26 µs, of which the CR3 write is modelled apart"
    )
    guest_fork_table: Cost = _cost(
        200, "ASSUMPTION: copy_page_range's work per page table copied, besides the PTE stores vsim models"
    )
    guest_access: Cost = _cost(
        5, "§7.1 memstress guest loop (one 8-byte access per page plus loop work); ASSUMPTION, no published cost"
    )
    tlb_hit: Cost = _cost(1, "ASSUMPTION: an L1/STLB hit is a few cycles; no published figure (§9 gaps)")
    walk_ref: Cost = _cost(
        10,
        "rows 2.1 (up to 24 references per 2D walk) and 2.3 (≈4.4 with walk caches): ASSUMPTION per reference, "
        "mostly cache hits; vsim counts architectural references without walk caches",
    )
