"""``pte_list``: KVM's list of SPTE pointers (spec §3), in arrays, for rmap heads and ``parent_ptes``.

A head (``struct kvm_rmap_head``) is one int64: 0 when empty, ``sptep + 1`` for a single entry, and
``-(desc + 1)`` for a chain of ``pte_list_desc`` descriptors of up to ``PTE_LIST_EXT`` (14) entries.
An ``sptep`` is ``table * 512 + index``, where KVM holds the SPTE's address. New entries go into the
head descriptor; a full head gets a new descriptor in front of it, so the descriptors behind the
head are always full. A removal moves the head descriptor's last entry into the hole, and an empty
head descriptor is freed (the list stays a chain even with one entry left, as in KVM). Iteration
visits the head descriptor first, each in index order, so walks meet SPTEs in KVM's order.
``pte_list_add`` returns the count before the add (``max_mmu_rmap_size`` and the
``RMAP_RECYCLE_THRESHOLD`` test use it).

Descriptors come from one pool (``Descs``, owned by ``DescPool``), like KVM's
``mmu_pte_list_desc_cache``. The functions are ``register_jitable``: plain Python on the arrays, and
the same source in compiled code.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from numba import njit, typeof
from numba.experimental import structref
from numba.extending import register_jitable

from vsim.mmu.sp_pool import BundleRefType

PTE_LIST_EXT = 14
D_NDESC, D_NFREE = 0, 1  # the pool's header: descriptors handed out, entries on the free stack


class Descs(NamedTuple):
    """The descriptor pool: ``sptes[d, :spte_count[d]]`` are descriptor ``d``'s entries; ``more[d]`` is
    the next descriptor (-1 at the end)."""

    sptes: np.ndarray  # (descs, PTE_LIST_EXT) int64
    spte_count: np.ndarray  # (descs,) int64: pte_list_desc.spte_count
    more: np.ndarray  # (descs,) int64
    free: np.ndarray  # (descs,) int64: freed descriptors, reused first
    hdr: np.ndarray  # (2,) int64


@structref.register
class DescsRefType(BundleRefType):
    """The numba type of ``DescsRef``."""


if TYPE_CHECKING:
    DescsRef = Descs  # to the type checker the handle is the bundle it holds: the same fields
else:

    class DescsRef(structref.StructRefProxy):
        """``Descs``'s arrays as one object for compiled code (``ArchMmu.d``), as ``SpsRef`` is for
        ``Sps``. Made by ``new_descs_ref``."""

    structref.define_boxing(DescsRefType, DescsRef)
DESCS_DTYPES = {f: (np.int64, 2) if f == "sptes" else (np.int64, 1) for f in Descs._fields}
DESCS_REF_TYPE = DescsRefType([(f, typeof(np.zeros((1,) * nd, dtype=dt))) for f, (dt, nd) in DESCS_DTYPES.items()])


@njit(cache=True)
def new_descs_ref(sptes: np.ndarray, spte_count: np.ndarray, more: np.ndarray, free: np.ndarray,
                  hdr: np.ndarray) -> DescsRef:  # fmt: skip
    r: DescsRef = structref.new(DESCS_REF_TYPE)  # type: ignore[call-arg]  # an intrinsic: numba passes the typing context
    r.sptes = sptes
    r.spte_count = spte_count
    r.more = more
    r.free = free
    r.hdr = hdr
    return r


@register_jitable
def _desc_alloc(d: Descs) -> int:
    """A descriptor from the pool (the caller reserved room: ``DescPool.reserve``)."""
    hdr = d.hdr
    if hdr[D_NFREE]:
        hdr[D_NFREE] -= 1
        return int(d.free[hdr[D_NFREE]])
    n = hdr[D_NDESC]
    hdr[D_NDESC] = n + 1
    return int(n)


@register_jitable
def _desc_free(d: Descs, desc: int) -> None:
    hdr = d.hdr
    d.free[hdr[D_NFREE]] = desc
    hdr[D_NFREE] += 1


@register_jitable
def pte_list_add(d: Descs, heads: np.ndarray, i: int, sptep: int) -> int:
    """``pte_list_add``: enter ``sptep`` on head ``heads[i]``; returns the count before."""
    v = heads[i]
    if v == 0:
        heads[i] = sptep + 1
        return 0
    if v > 0:  # the second entry: one descriptor holds both
        desc = _desc_alloc(d)
        d.sptes[desc, 0] = v - 1
        d.sptes[desc, 1] = sptep
        d.spte_count[desc] = 2
        d.more[desc] = -1
        heads[i] = -(desc + 1)
        return 1
    head = -v - 1
    n = d.spte_count[head]
    total = n
    nxt = d.more[head]
    while nxt >= 0:  # the descriptors behind the head are full (KVM keeps this count in tail_count)
        total += PTE_LIST_EXT
        nxt = d.more[nxt]
    if n == PTE_LIST_EXT:
        desc = _desc_alloc(d)
        d.more[desc] = head
        d.spte_count[desc] = 0
        heads[i] = -(desc + 1)
        head = desc
        n = 0
    d.sptes[head, n] = sptep
    d.spte_count[head] = n + 1
    return int(total)


@register_jitable
def pte_list_remove(d: Descs, heads: np.ndarray, i: int, sptep: int) -> bool:
    """``pte_list_remove``: take ``sptep`` off head ``heads[i]``; False if it was not there (KVM
    would BUG)."""
    v = heads[i]
    if v == 0:
        return False
    if v > 0:
        if v - 1 != sptep:
            return False
        heads[i] = 0
        return True
    head = -v - 1
    desc = head
    while desc >= 0:
        for k in range(d.spte_count[desc]):
            if d.sptes[desc, k] == sptep:
                last = d.spte_count[head] - 1
                d.sptes[desc, k] = d.sptes[head, last]  # the head's last entry fills the hole
                d.spte_count[head] = last
                if last == 0:
                    nxt = d.more[head]
                    heads[i] = 0 if nxt < 0 else -(nxt + 1)
                    _desc_free(d, head)
                return True
        desc = d.more[desc]
    return False


@register_jitable
def pte_list_count(d: Descs, heads: np.ndarray, i: int) -> int:
    """``pte_list_count``: the entries on head ``heads[i]``."""
    v = heads[i]
    if v >= 0:
        return 1 if v else 0
    n = 0
    desc = -v - 1
    while desc >= 0:
        n += d.spte_count[desc]
        desc = d.more[desc]
    return int(n)


def pte_list_entries(d: Descs, heads: np.ndarray, i: int) -> list[int]:
    """``for_each_rmap_spte``: the sptep of every entry, the head descriptor first."""
    v = int(heads[i])
    if v >= 0:
        return [v - 1] if v else []
    out: list[int] = []
    desc = -v - 1
    count, sptes, more = d.spte_count, d.sptes, d.more
    while desc >= 0:
        out.extend(sptes[desc, : count[desc]].tolist())
        desc = int(more[desc])
    return out


def iter_pte_list(d: Descs, heads: np.ndarray, i: int) -> Iterator[tuple[int, int]]:
    """The entries of head ``heads[i]`` as ``(table, index)``."""
    for sptep in pte_list_entries(d, heads, i):
        yield sptep >> 9, sptep & 511


class DescPool:
    """Owner of the descriptor pool's arrays (``Descs``). Arrays are replaced when they grow: read
    them through ``d`` each time."""

    def __init__(self, descs: int = 256) -> None:
        self._set(
            Descs(
                sptes=np.zeros((descs, PTE_LIST_EXT), dtype=np.int64),
                spte_count=np.zeros(descs, dtype=np.int64),
                more=np.full(descs, -1, dtype=np.int64),
                free=np.zeros(descs, dtype=np.int64),
                hdr=np.zeros(2, dtype=np.int64),
            )
        )

    def _set(self, d: Descs) -> None:
        self.d = d
        self.ref = new_descs_ref(*d)  # the same arrays, for compiled code

    def reserve(self, descs: int) -> None:
        """Room for ``descs`` more descriptors (before a compiled operation, which cannot grow)."""
        d = self.d
        room = int(d.hdr[D_NFREE]) + len(d.spte_count) - int(d.hdr[D_NDESC])
        if room >= descs:
            return
        add = max(len(d.spte_count), descs - room)

        def more(a: np.ndarray, fill: int = 0) -> np.ndarray:
            return np.concatenate([a, np.full((add,) + a.shape[1:], fill, dtype=a.dtype)])

        self._set(d._replace(sptes=more(d.sptes), spte_count=more(d.spte_count), more=more(d.more, -1),
                             free=more(d.free)))  # fmt: skip

    def add(self, heads: np.ndarray, i: int, table: int, idx: int) -> int:
        """``pte_list_add`` of ``(table, idx)``; the count before."""
        self.reserve(1)
        return int(pte_list_add(self.d, heads, i, table * 512 + idx))

    def remove(self, heads: np.ndarray, i: int, table: int, idx: int) -> None:
        """``pte_list_remove`` of ``(table, idx)``, which must be on the head."""
        if not pte_list_remove(self.d, heads, i, table * 512 + idx):
            raise KeyError((table, idx))

    def entries(self, heads: np.ndarray, i: int) -> list[tuple[int, int]]:
        return list(iter_pte_list(self.d, heads, i))

    @property
    def in_use(self) -> int:
        """Descriptors holding entries (for tests)."""
        return int(self.d.hdr[D_NDESC] - self.d.hdr[D_NFREE])
