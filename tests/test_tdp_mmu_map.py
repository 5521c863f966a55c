"""The TDP MMU's compiled page-table operations (``vsim.mmu.tdp_mmu_map``, ``vsim.mmu.sp_pool``),
each against a hand-worked expectation of what ``tdp_mmu.c`` does.

These are the operations both the Python fault and the vCPU group's compiled fault call, so a
change to any of them shows here, not only as a difference between the two paths.
"""

from __future__ import annotations

import numpy as np
import pytest

from vsim.config import load_config
from vsim.mmu.mmio import make_mmio_spte
from vsim.mmu.page_fault import RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS
from vsim.mmu.sp_pool import (
    CHG_COLS,
    H_ANY_ZAPPED,
    H_LOG,
    H_NFREE,
    NO_STAT,
    SpPool,
    note_mapped,
    note_zapped,
    sp_alloc,
    sp_free,
)
from vsim.mmu.spte import (
    PFN_MASK,
    PFN_SHIFT,
    PT_PAGE_SIZE,
    PT_WRITABLE,
    REMOVED_SPTE,
    SPTE_ACCESSED,
    SPTE_DIRTY,
    SPTE_HOST_WRITABLE,
    SPTE_MMU_PRESENT,
    SPTE_MMU_WRITABLE,
    make_nonleaf_spte,
    make_spte,
)
from vsim.mmu.tdp_mmu_map import (
    count_entries,
    handle_removed_pt,
    tdp_mmu_map_install,
    tdp_range_entries,
    tdp_split_huge_page,
    tdp_walk_to,
    tdp_zap_table,
)
from vsim.stats import ARRAY_STATS, K_REFAULTS, K_TDP_MMU_PAGES, N_ARRAY_STATS
from vsim.vm import Vm

K = K_TDP_MMU_PAGES
NOBITS = np.zeros(0, dtype=np.uint8)
REGION = 1 << 18  # the test region's first gfn (1 GiB), as in the default config


def _pool(tables: int = 16, region_pages: int = 1 << 12) -> SpPool:
    return SpPool(np.zeros(N_ARRAY_STATS, dtype=np.int64), REGION, region_pages, tables)


def _stats(pool: SpPool) -> dict[str, int]:
    return dict(zip(ARRAY_STATS, pool.p.counts.tolist(), strict=True))


def _child(spte: int) -> int:
    return (spte & PFN_MASK) >> PFN_SHIFT


def _map(pool: SpPool, root: int, gfn: int, goal: int, new: int, bitmap: np.ndarray = NOBITS, bit: int = -1,
         mmio: bool = False) -> tuple[int, int]:  # fmt: skip
    pool.reserve(4)
    table, idx, level, old = tdp_walk_to(pool.p.spt, root, gfn, goal)
    ret, leaves = tdp_mmu_map_install(pool.p, K, table, idx, level, old, gfn, goal, new, mmio, bitmap, bit, 0, 7)
    return int(ret), int(leaves)


def test_sp_alloc_takes_new_tables_then_reuses_the_last_freed_with_a_new_generation() -> None:
    pool = _pool(tables=4)
    p = pool.p
    assert [sp_alloc(p, 4 - i, i, K) for i in range(3)] == [0, 1, 2]
    assert p.counts[K] == 3 and p.sp_level[1] == 3 and p.sp_gfn[2] == 2
    sp_free(p, 1, K)
    sp_free(p, 0, K)
    assert p.counts[K] == 1 and p.hdr[H_NFREE] == 2 and p.sp_gen[0] == 1
    assert sp_alloc(p, 2, 512, K) == 0  # last freed, first reused
    assert p.sp_gen[0] == 2 and p.sp_level[0] == 2 and p.sp_gfn[0] == 512
    assert sp_alloc(p, 1, 0, NO_STAT) == 1 and p.counts[K] == 2  # an uncounted table (a PAE root)
    assert sp_alloc(p, 1, 0, K) == 3
    assert sp_alloc(p, 1, 0, K) == -1  # full: the owner grows the arrays
    assert pool.alloc(1, 0, K) == 4 and pool.capacity >= 5


