"""The per-vCPU TLB: LRU replacement per size class, and the compiled kernel against the reference."""

from __future__ import annotations

import numpy as np
from conftest import simulate

from vsim.vcpu.batch import run_accesses
from vsim.vcpu.tlb import RefTlb, Tlb
from vsim.vcpu.walk import guest_refs_2d, walk_2d


def test_ref_tlb_evicts_least_recently_used() -> None:
    t = RefTlb((2, 2, 2), (2, 2, 2))
    t.insert(0, 10, True)
    t.insert(0, 11, True)
    assert t.lookup(10, False)  # 10 becomes most recent
    t.insert(0, 12, True)  # evicts 11, the least recently used
    assert not t.lookup(11, False)
    assert t.lookup(10, False) and t.lookup(12, False)


def test_ref_tlb_size_classes_are_separate_and_write_needs_permission() -> None:
    t = RefTlb((1, 1, 1), (1, 1, 1))
    t.insert(1, 512 * 7, False)  # a read-only 2M entry covering gfns 3584..4095
    t.insert(0, 5, True)
    assert t.lookup(3584 + 100, False)
    assert not t.lookup(3584 + 100, True)  # a write to a read-only translation re-walks
    t.insert(0, 6, True)  # evicts 4K entry 5, leaves the 2M entry alone
    assert not t.lookup(5, False)
    assert t.lookup(3600, False)


def _populated_vm():  # type: ignore[no-untyped-def]
    vm, _, _ = simulate("vm.vcpus=1", "workload.per_vcpu_memory=2MiB")
    return vm


def test_batch_kernel_matches_reference_tlb_access_by_access() -> None:
    vm = _populated_vm()
    root = vm.vcpus[0].root.table
    base = vm.memslots.slots[0].base_gfn
    rng = np.random.default_rng(5)
    for caps, ways in (
        ((4, 2, 1), (4, 2, 1)),
        ((16, 4, 2), (4, 2, 1)),
        ((64, 8, 2), (8, 8, 2)),
        ((12, 4, 4), (3, 2, 4)),
    ):
        tlb, ref = Tlb(caps, ways), RefTlb(caps, ways)
        # A mix of reuse distances around the capacity, so hits and evictions both happen.
        gfns = (base + np.concatenate([rng.integers(0, n, 400) for n in (3, 8, 20, 200)])).astype(np.int64)
        writes = rng.random(len(gfns)) < 0.3
        ctr = np.zeros(4, dtype=np.int64)
        for i in range(len(gfns)):
            before = int(ctr[1])
            j, _, status, _, _ = run_accesses(
                gfns, writes, i, i + 1, 1 << 62, vm.mmu.spt, root, guest_refs_2d(1), 0, tlb.tags, tlb.wr, tlb.sets,
                tlb.ways, tlb.count, 5, 1, 10, ctr, np.zeros(0, dtype=np.uint8), 0, np.zeros(0, dtype=np.int64),
                np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64), -1,
            )  # fmt: skip
            assert status == 0 and j == i + 1
            hit = int(ctr[1]) > before
            g, w = int(gfns[i]), bool(writes[i])
            ref_hit = ref.lookup(g, w)
            if not ref_hit:
                ok, _, leaf, writable = walk_2d(vm.mmu.spt, root, g, w, guest_refs_2d(1))
                assert ok
                ref.insert(min(1, leaf) - 1, g, writable)
            assert hit == ref_hit, (caps, i)
        assert tlb.entries() == ref.entries()
        assert sum(1 for e in tlb.entries() if e[0] == 0) == caps[0] == tlb.count[0]


def test_set_index_is_key_modulo_sets() -> None:
    t = RefTlb((4, 1, 1), (2, 1, 1))  # two sets of two ways
    for gfn in (0, 2, 4):  # all in set 0: the third evicts gfn 0
        t.insert(0, gfn, True)
    t.insert(0, 1, True)  # set 1 does not disturb set 0
    assert not t.lookup(0, False)
    assert t.lookup(2, False) and t.lookup(4, False) and t.lookup(1, False)


def test_tlb_capacity_bounds_hits_on_a_cyclic_sweep() -> None:
    # Cycling over more pages than a fully associative LRU TLB holds defeats it completely;
    # over fewer, every later pass hits.
    base = ("vm.vcpus=1", "workload.per_vcpu_memory=64KiB", "workload.passes=4")
    _, small, _ = simulate(*base, "tlb.entries_4k=15", "tlb.ways_4k=15")
    _, big, _ = simulate(*base, "tlb.entries_4k=16", "tlb.ways_4k=16")
    assert small["vcpu_total"]["tlb_hits"] == 0
    assert big["vcpu_total"]["tlb_hits"] == 3 * 16
