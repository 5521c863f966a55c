"""The legacy direct MMU: shadow pages, rmaps, the write lock, prefetch, eviction and fast zap."""

from __future__ import annotations

from conftest import make_config, simulate

from vsim.runner import collect_stats
from vsim.vm import Vm

LEGACY = "mmu.mode=legacy_tdp"


def test_faults_serialize_on_the_write_lock_where_the_tdp_mmu_shares_it() -> None:
    sets = ("vm.vcpus=8", "workload.per_vcpu_memory=2MiB")
    legacy_vm, legacy, _ = simulate(*sets, LEGACY)
    _, tdp, _ = simulate(*sets)
    for st in (legacy, tdp):
        assert st["vcpu_total"]["pf_fixed"] == 8 * 512
    waits = legacy["latency_ns"]["mmu_lock_wait"]
    # Every fault, and each vCPU's root load (mmu_alloc_direct_roots), takes it for write.
    assert waits["read"]["count"] == 0 and waits["write"]["count"] == 8 * 512 + 8
    assert waits["write"]["max"] > 0
    assert tdp["latency_ns"]["mmu_lock_wait"]["write"]["count"] == 0
    assert legacy["sim_time_ns"] > tdp["sim_time_ns"]
    # One root, one page per level above the leaves, and a leaf page per 512 gfns; all in the hash.
    assert legacy["vm"]["mmu_cache_miss"] == legacy["vm"]["mmu_shadow_pages"] == 1 + 1 + 1 + 8
    assert legacy_vm.mmu.n_used_mmu_pages == 11  # type: ignore[union-attr]
    # A direct MMU maps each gfn once, and pte_list_add reports the entries before the add.
    assert legacy["vm"]["max_mmu_rmap_size"] == 0


def test_eviction_zaps_the_oldest_pages_and_prefetch_maps_resident_neighbours() -> None:
    pages = 40960  # 160 MiB: 80 leaf pages + 3 above, against the smallest limit KVM accepts
    _, st, _ = simulate("vm.vcpus=1", "workload.per_vcpu_memory=160MiB", "workload.passes=2", LEGACY,
                        "mmu.nr_mmu_pages=64")  # fmt: skip
    vm = st["vm"]
    assert vm["mmu_recycled"] > 0 and vm["mmu_shadow_zapped"] >= vm["mmu_recycled"]
    assert vm["mmu_shadow_pages"] <= 64
    refault_faults = st["vcpu_total"]["pf_fixed"] - pages
    assert refault_faults > 0
    # Every refault maps the faulting page and prefetches the resident rest of its block of 8.
    assert vm["refaults"] >= 7 * refault_faults


def test_rmap_and_spte_disagreement_is_caught() -> None:
    """Zapped leaves left on their rmaps (a drop_spte that forgets rmap_remove) are reported."""
    vm = Vm(make_config("vm.vcpus=1", "workload.per_vcpu_memory=160MiB", "workload.passes=2", LEGACY,
                        "mmu.nr_mmu_pages=64"))  # fmt: skip
    vm.mmu.rmap_remove = lambda rmap, gfn, level, table, idx: None  # type: ignore[method-assign, union-attr]
    end = vm.run()
    rules = {v["rule"] for v in collect_stats(vm, end)["invariant_violations"]}
    assert rules == {"rmap_spte_agreement"}


def test_fast_zap_makes_every_page_obsolete_and_zaps_them_from_the_tail() -> None:
    vm, st, _ = simulate("vm.vcpus=2", "workload.per_vcpu_memory=1MiB", "workload.passes=40", "vm.memslots=2",
                         LEGACY, "tlb.entries_4k=4", "tlb.ways_4k=4", 'vmm.ops=[{at="2ms", op="delete", slot=1}, '
                         '{at="2.1ms", op="create", slot=1}]')  # fmt: skip
    assert st["vm"]["mmu_fast_zaps"] == 1
    # The first generation's leaf page and the two above it, and its root twice: once by the fast
    # zap (in use, only marked invalid) and once when the last vCPU dropped it.
    assert st["vm"]["mmu_shadow_zapped"] == 3 + 2
    assert all(not sp.invalid for sp in vm.mmu.active)  # type: ignore[union-attr]
    assert st["vm"]["refaults"] > 0