def test_make_spte_bits_for_writable_read_only_prefetched_and_huge_leaves() -> None:
    w = make_spte(0x1234, 1, True)
    assert _child(w) == 0x1234
    for bit in (SPTE_MMU_PRESENT, PT_WRITABLE, SPTE_DIRTY, SPTE_ACCESSED, SPTE_HOST_WRITABLE, SPTE_MMU_WRITABLE):
        assert w & bit
    assert not w & PT_PAGE_SIZE
    ro = make_spte(0x1234, 1, False)
    assert not ro & (PT_WRITABLE | SPTE_DIRTY | SPTE_MMU_WRITABLE | SPTE_HOST_WRITABLE) and ro & SPTE_ACCESSED
    assert not make_spte(0x1234, 1, True, prefetch=True) & SPTE_ACCESSED
    assert make_spte(0x200, 2, True) & PT_PAGE_SIZE


@pytest.mark.parametrize(("level", "step"), [(2, 1), (3, 512)])
def test_split_fills_a_child_with_the_huge_leafs_translation_and_counts_its_leaves(level: int, step: int) -> None:
    pool = _pool()
    huge = make_spte(0x40000, level, False)
    child = tdp_split_huge_page(pool.p, huge, level, 0x40000, K)
    row = pool.p.spt[child]
    assert pool.p.sp_level[child] == level - 1 and pool.p.sp_gfn[child] == 0x40000
    assert [_child(int(e)) for e in row[[0, 1, 511]]] == [0x40000, 0x40000 + step, 0x40000 + 511 * step]
    assert all(bool(e & PT_PAGE_SIZE) == (level == 3) for e in row.tolist())
    assert all(e & ~PFN_MASK & ~PT_PAGE_SIZE == huge & ~PFN_MASK & ~PT_PAGE_SIZE for e in row.tolist())
    assert pool.p.counts[level - 2] == 512  # the leaves one level down


def test_install_on_an_empty_root_links_three_tables_then_the_leaf() -> None:
    pool = _pool()
    root = pool.alloc(4, 0, K)
    gfn = 0x40000 + 0x12345
    new = make_spte(0x9999, 1, True)
    assert _map(pool, root, gfn, 1, new) == (RET_PF_FIXED, 0)
    spt = pool.p.spt
    l3 = _child(int(spt[root, gfn >> 27 & 511]))
    l2 = _child(int(spt[l3, gfn >> 18 & 511]))
    l1 = _child(int(spt[l2, gfn >> 9 & 511]))
    assert [int(pool.p.sp_level[t]) for t in (l3, l2, l1)] == [3, 2, 1]
    assert [int(pool.p.sp_gfn[t]) for t in (l3, l2, l1)] == [gfn & ~(2**27 - 1), gfn & ~(2**18 - 1), gfn & ~511]
    assert spt[l3, gfn >> 18 & 511] == make_nonleaf_spte(l2) and spt[l1, gfn & 511] == new
    assert _stats(pool)["pages_4k"] == 1 and _stats(pool)["tdp_mmu_pages"] == 4
    assert tdp_walk_to(spt, root, gfn, 1) == (l1, gfn & 511, 1, new)
    # The same SPTE again is spurious; a different one over a present leaf is installed.
    assert _map(pool, root, gfn, 1, new) == (RET_PF_SPURIOUS, 0)
    assert _map(pool, root, gfn, 1, new & ~PT_WRITABLE) == (RET_PF_FIXED, 0)
    assert _stats(pool)["pages_4k"] == 1


def test_install_fails_the_cmpxchg_when_the_entry_changed_since_the_walk() -> None:
    pool = _pool()
    root = pool.alloc(4, 0, K)
    gfn = 0x40000
    table, idx, level, old = tdp_walk_to(pool.p.spt, root, gfn, 1)
    assert (level, old) == (4, 0)
    _map(pool, root, gfn + 1, 1, make_spte(7, 1, True))  # another vCPU links the path first
    tables = pool.n_tables
    ret = tdp_mmu_map_install(pool.p, K, table, idx, level, old, gfn, 1, make_spte(8, 1, True), False, NOBITS, -1, 1, 9)
    assert ret == (RET_PF_RETRY, 0) and pool.n_tables == tables and _stats(pool)["pages_4k"] == 1
    frozen = tdp_mmu_map_install(pool.p, K, root, 0, 4, REMOVED_SPTE, gfn, 1, 1, False, NOBITS, -1, 1, 9)
    assert frozen == (RET_PF_RETRY, 0)


