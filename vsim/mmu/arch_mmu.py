"""``kvm->arch``'s MMU state as one handle for compiled code.

The page-table pool (its ``PoolRef``), the shadow pages (``Sps``) and the pte_list descriptors (``Descs``)
are bundles of arrays that their owners replace when they grow. Passing them to a compiled
function costs the dispatcher a type check per array on every call (about 8 µs for the three);
``ArchMmu`` is a numba StructRef that holds the three bundles and unboxes as one object (about
1 µs). It holds the same arrays, not copies: ``ArchMmuHandle.sync`` points it at the bundles again
after any of them grew.
"""

from __future__ import annotations

from typing import Any

from numba import njit, types
from numba.experimental import structref

from vsim.mmu.mmu_page import Sps
from vsim.mmu.pte_list import Descs
from vsim.mmu.sp_pool import PoolRef


@structref.register
class ArchMmuType(types.StructRef):
    def preprocess_fields(self, fields: Any) -> tuple[tuple[str, Any], ...]:
        return tuple((name, types.unliteral(t)) for name, t in fields)


class ArchMmu(structref.StructRefProxy):
    """The handle: fields ``p`` (``Pool``), ``s`` (``Sps``) and ``d`` (``Descs``)."""

    def __new__(cls, p: PoolRef, s: Sps, d: Descs) -> ArchMmu:
        return structref.StructRefProxy.__new__(cls, p, s, d)  # type: ignore[no-any-return]


structref.define_proxy(ArchMmu, ArchMmuType, ["p", "s", "d"])


@njit(cache=True)
def _set(h: ArchMmu, p: PoolRef, s: Sps, d: Descs) -> None:
    h.p = p
    h.s = s
    h.d = d


class ArchMmuHandle:
    """An ``ArchMmu`` kept pointing at its owners' current bundles."""

    def __init__(self, owner: Any) -> None:
        self._owner = owner
        self._seen = self._bundles()
        self.h = ArchMmu(*self._seen)

    def _bundles(self) -> tuple[PoolRef, Sps, Descs]:
        o = self._owner
        return o.pool.ref, o.pages.s, o.descs.d

    def sync(self) -> ArchMmu:
        """The handle, pointed at the bundles again if any of them was replaced."""
        now = self._bundles()
        if any(a is not b for a, b in zip(now, self._seen, strict=True)):
            _set(self.h, *now)
            self._seen = now
        return self.h
