"""Write tracking helpers (spec §4.2): misaligned writes, write flooding, written SPTEs."""

from __future__ import annotations

from conftest import make_shadow_page

from vsim.mmu.mmu_page_view import KvmMmuPage
from vsim.mmu.page_track import PageTrack


def _sp(level: int, four: bool = False, quadrant: int = 0) -> KvmMmuPage:
    return make_shadow_page(level, quadrant=quadrant, has_4_byte_gpte=four)


def test_only_whole_aligned_gpte_writes_are_aligned() -> None:
    sp64, sp32 = _sp(1), _sp(1, four=True)
    assert not PageTrack.detect_write_misaligned(sp64, 16, 8)
    assert not PageTrack.detect_write_misaligned(sp64, 16, 1)  # a status-bit byte at the entry's start
    assert PageTrack.detect_write_misaligned(sp64, 12, 8)  # crosses two gptes
    assert PageTrack.detect_write_misaligned(sp64, 17, 2)  # shorter than 4 bytes
    assert PageTrack.detect_write_misaligned(sp32, 8, 8)  # an 8-byte store over two 4-byte gptes
    assert not PageTrack.detect_write_misaligned(sp32, 8, 4)


def test_upper_levels_flood_on_the_third_write_and_4k_pages_never() -> None:
    pmd, pt = _sp(2), _sp(1)
    assert [PageTrack.detect_write_flooding(pmd) for _ in range(3)] == [False, False, True]
    assert not any(PageTrack.detect_write_flooding(pt) for _ in range(10))


def test_written_sptes_for_32_bit_gptes_follow_the_quadrant() -> None:
    assert PageTrack.get_written_sptes(_sp(1), 8 * 7, 8) == [7]
    # A paging32 PDE (4 MiB) is two PAE PDEs; gpte 300 lives in quadrant 1 (entries 256..511).
    assert PageTrack.get_written_sptes(_sp(2, four=True, quadrant=1), 4 * 300, 4) == [88, 89]
    assert PageTrack.get_written_sptes(_sp(2, four=True, quadrant=0), 4 * 300, 4) == []
    assert PageTrack.get_written_sptes(_sp(1, four=True, quadrant=1), 4 * 600, 4) == [88]
