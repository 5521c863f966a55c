"""Reading event logs back: load(), truncated logs, schema and record errors, and the CLI's errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import main_in_process

from vsim.config import load_config
from vsim.events.reader import EventLogError, Selection, iter_events, load
from vsim.runner import run_scenario

SETS = ["vm.vcpus=3", "workload.per_vcpu_memory=128KiB", "workload.overlap=true", "sim.invariants=true"]


@pytest.fixture(scope="module")
def run_all(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "all"
    run_scenario(load_config(None, [*SETS, "events.level=all"]), out)
    return out


def vsim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsim", *args], capture_output=True, text=True)


def test_load_gives_every_record_as_columns(run_all: Path) -> None:
    lines = (run_all / "events.jsonl").read_text().splitlines()[1:]
    arr = load(run_all, frame=False)
    assert len(arr) == len(lines)
    first = json.loads(lines[0])
    assert arr[0]["event"] == first["event"] and arr[0]["t_ns"] == first["t_ns"]
    faults = arr[arr["event"] == "kvm_page_fault"]
    assert (faults["gpa"] > 0).all() and (faults["wait_ns"] == -1).all()
    stats = json.loads((run_all / "stats.json").read_text())
    assert len(faults) == stats["vcpu_total"]["pf_taken"]


def test_truncated_last_line_yields_everything_before(run_all: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    shutil.copytree(run_all, cut)
    text = (cut / "events.jsonl").read_text()
    (cut / "events.jsonl").write_text(text[: len(text) - 20])  # cut inside the last record
    warnings: list[str] = []
    got = list(iter_events(cut, warn=warnings.append))
    assert len(got) == len(text.splitlines()) - 2  # the header and the damaged record
    assert len(warnings) == 1 and "truncated last line" in warnings[0]
    p = vsim("events", str(cut), "summary")
    assert p.returncode == 0 and "vsim: warning:" in p.stderr and "truncated" in p.stderr


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda h, b: ('{"event": "vsim_log_header", "schema_version": 99}\n', b), "schema version 99"),
        (lambda h, b: ("", b), "not a vsim event log"),
        (lambda h, b: (h, b + '{"event": "kvm_bogus", "t_ns": 1, "vcpu": 0}\n'), "unknown event kind 'kvm_bogus'"),
        (
            lambda h, b: (h, b + '{"event": "kvm_entry", "t_ns": 1, "vcpu": 0, "exit_id": 1, "x": 2}\n'),
            "kvm_entry: unknown field 'x'",
        ),
        # Issue 15 item 6: a malformed line in the middle, not only at the end, names its line.
        (lambda h, b: (h, re.sub(r'"t_ns": (\d+)', r'"t_ns": "\1"', b, count=1)), ":2: .*'t_ns' is str"),
        (
            lambda h, b: (h, b + '{"event": "kvm_entry", "t_ns": 1, "vcpu": true, "exit_id": 1}\n' + b),
            "'vcpu' is bool, not int",
        ),  # fmt: skip
        (lambda h, b: (h, b.replace("kvm_", "kvm\udcff", 1)), ":2: not UTF-8 text"),  # one byte 0xff
    ],
)
def test_bad_logs_are_one_line_errors(  # type: ignore[no-untyped-def]
    run_all: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], mutate, expect: str
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(run_all, bad)
    head, _, body = (bad / "events.jsonl").read_text().partition("\n")
    h, b = mutate(head + "\n", body)
    (bad / "events.jsonl").write_bytes((h + b).encode("utf-8", "surrogateescape"))
    with pytest.raises(EventLogError, match=expect):
        list(iter_events(bad))
    code, err = main_in_process(capsys, ["events", str(bad), "summary"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(expect, err), err


def test_cli_argument_errors(run_all: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["events", str(tmp_path / "nope"), "summary"], "no such run directory"),
        (["events", str(run_all), "filter", "--kind", "kvm_bogus"], "unknown event kind 'kvm_bogus'"),
        (["events", str(run_all), "filter", "--gfn", "zz"], "--gfn zz"),
        (["events", str(run_all), "summary", "--from", "3ms", "--to", "1ms"], "--to must be after --from"),
        (["events", str(run_all), "latency", "--from", "1 year"], "--from/--to"),
        (["report", str(tmp_path)], "no stats.json"),
    ]
    p = vsim(*cases[0][0])  # one end to end; the rest in this process (an exception would fail the test)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and cases[0][1] in p.stderr, p.stderr
    for args, expect in cases[1:]:
        code, err = main_in_process(capsys, args)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and expect in err, (args, err)


def test_selection_rejects_unknown_kind() -> None:
    with pytest.raises(EventLogError, match="unknown event kind"):
        Selection(kinds=frozenset({"nope"}))


def test_shadow_paging_guest_virtual_addresses_load_as_unsigned(tmp_path: Path) -> None:
    """A shadow-paging guest's kernel addresses (0xffff8880... and up) are at or above 2**63: the
    address column is unsigned, and a kind without the field reads 2**64 - 1 there."""
    from vsim.config import load_config
    from vsim.events import load
    from vsim.runner import run_scenario

    sets = ["mmu.mode=shadow", "vm.vcpus=1", "workload.per_vcpu_memory=2MiB", "guest.process_memory=256KiB",
            "events.level=faults"]  # fmt: skip
    run_scenario(load_config(None, sets), tmp_path / "r")
    arr = load(tmp_path / "r", frame=False)
    faults = arr[arr["event"] == "kvm_page_fault"]
    assert arr["gpa"].dtype == np.uint64 and (faults["gpa"] >= 1 << 63).any()
    lines = [json.loads(x) for x in (tmp_path / "r" / "events.jsonl").read_text().splitlines()]
    assert [int(x) for x in faults["gpa"]] == [e["gpa"] for e in lines if e["event"] == "kvm_page_fault"]
    assert (arr[arr["event"] == "vsim_page_fault_ret"]["gpa"] == (1 << 64) - 1).all()
