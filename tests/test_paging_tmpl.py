"""The shadow MMU's guest page-table walker (FNAME(walk_addr)) and gpte helpers."""

from __future__ import annotations

from conftest import make_shadow_page

from vsim.guest.memory import GuestMemory
from vsim.guest.paging import (
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    PAGING32,
    PAGING32E,
    PAGING64,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    REGISTERS,
    make_gpte,
    shadow_mmu_init_context,
)
from vsim.mmu.page_fault import PFERR_PRESENT_MASK, PFERR_USER_MASK, PFERR_WRITE_MASK
from vsim.mmu.paging_tmpl import gpte_index, protect_clean_gpte, sp_quadrant, walk_addr


def test_init_context_picks_the_walker_from_the_paging_registers() -> None:
    assert [shadow_mmu_init_context(*REGISTERS[m]).name for m in REGISTERS] == list(REGISTERS)


def _map(mem: GuestMemory, mode, gvpn: int, tables: list[int], data: int, writable: bool = True) -> None:  # type: ignore[no-untyped-def]
    for level, (table, child) in zip(range(mode.levels, 1, -1), zip(tables, tables[1:], strict=False), strict=False):
        mem.write(table, mode.index(gvpn, level), make_gpte(child, True, True, mode=mode))
    mem.write(tables[-1], mode.index(gvpn, 1), make_gpte(data, writable, True, mode=mode))


def test_paging64_walk_reads_four_levels_and_sets_accessed_and_dirty() -> None:
    mem = GuestMemory(512)
    gvpn = PAGING64.user_base + 5
    _map(mem, PAGING64, gvpn, [10, 11, 12, 13], 99)
    w = walk_addr(mem, PAGING64, 10, gvpn, write=True, user=True)
    assert w.fault == 0 and w.reads == 4 and w.level == 1 and w.gfn == 99
    assert [w.table_gfn[level] for level in (4, 3, 2, 1)] == [10, 11, 12, 13]
    assert w.pte_access & ACC_WRITE_MASK and w.pte_access & ACC_USER_MASK
    leaf = mem.read(13, PAGING64.index(gvpn, 1))
    assert leaf & PT_ACCESSED_MASK and leaf & PT_DIRTY_MASK and w.ad_updates == 4
    assert w.written == [10, 11, 12, 13]  # the tables KVM wrote, each marked dirty by the caller
    # A read of the same page needs no A/D update any more.
    again = walk_addr(mem, PAGING64, 10, gvpn, write=False, user=True)
    assert again.ad_updates == 0 and again.written == []


def test_failed_walks_report_the_guests_error_code() -> None:
    mem = GuestMemory(512)
    gvpn = PAGING64.user_base
    _map(mem, PAGING64, gvpn, [10, 11, 12, 13], 99, writable=False)
    assert walk_addr(mem, PAGING64, 10, gvpn + 1, write=True, user=True).fault == PFERR_WRITE_MASK | PFERR_USER_MASK
    w = walk_addr(mem, PAGING64, 10, gvpn, write=True, user=True)  # a write to a read-only PTE
    assert w.fault == PFERR_PRESENT_MASK | PFERR_WRITE_MASK | PFERR_USER_MASK
    assert not mem.read(13, PAGING64.index(gvpn, 1)) & PT_DIRTY_MASK  # a failed walk sets no D


def test_32_bit_walks_read_two_gptes() -> None:
    for mode, tables in ((PAGING32E, [20, 21, 22]), (PAGING32, [30, 31])):
        mem = GuestMemory(mode.entries)
        gvpn = mode.user_base + 700
        _map(mem, mode, gvpn, tables, 77)
        w = walk_addr(mem, mode, tables[0], gvpn, write=False, user=True)
        assert w.fault == 0 and w.reads == 2 and w.gfn == 77  # PAE's PDPTE comes from the PDPTRs
    mem = GuestMemory(1024)  # a 4 MiB PSE page: 10 bits of the address select the 4K page in it
    gvpn = PAGING32.page_offset + 1024 * 3 + 17
    mem.write(40, PAGING32.index(gvpn, 2), make_gpte(4096, True, False, huge=True, mode=PAGING32))
    w = walk_addr(mem, PAGING32, 40, gvpn, write=False, user=False)
    assert w.level == 2 and w.gfn == 4096 + 17


def test_quadrants_map_shadow_entries_to_32_bit_gptes() -> None:
    pt = make_shadow_page(1, 5, quadrant=1, has_4_byte_gpte=True)
    pd = make_shadow_page(2, 6, quadrant=2, has_4_byte_gpte=True)
    assert gpte_index(pt, 3) == 512 + 3  # the second half of a 1024-entry table
    assert gpte_index(pd, 7) == 2 * 256 + 3  # two PAE PDEs per 4 MiB guest PDE
    gvpn = (3 << 18) | (1 << 9)
    assert sp_quadrant(PAGING32, gvpn, 2) == 3 and sp_quadrant(PAGING32, gvpn, 1) == 1
    assert sp_quadrant(PAGING64, gvpn, 1) == 0


def test_clean_gptes_are_shadowed_read_only_until_dirty() -> None:
    gpte = make_gpte(5, True, True)
    assert not protect_clean_gpte(7, gpte) & ACC_WRITE_MASK
    assert protect_clean_gpte(7, gpte | PT_DIRTY_MASK) & ACC_WRITE_MASK
