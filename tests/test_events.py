"""The event log: structlog-identical lines, levels, and the zero-cost off switch."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import simulate

from vsim.events.kinds import KINDS
from vsim.events.sink import EventSink
from vsim.events.writer import JsonlWriter, record_to_dict, render_records, render_structlog


def test_fast_rendering_equals_structlog_for_every_kind() -> None:
    for n, kind in enumerate(KINDS):
        fields = [f"v{i}" if f in kind.str_fields else (1 << 40) + i for i, f in enumerate(kind.fields)]
        rec = (kind.name, 123456789 + n, n % 3 - 1, *fields)
        assert render_records([rec]) == render_structlog(record_to_dict(rec))


def test_levels_select_events() -> None:
    sets = ("vm.vcpus=2", "workload.per_vcpu_memory=64KiB")
    _, _, off = simulate(*sets, level="off")
    _, s_f, faults = simulate(*sets, level="faults")
    _, _, all_ = simulate(*sets, level="all")
    assert off.kept == []
    names_f = {r[0] for r in faults.kept}
    assert names_f == {"kvm_page_fault", "vsim_page_fault_ret"}
    names_a = {r[0] for r in all_.kept}
    assert {"kvm_exit", "kvm_entry", "kvm_tdp_mmu_spte_changed", "vsim_mmu_lock_acquire"} <= names_a
    # One kvm_page_fault per pf_taken, in non-decreasing simulated time.
    assert sum(r[0] == "kvm_page_fault" for r in faults.kept) == s_f["vcpu_total"]["pf_taken"]
    ts = [r[1] for r in all_.kept]
    assert ts == sorted(ts)
    # Every spte change the log shows for a leaf is one page in the stats.
    leaf_installs = [r for r in all_.kept if r[0] == "kvm_tdp_mmu_spte_changed" and r[6] == 0 and r[5] == 1]
    assert len(leaf_installs) == s_f["vm"]["pages_4k"]


def test_writer_streams_and_renames_atomically(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("previous run\n")
    w = JsonlWriter(path)
    sink = EventSink("all", consumer=w, limit=4)
    for i in range(10):
        sink.emit("kvm_entry", i, 0, i)
    assert path.read_text() == "previous run\n"  # nothing replaced until close
    sink.flush()
    w.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"event": "vsim_log_header", "schema_version": 1}
    assert [json.loads(x)["t_ns"] for x in lines[1:]] == list(range(10))


def test_writer_abort_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("previous run\n")
    w = JsonlWriter(path)
    w([("kvm_entry", 1, 0, 1)])
    w.abort()
    assert path.read_text() == "previous run\n"
    assert list(tmp_path.iterdir()) == [path]


def test_docs_describe_every_kind_and_field() -> None:
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "events.md").read_text()
    sections = re.split(r"^### `(\w+)`\n", text, flags=re.M)[1:]
    documented = {name: body for name, body in zip(sections[::2], sections[1::2], strict=True)}
    assert set(documented) == {k.name for k in KINDS}
    for kind in KINDS:
        body = documented[kind.name]
        assert f"Level `{kind.level}`" in body, kind.name
        fields = re.findall(r"^\| `(\w+)` \|", body, flags=re.M)
        assert fields == list(kind.fields), kind.name
