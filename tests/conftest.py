"""Shared helpers: every simulated run in the tests has the invariant checker on."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from vsim.config import ScenarioConfig, load_config
from vsim.events.sink import EventSink
from vsim.mmu.mmu_page import ShadowPages
from vsim.mmu.mmu_page_view import KvmMmuPage
from vsim.mmu.pte_list import DescPool
from vsim.mmu.sp_pool import NO_STAT, SpPool
from vsim.runner import collect_stats
from vsim.stats import N_ARRAY_STATS
from vsim.vm import Vm


def make_config(*sets: str) -> ScenarioConfig:
    return load_config(None, ["sim.invariants=true", "events.level=off", *sets])


def make_shadow_page(
    level: int, gfn: int = 1, direct: bool = False, access: int = 7, quadrant: int = 0, has_4_byte_gpte: bool = False
) -> KvmMmuPage:
    """One shadow page of the given role, in arrays of its own."""
    pool = SpPool(np.zeros(N_ARRAY_STATS, dtype=np.int64), 0, 0, 4)
    pages = ShadowPages(pool, DescPool(), indirect=not direct)
    table = pool.alloc(level, gfn, NO_STAT)
    pages.init_page(table, (level, direct, access, quadrant, has_4_byte_gpte), 0)
    return KvmMmuPage(pages, table)


def simulate(*sets: str, level: str = "off") -> tuple[Vm, dict[str, Any], EventSink]:
    """Run a scenario in memory; returns the VM, its stats.json dict and the sink (records kept)."""
    cfg = make_config(*sets, f"events.level={level}")
    sink = EventSink(level, consumer=None)
    vm = Vm(cfg, sink)
    records: list = []
    sink._consumer = lambda batch: records.extend(batch.records())  # keep every record in memory
    end = vm.run()
    sink.kept = records  # type: ignore[attr-defined]
    stats = collect_stats(vm, end)
    assert stats["invariant_violations"] == [], stats["invariant_violations"][:3]
    return vm, stats, sink


@pytest.fixture
def run() -> Any:
    return simulate
