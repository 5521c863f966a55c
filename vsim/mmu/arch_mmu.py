"""``kvm->arch``'s MMU state as one handle for compiled code.

The page-table pool, the shadow pages and the pte_list descriptors are bundles of arrays that
their owners replace when they grow; each owner keeps a StructRef of its bundle (``PoolRef``,
``SpsRef``, ``DescsRef``), which compiled functions pass to each other as one pointer (a
NamedTuple of arrays would be reference-counted array by array on every call). Passing them to a compiled
function costs the dispatcher a type check per array on every call (about 8 µs for the three);
``ArchMmu`` is a numba StructRef that holds the three bundles and unboxes as one object (about
1 µs). It holds the same arrays, not copies: ``ArchMmuHandle.sync`` points it at the bundles again
after any of them grew. The TDP MMU has no shadow pages: its handle holds empty ones (``NO_SPS``,
``NO_DESCS``), so the vCPU group's loop takes one handle for both direct MMUs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit
from numba.experimental import structref

from vsim.mmu.mmu_page import SPS_DTYPES, SPS_REF_TYPE, Sps, SpsRef, new_sps_ref
from vsim.mmu.pte_list import DESCS_DTYPES, DESCS_REF_TYPE, Descs, DescsRef, new_descs_ref
from vsim.mmu.sp_pool import POOL_REF_TYPE, BundleRefType, PoolRef


@structref.register
class ArchMmuType(BundleRefType):
    """The numba type of ``ArchMmu``."""


class ArchMmu(structref.StructRefProxy):
    """The handle: fields ``p`` (``PoolRef``), ``s`` (``SpsRef``) and ``d`` (``DescsRef``), made by
    ``new_arch_mmu`` (cached, unlike numba's generated constructor)."""

    p: PoolRef
    s: SpsRef
    d: DescsRef


structref.define_boxing(ArchMmuType, ArchMmu)
# A VM without shadow pages (the TDP MMU) has an empty hash and no descriptors: empty arrays.
_NO_SPS = Sps(**{f: np.zeros((0,) * nd if f != "hdr" else 4, dtype=dt) for f, (dt, nd) in SPS_DTYPES.items()})
_NO_DESCS = Descs(**{f: np.zeros((0,) * nd if f != "hdr" else 2, dtype=dt) for f, (dt, nd) in DESCS_DTYPES.items()})
NO_SPS = new_sps_ref(*_NO_SPS)
NO_DESCS = new_descs_ref(*_NO_DESCS)
ARCH_MMU_TYPE = ArchMmuType([("p", POOL_REF_TYPE), ("s", SPS_REF_TYPE), ("d", DESCS_REF_TYPE)])


@njit(cache=True)
def new_arch_mmu(p: PoolRef, s: SpsRef, d: DescsRef) -> ArchMmu:
    h: ArchMmu = structref.new(ARCH_MMU_TYPE)  # type: ignore[call-arg]  # an intrinsic: numba passes the typing context
    h.p = p
    h.s = s
    h.d = d
    return h


@njit(cache=True)
def _set(h: ArchMmu, p: PoolRef, s: SpsRef, d: DescsRef) -> None:
    h.p = p
    h.s = s
    h.d = d


class ArchMmuHandle:
    """An ``ArchMmu`` kept pointing at its owner's current bundles (``owner.arch_bundles()``)."""

    def __init__(self, owner: Any) -> None:
        self._owner = owner
        self._seen = owner.arch_bundles()
        self.h = new_arch_mmu(*self._seen)

    def sync(self) -> ArchMmu:
        """The handle, pointed at the bundles again if any of them was replaced."""
        now = self._owner.arch_bundles()
        if any(a is not b for a, b in zip(now, self._seen, strict=True)):
            _set(self.h, *now)
            self._seen = now
        return self.h
