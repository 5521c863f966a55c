"""The batched guest-access kernel: TLB lookups and successful 2D walks without SimPy events.

``run_accesses`` runs a stretch of one vCPU's accesses in compiled code (numba over the numpy arrays
of ``vsim.vcpu.tlb.Tlb`` and the TDP MMU's page-table pool). It stops at the first access whose walk
ends in an EPT violation, leaving the TLB exactly as the accesses before it left it; the caller then
brings the vCPU to that access's time and either re-runs (another vCPU fixed the entry meanwhile)
or takes the exit. The logic is line for line ``RefTlb`` + ``vsim.vcpu.walk.walk_2d``; a test holds
them equal.
"""

from __future__ import annotations

from numba import njit

# The helpers are inlined into the kernel: a real call would reference-count every array argument
# (atomic operations), which costs more than the TLB work itself.
from vsim.mmu.spte import PFN_MASK, PT_PAGE_SIZE, PT_PRESENT_R, PT_WRITABLE, SPTE_ACCESSED, SPTE_DIRTY

STOP_DONE = 0
STOP_EPT_VIOLATION = 1
STOP_EPT_MISCONFIG = 2  # an MMIO SPTE (RWX = 110b) on the walk
STOP_HORIZON = 3  # the next access would start at or after ``limit``: something may interrupt it
STOP_PML_FULL = 4  # a write must log its gpa but the PML buffer is full: a PML-full exit
STOP_SET_ACCESSED = 5  # the walk would set A: other actors read A, so that write waits for a sync

PML_LOG_NR_ENTRIES = 512

_EMPTY = -1


@njit(cache=True, inline="always")
def _lookup(tags, wr, sets, ways, c, key, write):
    """0: miss; 1: hit (moved to the front of its set); 2: present but not usable for a write
    (read-only, or writable with D clear: the CPU walks to set D)."""
    row = key % sets[c]
    n = ways[c]
    for i in range(n):
        k = tags[c, row, i]
        if k == key:
            if write and wr[c, row, i] < 2:
                return 2
            w = wr[c, row, i]
            for j in range(i, 0, -1):  # shift the more recent entries down one way
                tags[c, row, j] = tags[c, row, j - 1]
                wr[c, row, j] = wr[c, row, j - 1]
            tags[c, row, 0] = key
            wr[c, row, 0] = w
            return 1
        if k == _EMPTY:
            return 0
    return 0


@njit(cache=True, inline="always")
def _insert(tags, wr, sets, ways, count, c, key, writable):
    """Put ``key`` at the front of its set: replace its old entry, or evict the set's LRU way."""
    row = key % sets[c]
    n = ways[c]
    last = n - 1
    for i in range(n):
        k = tags[c, row, i]
        if k == _EMPTY:
            count[c] += 1
            last = i
            break
        if k == key:
            last = i
            break
    for j in range(last, 0, -1):
        tags[c, row, j] = tags[c, row, j - 1]
        wr[c, row, j] = wr[c, row, j - 1]
    tags[c, row, 0] = key
    wr[c, row, 0] = writable


