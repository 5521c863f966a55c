"""``kvm->arch``'s MMU state as one handle for compiled code.

The page-table pool (its ``PoolRef``), the shadow pages (``Sps``) and the pte_list descriptors (``Descs``)
are bundles of arrays that their owners replace when they grow. Passing them to a compiled
function costs the dispatcher a type check per array on every call (about 8 µs for the three);
``ArchMmu`` is a numba StructRef that holds the three bundles and unboxes as one object (about
1 µs). It holds the same arrays, not copies: ``ArchMmuHandle.sync`` points it at the bundles again
after any of them grew. The TDP MMU has no shadow pages: its handle holds empty ones (``NO_SPS``,
``NO_DESCS``), so the vCPU group's loop takes one handle for both direct MMUs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, typeof, types
from numba.experimental import structref

from vsim.mmu.mmu_page import Sps
from vsim.mmu.pte_list import Descs
from vsim.mmu.sp_pool import POOL_REF_TYPE, PoolRef


@structref.register
class ArchMmuType(types.StructRef):
    def preprocess_fields(self, fields: Any) -> tuple[tuple[str, Any], ...]:
        return tuple((name, types.unliteral(t)) for name, t in fields)


class ArchMmu(structref.StructRefProxy):  # type: ignore[misc]
    """The handle: fields ``p`` (``PoolRef``), ``s`` (``Sps``) and ``d`` (``Descs``), made by
    ``new_arch_mmu`` (cached, unlike numba's generated constructor)."""


structref.define_boxing(ArchMmuType, ArchMmu)


def _bundle_type(cls: Any, shapes: dict[str, tuple[Any, int]]) -> Any:
    """The numba type of a NamedTuple of arrays with the given dtypes and dimensions."""
    return typeof(cls(**{f: np.zeros((1,) * nd, dtype=dt) for f, (dt, nd) in shapes.items()}))


_SPS_DTYPES = {f: (np.uint64, 2) if f == "unsync_bits" else (np.int32, 2) if f == "leaf_rmap"
               else (np.int64, 2) if f == "gfns" else (np.int64, 1) for f in Sps._fields}  # fmt: skip
_DESCS_DTYPES = {f: (np.int64, 2) if f == "sptes" else (np.int64, 1) for f in Descs._fields}
_SPS_TYPE = _bundle_type(Sps, _SPS_DTYPES)
_DESCS_TYPE = _bundle_type(Descs, _DESCS_DTYPES)
# A VM without shadow pages (the TDP MMU) has an empty hash and no descriptors: empty arrays.
NO_SPS = Sps(**{f: np.zeros((0,) * nd if f != "hdr" else 4, dtype=dt) for f, (dt, nd) in _SPS_DTYPES.items()})
NO_DESCS = Descs(**{f: np.zeros((0,) * nd if f != "hdr" else 2, dtype=dt) for f, (dt, nd) in _DESCS_DTYPES.items()})
ARCH_MMU_TYPE = ArchMmuType([("p", POOL_REF_TYPE), ("s", _SPS_TYPE), ("d", _DESCS_TYPE)])


@njit(cache=True)
def new_arch_mmu(p: PoolRef, s: Sps, d: Descs) -> ArchMmu:
    h = structref.new(ARCH_MMU_TYPE)
    h.p = p
    h.s = s
    h.d = d
    return h


@njit(cache=True)
def _set(h: ArchMmu, p: PoolRef, s: Sps, d: Descs) -> None:
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