def test_a_writable_install_marks_the_page_dirty_and_a_read_only_one_does_not() -> None:
    pool = _pool()
    root = pool.alloc(4, 0, K)
    bitmap = np.zeros(8, dtype=np.uint8)
    _map(pool, root, 0x40003, 1, make_spte(3, 1, False), bitmap, 3)
    assert not bitmap.any()
    _map(pool, root, 0x40005, 1, make_spte(5, 1, True), bitmap, 5)
    assert bitmap.tolist() == [0, 0, 0, 0, 0, 1, 0, 0]


def test_an_mmio_spte_install_returns_emulate_and_maps_nothing() -> None:
    pool = _pool()
    root = pool.alloc(4, 0, K)
    spte = make_mmio_spte(0x50000, 6)
    assert _map(pool, root, 0x50000, 1, spte, mmio=True) == (RET_PF_EMULATE, 0)
    assert _stats(pool)["pages_4k"] == 0


def test_a_huge_leaf_over_a_page_table_removes_it_and_reports_its_translations() -> None:
    pool = _pool()
    root = pool.alloc(4, 0, K)
    for off in (0, 1, 300):
        _map(pool, root, 0x40000 + off, 1, make_spte(0x40000 + off, 1, True))
    freed_table = _child(int(tdp_walk_to(pool.p.spt, root, 0x40000, 2)[3]))
    assert _map(pool, root, 0x40000, 2, make_spte(0x40000, 2, True)) == (RET_PF_FIXED, 3)
    assert _stats(pool)["pages_4k"] == 0 and _stats(pool)["pages_2m"] == 1
    assert freed_table in pool.free_tables() and not pool.p.spt[freed_table].any()


def test_a_4k_install_under_a_huge_leaf_splits_it_first() -> None:
    pool = _pool()
    root = pool.alloc(4, 0, K)
    _map(pool, root, 0x40000, 2, make_spte(0x80000, 2, True))
    # The split child already holds what the 4K fault would install: spurious, with the split done.
    assert _map(pool, root, 0x40007, 1, make_spte(0x80007, 1, True)) == (RET_PF_SPURIOUS, 0)
    assert _stats(pool)["pages_4k"] == 512 and _stats(pool)["pages_2m"] == 0
    assert _map(pool, root, 0x40008, 1, make_spte(0x90000, 1, True)) == (RET_PF_FIXED, 0)
    assert _stats(pool)["pages_4k"] == 512


def test_handle_removed_pt_clears_a_subtree_and_frees_its_tables() -> None:
    pool = _pool()
    root = pool.alloc(4, 0, K)
    for gfn in (0x40000, 0x40001, 0x40200):  # two 4K tables under one 2M-level table
        _map(pool, root, gfn, 1, make_spte(gfn, 1, True))
    l2 = _child(int(tdp_walk_to(pool.p.spt, root, 0x40000, 3)[3]))
    assert count_entries(pool.p, l2) == 5  # 2 links + 3 leaves
    pool.p.spt[_child(int(pool.p.spt[root, 0]))].fill(0)  # unlink it, as a caller's cmpxchg would
    assert handle_removed_pt(pool.p, l2, 0x40000, K, 0, 5) == 3
    assert _stats(pool)["pages_4k"] == 0 and _stats(pool)["tdp_mmu_pages"] == 2  # the root and the 1G-level table
    assert sorted(pool.free_tables().tolist()) == sorted(
        [l2, *(t for t in range(pool.n_tables) if pool.p.sp_level[t] == 1)]
    )