@njit(cache=True)
def run_accesses(
    gfns,
    writes,
    start,
    stop,
    limit,
    spt,
    root_table,
    guest_refs,
    max_class,
    tags,
    wr,
    sets,
    ways,
    count,
    c_guest,
    c_hit,
    c_ref,
    counters,
    written,
    wbase,
    wmap,
    pml_buf,
    pml_n,
    synced,
):
    """Run accesses ``start..stop``; returns ``(index, elapsed_ns, status, fault_refs, present)``.

    Each access is a page number (a gfn under EPT, a guest virtual page under shadow paging) walked
    through the four levels below ``root_table``; a walk makes ``guest_refs`` references besides
    those (the guest's levels of a 2D walk, or minus the PAE stand-in levels of a shadow walk), and
    a translation is cached at size class ``min(leaf - 1, max_class)``.

    ``status`` is ``STOP_DONE`` (all ran), or ``STOP_EPT_VIOLATION`` / ``STOP_EPT_MISCONFIG`` at
    ``index``, whose walk made ``fault_refs`` references and found an EPT leaf (``present``) or
    none. The faulting access is not counted; the caller accounts it when it takes the exit.
    A walk that would set A on a leaf (prefetched or aged) stops with ``STOP_SET_ACCESSED`` unless
    its access is ``synced`` (the caller brought the vCPU to that access's instant first), because
    other actors read A (``mmu_set_spte`` compares whole SPTEs, aging tests it). Completed writes are
    noted in ``written[k]`` for ``k = key - wbase``, mapped through ``wmap[k]`` when ``wmap`` is not
    empty (a process's pages → test-region frames), where that index exists. A walk sets A
    on a leaf with A clear, and a write through a writable leaf with D clear sets D (hardware A/D);
    with PML on (``pml_buf`` not empty) the write first appends the gfn to ``pml_buf`` (``pml_n[0]``
    entries used), or stops with ``STOP_PML_FULL``.
    TLB entries keep the translation's write state: 0 read-only, 1 writable with D clear, 2 dirty.
    ``STOP_HORIZON`` stops before the first access that would start ``limit`` ns or more into the
    stretch (a kick could arrive by then).
    """
    t = 0
    track = written.shape[0] > 0  # the invariant checker is on
    hits = 0
    walks = 0
    walk_refs = 0
    i = start
    while i < stop:
        if t >= limit:
            _add_counters(counters, i - start, hits, walks, walk_refs)
            return i, t, STOP_HORIZON, 0, False
        g = gfns[i]
        w = writes[i]
        hit = False
        for c in range(3):
            if count[c] == 0:
                continue  # an empty size class: nothing to look up
            r = _lookup(tags, wr, sets, ways, c, g >> (9 * c), w)
            if r == 1:
                hit = True
            if r != 0:
                break
        if hit:
            if w and track:
                _note_write(written, wmap, g - wbase)
            t += c_guest + c_hit
            hits += 1
            i += 1
            continue
        table = root_table
        level = 4
        refs = guest_refs
        leaf = 0
        e = 0
        while True:
            refs += 1
            e = spt[table, (g >> (9 * (level - 1))) & 511]
            if (e & 7) == 6:
                _add_counters(counters, i - start, hits, walks, walk_refs)
                return i, t, STOP_EPT_MISCONFIG, refs, True
            if (e & PT_PRESENT_R) == 0:
                break
            if level == 1 or (e & PT_PAGE_SIZE) != 0:
                leaf = level
                break
            table = (e & PFN_MASK) >> 12
            level -= 1
        writable = (e & PT_WRITABLE) != 0
        if leaf == 0 or (w and not writable):
            _add_counters(counters, i - start, hits, walks, walk_refs)
            return i, t, STOP_EPT_VIOLATION, refs, leaf != 0
        if (e & SPTE_ACCESSED) == 0 and i != synced:
            _add_counters(counters, i - start, hits, walks, walk_refs)
            return i, t, STOP_SET_ACCESSED, 0, True
        e0 = e
        dirty = (e & SPTE_DIRTY) != 0
        if w and not dirty:
            # The CPU sets D; with PML on it first logs the gpa, or exits if the buffer is full.
            if pml_buf.shape[0]:
                if pml_n[0] == PML_LOG_NR_ENTRIES:
                    _add_counters(counters, i - start, hits, walks, walk_refs)
                    return i, t, STOP_PML_FULL, refs, True
                pml_buf[pml_n[0]] = g
                pml_n[0] += 1
            e |= SPTE_DIRTY
            dirty = True
        e |= SPTE_ACCESSED  # the CPU sets A on the leaf it used (aging may have cleared it)
        if e != e0:
            spt[table, (g >> (9 * (level - 1))) & 511] = e
        eff = min(max_class, leaf - 1)
        _insert(tags, wr, sets, ways, count, eff, g >> (9 * eff), (2 if dirty else 1) if writable else 0)
        if w and track:
            _note_write(written, wmap, g - wbase)
        t += c_guest + refs * c_ref
        walks += 1
        walk_refs += refs
        i += 1
    _add_counters(counters, i - start, hits, walks, walk_refs)
    return i, t, STOP_DONE, 0, False


@njit(cache=True, inline="always")
def _note_write(written, wmap, k):
    """The invariant checker's record of completed writes (an empty array when it is off)."""
    if wmap.shape[0]:
        if not 0 <= k < wmap.shape[0]:
            return
        k = wmap[k]
    if 0 <= k < written.shape[0]:
        written[k] = 1


@njit(cache=True, inline="always")
def _add_counters(counters, accesses, hits, walks, walk_refs):
    counters[0] += accesses
    counters[1] += hits
    counters[2] += walks
    counters[3] += walk_refs
