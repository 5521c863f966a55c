"""Shared helpers: every simulated run in the tests has the invariant checker on."""

from __future__ import annotations

from typing import Any

import pytest

from vsim.config import ScenarioConfig, load_config
from vsim.events.sink import EventSink
from vsim.runner import collect_stats
from vsim.vm import Vm


def make_config(*sets: str) -> ScenarioConfig:
    return load_config(None, ["sim.invariants=true", "events.level=off", *sets])


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
