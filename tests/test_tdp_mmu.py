"""The TDP MMU fault pipeline: outcomes, racing vCPUs, mapping levels, page tables."""

from __future__ import annotations

from conftest import simulate

from vsim.mmu.page_fault import RET_PF_FIXED, RET_PF_SPURIOUS, KvmPageFault, ept_violation_error_code
from vsim.mmu.spte import PT_WRITABLE, SPTE_MMU_WRITABLE, is_writable_pte


def test_populate_fixes_every_page_once_at_4k() -> None:
    vm, stats, _ = simulate("vm.vcpus=4", "workload.per_vcpu_memory=1MiB")
    tot = stats["vcpu_total"]
    assert tot["pf_fixed"] == 4 * 256
    assert stats["vm"]["pages_4k"] == 4 * 256
    assert tot["accesses"] == 4 * 256
    # Every fault is either fixed, spurious or retried; nothing else happens on a populate pass.
    assert tot["pf_taken"] == tot["pf_fixed"] + tot["pf_spurious"] + tot["pf_retry"]
    assert tot["exits"] == tot["pf_taken"] + 4  # plus one GUEST_SYNC per vCPU
    assert tot["io_exits"] == 4


def _outcomes(sink) -> dict[int, list[tuple[int, str]]]:  # type: ignore[no-untyped-def]
    """gpa -> [(vcpu, RET_PF_*) in completion order] from the faults-level event log."""
    gpa_of = {(r[2], r[3]): r[4] for r in sink.kept if r[0] == "kvm_page_fault"}  # (vcpu, id) -> gpa
    out: dict[int, list[tuple[int, str]]] = {}
    for r in sink.kept:
        if r[0] == "vsim_page_fault_ret":
            out.setdefault(gpa_of[(r[2], r[3])], []).append((r[2], r[4]))
    return out


def _check_race(map_cost: str, loser_ret: str) -> None:
    # Two vCPUs walk the same 32 pages. At t=0 they fault page 0 together; vCPU 0 acts first at
    # equal times, so it first-touches the host page and reaches mmu_lock 750 ns after vCPU 1.
    _, stats, sink = simulate(
        "vm.vcpus=2",
        "workload.per_vcpu_memory=64KiB",
        "workload.overlap=true",
        f"costs.tdp_mmu_map={map_cost}",
        level="faults",
    )
    pages = 32
    outcomes = _outcomes(sink)
    assert len(outcomes) == pages
    for gpa, rets in outcomes.items():
        # Exactly one vCPU fixes each gfn; the other finds it fixed or loses the cmpxchg.
        assert [r for _, r in rets].count("FIXED") == 1, (gpa, rets)
        assert all(r in ("FIXED", "SPURIOUS", "RETRY") for _, r in rets)
    first = outcomes[min(outcomes)]
    assert first == [(1, "FIXED"), (0, loser_ret)]
    tot = stats["vcpu_total"]
    assert tot["pf_fixed"] == pages == stats["vm"]["pages_4k"]
    assert tot["pf_taken"] == pages + tot["pf_spurious"] + tot["pf_retry"]
    assert [v["accesses"] for v in stats["vcpus"]] == [pages, pages]


def test_racing_vcpus_one_fixes_other_spurious() -> None:
    # 400 ns of map work: vCPU 1 has installed before vCPU 0 reads the path -> RET_PF_SPURIOUS.
    _check_race("400ns", "SPURIOUS")


def test_racing_vcpus_one_fixes_other_retries() -> None:
    # 2 µs of map work: vCPU 0 reads the path before vCPU 1 installs; its cmpxchg fails.
    _check_race("2us", "RETRY")


def test_link_races_on_shared_upper_tables_retry() -> None:
    # Partitioned vCPUs (256 pages each) share the upper page tables. At t=0 all four try to link
    # the same non-present PML4E: vCPU 0 wins, three retry. On the retry vCPU 1 finds vCPU 0's
    # 4K page table, while vCPUs 2 and 3 race again to link the second one: one more retry.
    _, stats, _ = simulate("vm.vcpus=4", "workload.per_vcpu_memory=1MiB")
    assert [v["pf_retry"] for v in stats["vcpus"]] == [0, 1, 1, 2]
    assert stats["vm"]["tdp_mmu_pages"] == 1 + 1 + 1 + 2  # root, PDPT, PD, two 4K page tables


