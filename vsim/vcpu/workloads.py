"""Guest workloads: what each vCPU's guest code touches, as chunks of (gfn, is_write) arrays.

* ``memstress``: the KVM selftests' guest loop (``tools/testing/selftests/kvm/lib/memstress.c``,
  cost-anchors §7.1): one 8-byte access per 4K page of the vCPU's region per pass, in page order or
  at random pages, writing with probability ``write_percent``; ``GUEST_SYNC`` (an exit to
  userspace) ends every pass. The region is the vCPU's own slice, or the whole test region with
  ``overlap`` (``-o``).
* ``uniform`` and ``zipf``: ``accesses`` random page accesses over the same region, uniform or with
  page rank r weighted r^-s.

Chunks never cross a pass boundary and are at most ``batch_accesses`` long. They are generated the
same way in batched and reference modes, so both see identical streams.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from vsim.config.schema import WorkloadConfig

Chunk = tuple[np.ndarray, np.ndarray, bool]  # gfns (int64), writes (bool), ends a pass


class Workload:
    """One vCPU's access stream over ``[region_base_gfn, region_base_gfn + region_pages)``."""

    def __init__(
        self, cfg: WorkloadConfig, region_base_gfn: int, region_pages: int, chunk: int, rng: np.random.Generator
    ) -> None:
        self.cfg = cfg
        self.base = region_base_gfn
        self.pages = region_pages
        self.chunk = chunk
        self.rng = rng
        self._zipf_cdf: np.ndarray | None = None
        # memstress: a write percent per pass, set by a selftest that alternates writes and reads.
        self.pass_write_percent: list[int] | None = None

    def chunks(self) -> Iterator[Chunk]:
        cfg = self.cfg
        if cfg.kind == "memstress":
            for p in range(cfg.passes):
                wp = cfg.write_percent if self.pass_write_percent is None else self.pass_write_percent[p]
                yield from self._stretch(self.pages, pass_end=True, write_percent=wp)
        else:
            yield from self._stretch(cfg.accesses, pass_end=False, write_percent=cfg.write_percent)

    def _stretch(self, n: int, pass_end: bool, write_percent: int) -> Iterator[Chunk]:
        done = 0
        while done < n:
            m = min(self.chunk, n - done)
            pages = self._pages(done, m)
            yield pages + self.base, self._writes(m, write_percent), pass_end and done + m == n
            done += m

    def _pages(self, offset: int, m: int) -> np.ndarray:
        cfg = self.cfg
        if cfg.kind == "memstress" and cfg.access == "sequential":
            return np.arange(offset, offset + m, dtype=np.int64)
        if cfg.kind == "zipf":
            if self._zipf_cdf is None:
                w = np.arange(1, self.pages + 1, dtype=np.float64) ** -cfg.zipf_exponent
                self._zipf_cdf = np.cumsum(w) / w.sum()
            u = self.rng.random(m)
            return np.minimum(np.searchsorted(self._zipf_cdf, u, side="right"), self.pages - 1).astype(np.int64)
        return self.rng.integers(0, self.pages, size=m, dtype=np.int64)

    def _writes(self, m: int, wp: int) -> np.ndarray:
        if wp >= 100:
            return np.ones(m, dtype=np.bool_)
        if wp <= 0:
            return np.zeros(m, dtype=np.bool_)
        return self.rng.integers(0, 100, size=m) < wp


def vcpu_region(cfg: WorkloadConfig, vcpu_id: int, nvcpus: int, base_gfn: int) -> tuple[int, int]:
    """``(first gfn, pages)`` of a vCPU's region: its slice, or all of it with ``overlap``."""
    per = cfg.per_vcpu_memory // 4096
    if cfg.overlap:
        return base_gfn, per * nvcpus
    return base_gfn + vcpu_id * per, per