def test_zapping_a_root_visits_every_entry_and_notes_each_zapped_gfn_for_refaults() -> None:
    pool = _pool()
    root = pool.alloc(4, 0, K)
    _map(pool, root, REGION + 5, 1, make_spte(1, 1, True))
    _map(pool, root, REGION + 1024, 2, make_spte(2 << 9, 2, True))
    # Entries: the root's link, the 1G-level table's two links, the 4K table's leaf; the 2M leaf.
    assert tdp_zap_table(pool.p, root, K, False, 0, 3) == 5
    assert not pool.p.spt[: pool.n_tables].any()
    assert _stats(pool)["pages_4k"] == 0 and _stats(pool)["pages_2m"] == 0
    assert _stats(pool)["tdp_mmu_pages"] == 1  # the root stays until its last reference goes
    note_mapped(pool.p, REGION + 5, 1)  # a refault
    note_mapped(pool.p, REGION + 5, 1)  # mapped again without a zap between: not one
    note_mapped(pool.p, REGION + 1024 + 9, 1)  # 4K inside the zapped 2M range
    note_mapped(pool.p, REGION + 6, 1)  # never mapped before
    assert pool.p.counts[K_REFAULTS] == 2


def test_note_zapped_clips_to_the_region() -> None:
    pool = _pool(region_pages=1024)
    note_zapped(pool.p, REGION - 512, 2)  # [REGION - 512, REGION): nothing of the region
    assert not pool.p.zapped.any() and pool.p.hdr[H_ANY_ZAPPED] == 1
    note_zapped(pool.p, REGION - 256, 2)  # overlaps the first 256 pages
    note_zapped(pool.p, REGION + 1024 - 100, 2)  # overlaps the last 100
    z = pool.p.zapped
    assert z.sum() == 356 and z[255] and not z[256] and not z[923] and z[924] and z[1023]


def test_the_change_log_holds_every_compiled_change_in_order_only_while_logging() -> None:
    pool = _pool()
    root = pool.alloc(4, 0, K)
    _map(pool, root, 0x40000, 1, make_spte(1, 1, True))
    assert pool.take_changes() == []
    pool.p.hdr[H_LOG] = 1
    pool.reserve_changes(8)
    new = make_spte(0x40, 1, True)
    _map(pool, root, 0x40000 + 512, 1, new)  # a new 4K table under the existing 2M-level table
    rows = pool.take_changes()
    l1 = _child(int(tdp_walk_to(pool.p.spt, root, 0x40200, 2)[3]))
    assert [r[:4] for r in rows] == [[0x40200, 0, make_nonleaf_spte(l1), 2], [0x40200, 0, new, 1]]
    assert all(r[4:] == [0, 7] for r in rows) and len(rows[0]) == CHG_COLS


def test_the_checker_sees_the_compiled_installs_of_a_run() -> None:
    """Every 4K leaf a run's faults install reaches the invariant checker's SPTE hook."""
    vm = Vm(load_config(None, ["vm.vcpus=2", "workload.per_vcpu_memory=2MiB", "sim.invariants=true",
                               "events.level=off"]))  # fmt: skip
    assert vm.checker is not None
    seen: list[tuple[int, int, int]] = []
    hook = vm.checker.on_spte_changed

    def record(gfn: int, old: int, new: int, level: int, t: int, actor: int) -> None:
        seen.append((gfn, new, level))
        hook(gfn, old, new, level, t, actor)

    vm.checker.on_spte_changed = record  # type: ignore[method-assign]
    vm.run()
    leaves = {gfn for gfn, new, level in seen if level == 1 and new & SPTE_MMU_PRESENT}
    assert len(leaves) == 2 * 512 == vm.stat.pages_4k