def test_mapping_level_follows_backing_size() -> None:
    for backing, sets, expect in (
        ("4K", ("workload.per_vcpu_memory=4MiB",), {"pages_4k": 1024, "pages_2m": 0, "pages_1g": 0}),
        ("2M", ("workload.per_vcpu_memory=4MiB",), {"pages_4k": 0, "pages_2m": 2, "pages_1g": 0}),
        ("1G", ("workload.per_vcpu_memory=1GiB", "workload.write_percent=0"), {"pages_1g": 1}),
    ):
        _, stats, _ = simulate("vm.vcpus=1", f"vm.backing_page_size={backing}", *sets)
        for k, v in expect.items():
            assert stats["vm"][k] == v, (backing, k)
        assert stats["vcpu_total"]["pf_fixed"] == sum(expect.values())


def test_misaligned_memslot_edges_map_4k() -> None:
    # 2 slots of 768 pages: the 2M page straddling the boundary is disallowed in both slots.
    _, stats, _ = simulate("vm.vcpus=2", "workload.per_vcpu_memory=3MiB", "vm.memslots=2", "vm.backing_page_size=2M")
    assert stats["vm"]["pages_2m"] == 2
    assert stats["vm"]["pages_4k"] == 512


def test_guest_huge_pages_make_tlb_entries_huge() -> None:
    _, stats, _ = simulate(
        "vm.vcpus=1", "workload.per_vcpu_memory=4MiB", "vm.backing_page_size=2M", "guest.page_size=2M"
    )
    tot = stats["vcpu_total"]
    # One walk per 2M page after its fault; every other access hits the 2M TLB entry.
    assert tot["tlb_hits"] == 1024 - 2
    assert tot["hw_walks"] == 2 * 2  # the faulting walk and the walk after re-entry


def test_first_touch_costs_more_than_present_page() -> None:
    _, s1, _ = simulate("vm.vcpus=1", "workload.per_vcpu_memory=64KiB")
    lat = s1["latency_ns"]["fault_service"]
    c = simulate("vm.vcpus=1", "workload.per_vcpu_memory=64KiB")[0].costs
    expect = c.vmexit + c.faultin_present + c.host_fault + c.zero_4k + c.tdp_mmu_map + c.vmentry
    assert lat["p50"] == expect + 0  # the 4K page table exists after the first fault
    assert lat["max"] == expect + 3 * c.sp_alloc  # the first fault links PDPT, PD and PT


def test_fast_page_fault_restores_write_locklessly() -> None:
    vm, _, _ = simulate("vm.vcpus=1", "workload.per_vcpu_memory=64KiB")
    v = vm.vcpus[0]
    gfn = vm.memslots.slots[0].base_gfn + 3
    table, idx, level, old = vm.mmu.walk_last(v.root, gfn)
    # Write-protect as dirty logging does: clear W, keep MMU-writable.
    vm.mmu.spt[table, idx] = old & ~PT_WRITABLE
    assert old & SPTE_MMU_WRITABLE
    fault = KvmPageFault(
        addr=gfn << 12, gfn=gfn, error_code=ept_violation_error_code(True, True), id=99, write=True, present=True
    )
    gen = vm.mmu.page_fault(v, fault)
    try:
        next(gen)
        raise AssertionError("fast_page_fault must not yield")
    except StopIteration as stop:
        assert stop.value == RET_PF_FIXED
    assert v.stat.pf_fast == 1
    assert is_writable_pte(vm.mmu.spt.item(table, idx))
    # A second write fault on the now-writable SPTE is spurious.
    gen = vm.mmu.page_fault(v, fault)
    try:
        next(gen)
    except StopIteration as stop:
        assert stop.value == RET_PF_SPURIOUS
