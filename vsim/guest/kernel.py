"""The guest kernel that runs over shadow paging: its page tables, processes and memory management.

At boot the kernel maps guest RAM into its direct map at ``PAGE_OFFSET`` with huge pages (2M for
paging64 and PAE, 4M PSE pages for paging32) and creates each CPU's processes, each with its own
page directory whose kernel half points at the shared kernel tables (paging32 copies the kernel
PDEs into every page directory; PAE pre-populates the three user PMDs, as Linux's
``pgd_prepopulate_pmd`` does, so PDPTEs never change under a loaded CR3).

At run time everything the kernel does to page tables is a guest store through the direct map,
executed by the vCPU (``ShadowVcpu.guest_store``): it hits the TLB, walks the shadow page tables,
or exits when KVM has write-protected the page because it shadows it. The operations are:

* the #PF handler (``handle_mm_fault``): allocate and zero missing page tables and the data page and
  write the PTEs; a write to a present read-only PTE is a copy-on-write fault whose page is no
  longer shared (``wp_page_reuse``), so the PTE just becomes writable;
* ``fork``: copy the page tables (``dup_mmap`` → ``copy_page_range``), write-protecting both
  parents' and child's PTEs, then flush the parent's TLB (``flush_tlb_mm``, a CR3 reload);
* ``exit_mmap``: clear the PTEs and free the page tables (``free_pgtables``), page by page;
* context switches (``switch_mm``: a CR3 write).

Frames come from the CPU's ``FramePool``; freed page tables are the next frames allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vsim.guest.memory import FramePool, GuestMemory
from vsim.guest.paging import (
    PT_DIRTY_MASK,
    PT_PRESENT_MASK,
    PT_WRITABLE_MASK,
    PagingMode,
    gpte_to_gfn,
    make_gpte,
)
from vsim.sched import Proc

if TYPE_CHECKING:
    from vsim.config.schema import ScenarioConfig
    from vsim.vcpu.shadow_vcpu import ShadowVcpu


@dataclass(eq=False)
class GuestProcess:
    """A guest process: its page directory (CR3) and which frame backs each of its pages."""

    pid: int
    pgd: int  # gfn CR3 points at (the PDPT page for PAE)
    frames: np.ndarray  # frame behind each user page, relative to the start of RAM; -1 where unmapped
    child: bool = False  # a forked child, whose pages the parent still shares
    owned: list[int] = field(default_factory=list)  # frames a child allocated (freed when it exits)


def kernel_table_pages(mode: PagingMode, ram_end_gfn: int) -> int:
    """Frames the boot page tables of the direct map take (the kernel's pool)."""
    if mode.levels == 4:
        return 1 + -(-ram_end_gfn // (1 << 18))  # a PUD, and a PMD per GiB
    if mode.levels == 3:
        return 1  # the kernel PMD (PDPTE 3)
    return 0  # paging32: the kernel PDEs live in every page directory


def address_space_tables(mode: PagingMode, user_pages: int) -> int:
    """Page-table pages one process needs at most to map ``user_pages`` pages from ``user_base``."""
    n = 1
    for level in range(1, mode.levels):
        if mode.levels == 3 and level == 2:
            n += 3  # PAE: the three user PMDs come with the PDPT
        else:
            n += -(-user_pages // mode.pages_per_gpte(level + 1)) + 1
    return n


def frames_needed(mode: PagingMode, processes: int, user_pages: int, forks: bool, child_writes: int) -> int:
    """Frames one CPU's pool needs: its processes' pages and tables, and one live child's."""
    n = processes * (user_pages + address_space_tables(mode, user_pages))
    if forks:
        n += address_space_tables(mode, user_pages) + min(child_writes, user_pages)
    return n


def vcpu_share(cfg: ScenarioConfig, mode: PagingMode) -> int:
    """Frames of RAM in each CPU's pool (what the kernel's boot tables leave, split evenly)."""
    total = cfg.vm.vcpus * cfg.workload.per_vcpu_memory // 4096
    end = (cfg.vm.base_gpa >> 12) + total
    return (total - kernel_table_pages(mode, end)) // cfg.vm.vcpus


def process_pages(cfg: ScenarioConfig, mode: PagingMode) -> int:
    """Pages each process touches: ``guest.process_memory``, or the most that fit the CPU's pool."""
    g = cfg.guest
    if g.process_memory:
        return g.process_memory // 4096
    share = vcpu_share(cfg, mode)
    lo, hi = 0, share
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if frames_needed(mode, g.processes, mid, bool(g.fork_interval), g.child_writes) <= share:
            lo = mid
        else:
            hi = mid - 1
    return lo


class GuestKernel:
    """The guest OS: direct map, processes per CPU, and the page-table operations above."""

    def __init__(self, mode: PagingMode, ram_base: int, ram_pages: int, ncpus: int, processes: int,
                 user_pages: int) -> None:  # fmt: skip
        self.mode = mode
        self.mem = GuestMemory(mode.entries)
        self.user_pages = user_pages
        end = ram_base + ram_pages
        kpages = kernel_table_pages(mode, end)
        self.kernel_pool = FramePool(ram_base, kpages)
        per = (ram_pages - kpages) // ncpus
        self.pools = [FramePool(ram_base + kpages + i * per, per) for i in range(ncpus)]
        self._ram = (ram_base, end)
        self._kernel_entries = self._build_direct_map()
        self._next_pid = 1
        self.processes = [[self._boot_process(cpu) for _ in range(processes)] for cpu in range(ncpus)]

    # -- boot ------------------------------------------------------------------------------------
    def kva(self, gfn: int) -> int:
        """The direct-map virtual page of a guest frame (``__va``)."""
        return self.mode.page_offset + gfn

    def _build_direct_map(self) -> list[tuple[int, int]]:
        """Map RAM at ``PAGE_OFFSET``; returns the kernel-half entries of a page directory."""
        mode, mem = self.mode, self.mem
        lo, hi = self._ram
        huge = mode.pages_per_gpte(2)
        chunks = range(lo // huge * huge, hi, huge)
        if mode.levels == 2:  # paging32: 4M PSE PDEs, copied into every page directory
            return [(mode.index(self.kva(g), 2), make_gpte(g, True, False, huge=True, mode=mode)) for g in chunks]
        if mode.levels == 3:  # PAE: one kernel PMD behind PDPTE 3
            kpmd = self.kernel_pool.alloc()
            for g in chunks:
                mem.write(kpmd, mode.index(self.kva(g), 2), make_gpte(g, True, False, huge=True))
            return [(3, make_gpte(kpmd, False, False))]
        kpud = self.kernel_pool.alloc()
        pmds: dict[int, int] = {}
        for g in chunks:
            i3 = mode.index(self.kva(g), 3)
            if i3 not in pmds:
                pmds[i3] = self.kernel_pool.alloc()
                mem.write(kpud, i3, make_gpte(pmds[i3], True, False))
            mem.write(pmds[i3], mode.index(self.kva(g), 2), make_gpte(g, True, False, huge=True))
        return [(mode.index(self.kva(lo), 4), make_gpte(kpud, True, False))]

    def _boot_process(self, cpu: int) -> GuestProcess:
        pool = self.pools[cpu]
        pgd = pool.alloc()
        for idx, e in self._kernel_entries:
            self.mem.write(pgd, idx, e)
        if self.mode.levels == 3:
            for i in range(3):
                self.mem.write(pgd, i, make_gpte(pool.alloc(), False, False))
        return self._process(pgd)

    def _process(self, pgd: int) -> GuestProcess:
        p = GuestProcess(self._next_pid, pgd, np.full(self.user_pages, -1, dtype=np.int64))
        self._next_pid += 1
        return p

    # -- the #PF handler -----------------------------------------------------------------------
    def handle_mm_fault(self, v: ShadowVcpu, proc: GuestProcess, k: int,
                        write: bool) -> Proc[None]:  # fmt: skip
        """The guest's #PF handler for user page ``k`` of ``proc``."""
        mode, mem = self.mode, self.mem
        pool = self.pools[v.id]
        gvpn = mode.user_base + k
        table = proc.pgd
        for level in range(mode.levels, 1, -1):
            idx = mode.index(gvpn, level)
            e = mem.read(table, idx)
            if not e & PT_PRESENT_MASK:  # __pte_alloc / __pmd_alloc / __pud_alloc
                new = pool.alloc()
                yield from v.guest_clear_page(new)
                e = make_gpte(new, True, True, mode=mode)
                yield from v.guest_store(table, idx, e)
            table = gpte_to_gfn(e, level, mode)
        idx = mode.index(gvpn, 1)
        e = mem.read(table, idx)
        if not e & PT_PRESENT_MASK:  # do_anonymous_page
            data = pool.alloc()
            yield from v.guest_clear_page(data)
            pte = make_gpte(data, True, True, mode=mode) | (PT_DIRTY_MASK if write else 0)
            yield from v.guest_store(table, idx, pte)
            self._own(proc, k, data)
        elif write and not e & PT_WRITABLE_MASK and proc.child:  # do_wp_page → wp_page_copy
            data = pool.alloc()
            yield from v.guest_clear_page(data)  # copy_user_highpage: a string store over the page
            yield from v.guest_store(table, idx, 0)  # ptep_clear_flush
            yield from v.guest_invlpg(gvpn)
            yield from v.guest_store(table, idx, make_gpte(data, True, True, mode=mode) | PT_DIRTY_MASK)
            self._own(proc, k, data)
        elif write and not e & PT_WRITABLE_MASK:  # do_wp_page → wp_page_reuse (no longer shared)
            yield from v.guest_store(table, idx, e | PT_WRITABLE_MASK | PT_DIRTY_MASK)

    def _own(self, proc: GuestProcess, k: int, gfn: int) -> None:
        proc.frames[k] = gfn - self._ram[0]
        if proc.child:
            proc.owned.append(gfn)

    # -- fork and exit -----------------------------------------------------------------------------
    def fork(self, v: ShadowVcpu, parent: GuestProcess) -> Proc[GuestProcess]:
        """``dup_mmap``: a child sharing every page copy-on-write, then ``flush_tlb_mm(parent)``."""
        mode = self.mode
        pool = self.pools[v.id]
        pgd = pool.alloc()
        yield from v.guest_clear_page(pgd)  # pgd_alloc
        for idx, e in self._kernel_entries:
            yield from v.guest_store(pgd, idx, e)
        top = mode.levels
        if top == 3:  # pgd_prepopulate_pmd: the user PMDs come with the PDPT
            for i in range(3):
                pmd = pool.alloc()
                yield from v.guest_clear_page(pmd)
                yield from v.guest_store(pgd, i, make_gpte(pmd, False, False))
        child = self._process(pgd)
        child.child = True
        yield from self._copy_table(v, parent.pgd, pgd, top, pool)
        child.frames[:] = parent.frames
        yield from v.guest_write_cr3(parent.pgd)  # flush_tlb_mm: MOV to CR3 with the same value
        return child

    def _user_entries(self, table: int, level: int) -> list[int]:
        """Indices of present user entries of a table (the kernel half is shared, never copied)."""
        kernel = {i for i, _ in self._kernel_entries} if level == self.mode.levels else set()
        return [i for i in self.mem.present(table) if i not in kernel]

    def _copy_table(self, v: ShadowVcpu, src: int, dst: int, level: int,
                    pool: FramePool) -> Proc[None]:  # fmt: skip
        mode, mem = self.mode, self.mem
        if level == 1:  # copy_pte_range → copy_present_pte: COW, both sides read-only
            stores: list[tuple[int, int, int | None]] = []
            for i in self._user_entries(src, level):
                e = mem.read(src, i)
                if e & PT_WRITABLE_MASK:
                    e &= ~PT_WRITABLE_MASK
                    stores.append((src, i, e))
                stores.append((dst, i, e))
            yield from v.guest_stores(stores)
            return
        for i in self._user_entries(src, level):
            e = mem.read(src, i)
            child_src = gpte_to_gfn(e, level, mode)
            if level == 3 and mode.levels == 3:  # PAE: the child's PMD exists already
                child_dst = gpte_to_gfn(mem.read(dst, i), level, mode)
            else:
                child_dst = pool.alloc()
                yield from v.guest_clear_page(child_dst)
                yield from v.guest_store(dst, i, make_gpte(child_dst, True, True, mode=mode))
            yield from self._copy_table(v, child_src, child_dst, level - 1, pool)
            v.now += v.vm.costs.guest_fork_table

    def exit_mmap(self, v: ShadowVcpu, proc: GuestProcess) -> Proc[None]:
        """``exit_mmap``: zap the PTEs, free the page tables bottom-up, then the page directory."""
        pool = self.pools[v.id]
        yield from self._free_table(v, proc.pgd, self.mode.levels, pool)
        if self.mode.levels == 3:
            for i in range(3):
                pool.free(gpte_to_gfn(self.mem.read(proc.pgd, i), 3, self.mode))
        pool.free(proc.pgd)
        for gfn in proc.owned:
            pool.free(gfn)

    def _free_table(self, v: ShadowVcpu, table: int, level: int, pool: FramePool) -> Proc[None]:
        mode, mem = self.mode, self.mem
        if level == 1:  # zap_pte_range
            yield from v.guest_stores([(table, i, 0) for i in self._user_entries(table, level)])
            return
        for i in self._user_entries(table, level):
            e = mem.read(table, i)
            if level > 1:
                child = gpte_to_gfn(e, level, mode)
                yield from self._free_table(v, child, level - 1, pool)
                if level == 3 and mode.levels == 3:
                    continue  # PAE user PMDs go with the PDPT
                pool.free(child)
            yield from v.guest_store(table, i, 0)  # pte_clear / pmd_clear (free_pgd_range)
