"""The pte_list encoding of rmap heads (spec §3): one entry, then descriptors of 14."""

from __future__ import annotations

import pytest

from vsim.mmu.rmap import PTE_LIST_EXT, PteList


def test_add_reports_the_count_before_and_keeps_tail_descriptors_full() -> None:
    head = PteList()
    counts = [head.add((1, i)) for i in range(2 * PTE_LIST_EXT + 3)]
    assert counts == list(range(2 * PTE_LIST_EXT + 3))
    assert head.single is None and [len(d) for d in head.descs] == [3, PTE_LIST_EXT, PTE_LIST_EXT]
    # Iteration starts at the head descriptor: the newest entries first, then the full tails.
    assert head.entries()[:3] == [(1, 28), (1, 29), (1, 30)]
    assert head.entries()[3] == (1, 14) and head.entries()[-1] == (1, 13)


def test_remove_fills_the_hole_with_the_heads_last_entry_and_frees_an_empty_head() -> None:
    head = PteList()
    for i in range(PTE_LIST_EXT + 1):
        head.add((2, i))
    head.remove((2, 3))  # in the full tail: the head's only entry (2, 14) moves into its place
    assert head.descs == [[(2, i) if i != 3 else (2, 14) for i in range(PTE_LIST_EXT)]]
    head.remove((2, 0))
    assert len(head) == PTE_LIST_EXT - 1 and head.descs[0][0] == (2, 13)
    single = PteList()
    single.add((3, 0))
    assert single.entries() == [(3, 0)] and single.descs == []
    single.remove((3, 0))
    assert not single
    with pytest.raises(KeyError):
        head.remove((9, 9))
