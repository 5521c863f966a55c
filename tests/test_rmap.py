"""The pte_list encoding of rmap heads and parent_ptes (spec §3): one entry, then descriptors of 14."""

from __future__ import annotations

import numpy as np
import pytest

from vsim.mmu.pte_list import PTE_LIST_EXT, DescPool, pte_list_count


def _chain(pool: DescPool, heads: np.ndarray, i: int) -> list[int]:
    """The entry counts of head ``i``'s descriptors, the head descriptor first."""
    d = pool.d
    desc = -int(heads[i]) - 1
    out = []
    while desc >= 0:
        out.append(int(d.spte_count[desc]))
        desc = int(d.more[desc])
    return out


def test_add_reports_the_count_before_and_keeps_tail_descriptors_full() -> None:
    pool = DescPool(descs=2)  # grows as descriptors are needed
    heads = np.zeros(4, dtype=np.int64)
    counts = [pool.add(heads, 1, 1, i) for i in range(2 * PTE_LIST_EXT + 3)]
    assert counts == list(range(2 * PTE_LIST_EXT + 3))
    assert heads[1] < 0 and _chain(pool, heads, 1) == [3, PTE_LIST_EXT, PTE_LIST_EXT]
    assert pte_list_count(pool.d, heads, 1) == 2 * PTE_LIST_EXT + 3 and heads[0] == heads[2] == 0
    # Iteration starts at the head descriptor: the newest entries first, then the full tails.
    entries = pool.entries(heads, 1)
    assert entries[:3] == [(1, 28), (1, 29), (1, 30)]
    assert entries[3] == (1, 14) and entries[-1] == (1, 13)


def test_remove_fills_the_hole_with_the_heads_last_entry_and_frees_an_empty_head() -> None:
    pool = DescPool()
    heads = np.zeros(2, dtype=np.int64)
    for i in range(PTE_LIST_EXT + 1):
        pool.add(heads, 0, 2, i)
    assert pool.in_use == 2
    pool.remove(heads, 0, 2, 3)  # in the full tail: the head's only entry (2, 14) moves into its place
    assert pool.entries(heads, 0) == [(2, i) if i != 3 else (2, 14) for i in range(PTE_LIST_EXT)]
    assert pool.in_use == 1 and _chain(pool, heads, 0) == [PTE_LIST_EXT]
    pool.remove(heads, 0, 2, 0)
    assert pte_list_count(pool.d, heads, 0) == PTE_LIST_EXT - 1 and pool.entries(heads, 0)[0] == (2, 13)
    for i in (1, 2, 13, 4, 5, 6, 7, 8, 9, 10, 11, 12):
        pool.remove(heads, 0, 2, i)
    assert pool.entries(heads, 0) == [(2, 14)] and heads[0] < 0  # still a chain with one entry, as in KVM
    pool.remove(heads, 0, 2, 14)
    assert heads[0] == 0 and pool.in_use == 0
    pool.add(heads, 1, 3, 0)
    assert pool.entries(heads, 1) == [(3, 0)] and heads[1] == 3 * 512 + 0 + 1  # a single entry, no descriptor
    pool.add(heads, 1, 3, 1)
    assert pool.in_use == 1  # the freed descriptor is reused
    with pytest.raises(KeyError):
        pool.remove(heads, 1, 9, 9)
    pool.remove(heads, 1, 3, 0)
    pool.remove(heads, 1, 3, 1)
    with pytest.raises(KeyError):
        pool.remove(heads, 1, 3, 1)
