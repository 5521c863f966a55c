"""The batched guest-access kernel: TLB lookups and successful 2D walks without SimPy events.

``run_accesses`` runs a stretch of one vCPU's accesses in compiled code (numba over the numpy arrays
of ``vsim.vcpu.tlb.Tlb`` and the TDP MMU's page-table pool). It stops at the first access whose walk
ends in an EPT violation, leaving the TLB exactly as the accesses before it left it; the caller then
brings the vCPU to that access's time and either re-runs (another vCPU fixed the entry meanwhile)
or takes the exit. The logic is line for line ``RefTlb`` + ``vsim.vcpu.walk.walk_2d``; a test holds
them equal.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from vsim.mmu.spte import PFN_MASK, PT_PAGE_SIZE, PT_PRESENT_R, PT_WRITABLE
from vsim.vcpu.walk import BOOT_PT_EPT_LEVELS

STOP_DONE = 0
STOP_EPT_VIOLATION = 1

# counters[] slots
C_ACCESSES, C_TLB_HITS, C_WALKS, C_WALK_REFS = 0, 1, 2, 3
_HASH_MUL = np.int64(-7046029254386353131)  # 0x9E3779B97F4A7C15 as a signed 64-bit constant


@njit(cache=True, inline="always")
def _home(key, hmask):  # type: ignore[no-untyped-def]
    return ((key * _HASH_MUL) >> 20) & hmask


@njit(cache=True)
def _find(ht, keys, c, key, hmask):  # type: ignore[no-untyped-def]
    i = _home(key, hmask)
    while True:
        s = ht[c, i]
        if s == 0:
            return -1
        if keys[c, s - 1] == key:
            return s - 1
        i = (i + 1) & hmask


@njit(cache=True)
def _ht_insert(ht, c, key, slot, hmask):  # type: ignore[no-untyped-def]
    i = _home(key, hmask)
    while ht[c, i] != 0:
        i = (i + 1) & hmask
    ht[c, i] = slot + 1


@njit(cache=True)
def _ht_delete(ht, keys, c, key, hmask):  # type: ignore[no-untyped-def]
    i = _home(key, hmask)
    while keys[c, ht[c, i] - 1] != key:
        i = (i + 1) & hmask
    # Backward-shift deletion keeps every probe chain unbroken without tombstones.
    j = i
    while True:
        j = (j + 1) & hmask
        s = ht[c, j]
        if s == 0:
            break
        k = _home(keys[c, s - 1], hmask)
        stays = i < k <= j if i <= j else k > i or k <= j
        if not stays:
            ht[c, i] = s
            i = j
    ht[c, i] = 0


@njit(cache=True)
def _unlink(prv, nxt, lru, c, s):  # type: ignore[no-untyped-def]
    p = prv[c, s]
    n = nxt[c, s]
    if p >= 0:
        nxt[c, p] = n
    else:
        lru[c, 0] = n
    if n >= 0:
        prv[c, n] = p
    else:
        lru[c, 1] = p


@njit(cache=True)
def _push_front(prv, nxt, lru, c, s):  # type: ignore[no-untyped-def]
    h = lru[c, 0]
    prv[c, s] = -1
    nxt[c, s] = h
    if h >= 0:
        prv[c, h] = s
    else:
        lru[c, 1] = s
    lru[c, 0] = s


@njit(cache=True)
def _touch(prv, nxt, lru, c, s):  # type: ignore[no-untyped-def]
    if lru[c, 0] != s:
        _unlink(prv, nxt, lru, c, s)
        _push_front(prv, nxt, lru, c, s)


@njit(cache=True)
def _insert(keys, wr, prv, nxt, lru, ht, cap, hmask, c, key, writable):  # type: ignore[no-untyped-def]
    s = _find(ht, keys, c, key, hmask)
    if s >= 0:
        wr[c, s] = writable
        _touch(prv, nxt, lru, c, s)
        return
    if lru[c, 2] < cap[c]:
        s = lru[c, 2]
        lru[c, 2] += 1
    else:
        s = lru[c, 1]  # evict the least recently used
        _ht_delete(ht, keys, c, keys[c, s], hmask)
        _unlink(prv, nxt, lru, c, s)
    keys[c, s] = key
    wr[c, s] = writable
    _ht_insert(ht, c, key, s, hmask)
    _push_front(prv, nxt, lru, c, s)


@njit(cache=True)
def run_accesses(
    gfns,
    writes,
    start,
    stop,
    spt,
    root_table,
    guest_level,
    keys,
    wr,
    prv,
    nxt,
    lru,
    ht,
    cap,
    hmask,
    c_guest,
    c_hit,
    c_ref,
    counters,
):  # type: ignore[no-untyped-def]
    """Run accesses ``start..stop``; returns ``(index, elapsed_ns, status, fault_refs, present)``.

    ``status`` is ``STOP_DONE`` (all ran) or ``STOP_EPT_VIOLATION`` at ``index``, whose walk made
    ``fault_refs`` references and found an EPT leaf (``present``) or none. The faulting access is
    not counted; the caller accounts it when it takes the exit.
    """
    t = 0
    guest_refs = (5 - guest_level) * (BOOT_PT_EPT_LEVELS + 1)
    i = start
    while i < stop:
        g = gfns[i]
        w = writes[i]
        hit = False
        for c in range(3):
            key = g >> (9 * c)
            s = _find(ht, keys, c, key, hmask)
            if s >= 0:
                if w and wr[c, s] == 0:
                    break
                _touch(prv, nxt, lru, c, s)
                hit = True
                break
        if hit:
            t += c_guest + c_hit
            counters[0] += 1
            counters[1] += 1
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
            if (e & PT_PRESENT_R) == 0:
                break
            if level == 1 or (e & PT_PAGE_SIZE) != 0:
                leaf = level
                break
            table = (e & PFN_MASK) >> 12
            level -= 1
        writable = (e & PT_WRITABLE) != 0
        if leaf == 0 or (w and not writable):
            return i, t, STOP_EPT_VIOLATION, refs, leaf != 0
        eff = min(guest_level, leaf) - 1
        _insert(keys, wr, prv, nxt, lru, ht, cap, hmask, eff, g >> (9 * eff), 1 if writable else 0)
        t += c_guest + refs * c_ref
        counters[0] += 1
        counters[2] += 1
        counters[3] += refs
        i += 1
    return i, t, STOP_DONE, 0, False
