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
    # Strings are JSON-escaped, negative and 19-digit integers rendered whole.
    rec = ("vsim_invariant_violation", 9_223_372_036_854_775_807, -1, 'stale "tlb"', "gfn\\1\n é")
    assert render_records([rec]) == render_structlog(record_to_dict(rec))
    for gva in (0xFFFF_8880_0000_1000, 2**64 - 1, 2**63):  # a 64-bit guest's kernel addresses (shadow #PF)
        rec = ("kvm_exit", 1, 0, 2, "EXCEPTION_NMI", gva)
        assert render_records([rec]) == render_structlog(record_to_dict(rec))


def test_sink_rows_decode_to_the_records_and_sort_stably() -> None:
    """Records emitted one by one and as rows come out in (time, actor) order, simultaneous
    records of one actor in emission order."""
    got: list = []
    sink = EventSink("faults", consumer=lambda b: got.extend(b.records()))
    sink.emit("kvm_page_fault", 20, 1, 1, 4096, 2)
    codec = sink.codec
    rows = codec.encode([("vsim_page_fault_ret", 20, 1, 1, "FIXED", 1), ("kvm_page_fault", 10, 2, 1, 8192, 2)])
    sink.emit_rows(rows[:, :6])
    sink.emit("vsim_page_fault_ret", 10, 2, 1, "RETRY", 1)
    sink.flush()
    assert got == [("kvm_page_fault", 10, 2, 1, 8192, 2), ("vsim_page_fault_ret", 10, 2, 1, "RETRY", 1),
                   ("kvm_page_fault", 20, 1, 1, 4096, 2), ("vsim_page_fault_ret", 20, 1, 1, "FIXED", 1)]  # fmt: skip


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
