"""Access tracking: aging clears A, the CPU sets it again on a walk, and access_tracking_perf_test."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import simulate

NAMES = [
    "Populating memory", "Writing to populated memory", "Reading from populated memory", "Mark memory idle",
    "Writing to idle memory", "Mark memory idle", "Reading from idle memory",
]  # fmt: skip


def _perf(mem: str, *sets: str) -> dict[str, Any]:
    _, stats, _ = simulate("vm.vcpus=3", f"workload.per_vcpu_memory={mem}", "workload.passes=5",
                           "selftest.name=access_tracking_perf", *sets)  # fmt: skip
    return stats


@pytest.mark.parametrize("mmu", ["tdp_mmu", "legacy_tdp"])
def test_phases_and_walks_mark_pages_young_again(mmu: str) -> None:
    """With more pages than the TLB holds, every access after marking walks and sets A."""
    stats = _perf("16MiB", f"mmu.mode={mmu}")
    st = stats["selftest"]
    assert [name for name, _ in st["phases_ns"]] == NAMES
    assert st["still_idle"] == [[0, 0, 0], [0, 0, 0]] and st["warnings"] == []
    # The vCPU threads mark their pages in parallel and serialize on mmu_lock (write).
    assert stats["latency_ns"]["mmu_lock_wait"]["write"]["max"] > 0
    assert stats["vm"]["remote_tlb_flush_requests"] == 0  # 6.13+: aging does not flush


def test_tlb_caching_hides_accesses_unless_aging_flushes() -> None:
    """The test's warning: pages the guest reaches through cached translations stay idle. With
    the pre-6.13 flush on aging, the next pass walks and every page is young again."""
    pages = 512  # 2 MiB per vCPU: fits the 4K TLB
    cached = _perf("2MiB")["selftest"]
    assert cached["still_idle"][1] == [pages] * 3
    assert cached["warnings"] == [f"vCPU{i}: Too many pages still idle ({pages} out of {pages})" for i in range(3)]
    stats = _perf("2MiB", "mmu.age_flush=true")
    assert stats["selftest"]["still_idle"][1] == [0, 0, 0]
    # One flush per page whose A bit aging cleared (2 markings x 3 vCPUs x 512 pages); the vCPUs
    # are in userspace, so no IPI: each flushes at its next entry.
    assert stats["vm"]["remote_tlb_flush_requests"] == 2 * 3 * pages
    assert stats["vm"]["remote_tlb_flush"] == 0


def test_without_ad_bits_aging_makes_sptes_access_tracked() -> None:
    """kvm_intel.ept_ad=0: aging clears RWX instead of A, so every access after a marking faults and
    fast_page_fault restores the SPTE without mmu_lock (cost-anchors 2.7)."""
    pages = 4096  # 16 MiB per vCPU
    with_ad = _perf("16MiB")
    without = _perf("16MiB", "mmu.ept_ad=false")
    assert with_ad["vcpu_total"]["pf_fast"] == 0
    # "Writing to idle memory" and "Reading from idle memory": one fast fault per page each.
    assert without["vcpu_total"]["pf_fast"] == 2 * 3 * pages
    assert without["selftest"]["still_idle"] == [[0, 0, 0], [0, 0, 0]]
    slow, fast = (dict(s["selftest"]["phases_ns"])["Writing to idle memory"] for s in (without, with_ad))
    assert slow > 2 * fast


def test_pml_needs_ad_bits() -> None:
    from vsim.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="dirty_log.pml: PML needs EPT A/D bits"):
        load_config(None, ["dirty_log.pml=true", "mmu.ept_ad=false"])
