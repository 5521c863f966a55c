"""MMU-notifier invalidations from a host-MM actor, and the fault retry protocol (spec §1.6, R8)."""

from __future__ import annotations

import pytest
from conftest import make_config, simulate

from vsim.vm import Vm

BASE = (
    "vm.vcpus=4", "workload.per_vcpu_memory=4MiB", "workload.passes=6", "workload.access=random",
    "workload.write_percent=50", "host_mm.invalidations=200", "host_mm.start=500us", "host_mm.interval=20us",
    "host_mm.pages=64", "host_mm.pattern=random",
)  # fmt: skip


@pytest.mark.parametrize(
    "extra", [(), ("vm.backing_page_size=2M", "host_mm.action=dontneed"), ("mmu.mode=legacy_tdp",)]
)
def test_invalidations_zap_flush_and_make_faults_retry(extra: tuple[str, ...]) -> None:
    vm, stats, _ = simulate(*BASE, *extra)  # the checker finds no stale pfn and no stale TLB entry
    st = stats["vm"]
    assert st["mmu_notifier_invalidations"] == 200
    assert vm.mmu_invalidate_seq == 200 and vm.mmu_invalidate_in_progress == 0
    assert 0 < st["remote_tlb_flush_requests"] <= 200  # one per invalidation that zapped something
    assert st["refaults"] > 0  # zapped pages are faulted in again, now at their new pfns
    assert stats["vcpu_total"]["pf_retry"] > 0  # faults that met an invalidation retried


def test_removing_the_locked_retry_check_maps_stale_pfns() -> None:
    """R8: without ``mmu_invalidate_retry_gfn`` under ``mmu_lock``, a fault that resolved its pfn
    before an invalidation installs the old pfn; the checker reports it."""
    vm = Vm(make_config(*BASE, "host_mm.locked_retry_check=false"))
    vm.run()
    rules = {rule for _, rule, _ in vm.checker.violations}  # type: ignore[union-attr]
    assert rules == {"stale_pfn"}


def test_pre_lock_retry_keeps_retrying_faults_off_mmu_lock() -> None:
    """The v6.8 pre-check retries a fault on a gfn under invalidation before it takes ``mmu_lock``."""
    with_check, _, _ = simulate(*BASE)
    without, _, _ = simulate(*BASE, "host_mm.pre_lock_retry=false")
    reads = [len(v.mmu_lock.waits("read")) for v in (with_check, without)]
    assert reads[0] < reads[1]