def test_fast_page_fault_fixes_only_what_it_may_without_the_lock() -> None:
    """``fast_page_fault``'s decision (``fast_pf_fix``): W back on a write-protected, MMU-writable
    leaf; R and X back on an access-tracked one; a huge leaf in a dirty-logged slot, a leaf that
    is not MMU-writable, or no leaf at all goes to the slow path; an allowed access is spurious."""
    from vsim.mmu.fast_page_fault import fast_pf_fix
    from vsim.mmu.page_fault import RET_PF_INVALID
    from vsim.mmu.spte import PT_EXEC, PT_PRESENT_R, mark_spte_for_access_track

    w = make_spte(0x1234, 1, True)
    wp = w & ~PT_WRITABLE  # dirty logging's write protection keeps MMU-writable
    assert fast_pf_fix(wp, 1, True, True) == (RET_PF_FIXED, w)
    assert fast_pf_fix(wp, 1, False, True) == (RET_PF_SPURIOUS, wp)
    assert fast_pf_fix(w, 1, True, False) == (RET_PF_SPURIOUS, w)
    ro = make_spte(0x1234, 1, False)
    assert fast_pf_fix(ro, 1, True, False)[0] == RET_PF_INVALID  # not MMU-writable: the slow path
    huge = make_spte(0x40000, 2, True) & ~PT_WRITABLE
    assert fast_pf_fix(huge, 2, True, True)[0] == RET_PF_INVALID  # must be remapped at 4K
    assert fast_pf_fix(huge, 2, True, False) == (RET_PF_FIXED, huge | PT_WRITABLE)
    aged = mark_spte_for_access_track(ro)
    assert not aged & (PT_PRESENT_R | PT_EXEC)
    assert fast_pf_fix(aged, 1, False, False) == (RET_PF_FIXED, ro)
    assert fast_pf_fix(0, 1, True, False) == (RET_PF_INVALID, 0)
    assert fast_pf_fix(make_nonleaf_spte(3), 2, True, False)[0] == RET_PF_INVALID


def test_range_entries_walk_each_root_in_pre_order_over_the_range_only() -> None:
    """``for_each_tdp_pte`` over a range: every present entry overlapping it, parents first, in
    index order, root after root; entries outside the range, frozen and non-present ones are not
    visited, and a huge leaf has nothing under it."""
    pool = _pool()
    root = sp_alloc(pool.p, 4, 0, K)
    g = REGION  # 1 GiB: PML4 index 0, PDPT index 1
    assert _map(pool, root, g + 3, 1, make_spte(0x100, 1, True))[0] == RET_PF_FIXED
    assert _map(pool, root, g + 5, 1, make_spte(0x101, 1, True))[0] == RET_PF_FIXED
    assert _map(pool, root, g + 512, 2, make_spte(0x400, 2, True))[0] == RET_PF_FIXED  # a 2M leaf
    pdpt = _child(int(pool.p.spt[root, 0]))
    pd = _child(int(pool.p.spt[pdpt, 1]))
    pt = _child(int(pool.p.spt[pd, 0]))
    pool.p.spt[pt, 4] = REMOVED_SPTE  # frozen: skipped
    pool.p.spt[pt, 6] = make_mmio_spte(g + 6, 0)  # not present to the MMU: skipped
    rows = tdp_range_entries(pool.p.spt, np.array([root], dtype=np.int64), g + 4, g + 1024).tolist()
    assert [(t, i, lvl, gfn) for t, i, lvl, gfn, _ in rows] == [
        (root, 0, 4, 0), (pdpt, 1, 3, g), (pd, 0, 2, g), (pt, 5, 1, g + 5), (pd, 1, 2, g + 512),
    ]  # fmt: skip
    assert rows[3][4] == int(pool.p.spt[pt, 5]) and rows[4][4] & PT_PAGE_SIZE
    # The leaf at g + 3 is outside [g + 4, ...); a second root is walked after the first.
    other = sp_alloc(pool.p, 4, 0, K)
    assert _map(pool, other, g + 3, 1, make_spte(0x200, 1, True))[0] == RET_PF_FIXED
    other_pt = int(tdp_walk_to(pool.p.spt, other, g + 3, 1)[0])
    both = tdp_range_entries(pool.p.spt, np.array([root, other], dtype=np.int64), g + 3, g + 4).tolist()
    assert [(t, lvl, gfn) for t, _, lvl, gfn, _ in both] == [
        (root, 4, 0), (pdpt, 3, g), (pd, 2, g), (pt, 1, g + 3),
        (other, 4, 0), (int(both[5][0]), 3, g), (int(both[6][0]), 2, g), (other_pt, 1, g + 3),
    ]  # fmt: skip
    assert tdp_range_entries(pool.p.spt, np.zeros(0, dtype=np.int64), 0, 1 << 40).shape == (0, 5)
