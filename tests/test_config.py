"""Config parsing: units, overrides, defaults and one-line errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsim.config import ConfigError, ScenarioConfig, dump_config, load_config
from vsim.units import format_duration, format_size, parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent


def test_units_parse_exactly() -> None:
    assert parse_size("64MiB") == 64 << 20
    assert parse_size("2GiB") == 2 << 30
    assert parse_duration("2.5us") == 2500
    assert parse_duration("40ms") == 40_000_000
    assert parse_duration(7) == 7
    assert format_size(64 << 20) == "64MiB" and format_duration(2500) == "2500ns"
    for bad in ("2.5ns", "1 fortnight", "-3us", True):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError, match="whole number of bytes"):
        parse_size("0.001KiB")


def test_quickstart_file_is_the_builtin_default() -> None:
    assert load_config(ROOT / "configs" / "quickstart.toml") == ScenarioConfig()


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["vm.vcpus=3", "costs.vmexit=2.5us", "workload.kind=zipf"])
    p = tmp_path / "c.toml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg
    assert cfg.costs.vmexit == 2500


@pytest.mark.parametrize(
    ("text", "sets", "expect"),
    [
        ("[vm]\nvcpus = 0\n", [], "c.toml:2: vm.vcpus: Input should be greater than or equal to 1"),
        ("[vm]\nvcpu = 4\n", [], "c.toml:2: vm.vcpu: unknown key; allowed here: absent_memslots, backing_page_size"),
        ("[vm]\nvcpus = 'many'\n", [], "c.toml:2: vm.vcpus:"),
        ("[mmu]\nmode = 'ept_off'\n", [], "c.toml:2: mmu.mode: must be one of 'tdp_mmu'"),
        (
            "[mmu]\nmode = 'shadow'\n[guest]\npaging = 'paging32'\n",
            [],
            "c.toml:4: guest.paging: paging32 addresses at most 4GiB of physical memory",
        ),
        ("[guest]\npaging = 'pae'\n", [], "c.toml:2: guest.paging: 'pae' needs mmu.mode = shadow"),
        ("[mmu]\nmode = 'shadow'\n[dirty_log]\npml = true\n", [], "c.toml:4: dirty_log.pml: PML logs guest-physical"),
        (
            "[mmu]\nmode = 'shadow'\n[guest]\nprocesses = 64\nprocess_memory = '16MiB'\n",
            [],
            "c.toml:5: guest.process_memory: 64 process(es) of 4096 pages need",
        ),
        ("[costs]\nvmexit = '3 parsecs'\n", [], "c.toml:2: costs.vmexit: '3 parsecs' is not a duration"),
        ("[bogus]\nx = 1\n", [], "c.toml:1: bogus: unknown key"),
        ("", ["workload.write_percent=101"], "--set: workload.write_percent: Input should be less than or equal"),
        ("", ["vm.memslots=3"], "--set: vm.memslots: 3 does not divide"),
        ("", ["novalue"], "--set novalue: expected dotted.key=value"),
        ("", ["costs.ipi_latency=0ns"], "--set: costs.ipi_latency: Input should be greater than or equal to 1"),
        ("[vm\n", [], "c.toml: not valid TOML"),
    ],
)
def test_errors_are_one_line_naming_the_key(tmp_path: Path, text: str, sets: list[str], expect: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p, sets)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.replace(str(tmp_path) + "/", "").startswith(expect), msg


@pytest.mark.parametrize(
    ("text", "sets", "expect"),
    [
        ("", ["vm.vcpus=true"], "--set: vm.vcpus: Input should be a valid integer (got True)"),
        ("", ["host_mm.invalidations=true"], "--set: host_mm.invalidations: Input should be a valid integer"),
        ("", ["seed=1.0"], "--set: seed: Input should be a valid integer (got 1.0)"),
        ("", ["vm.vcpus='4'"], "--set: vm.vcpus: Input should be a valid integer (got '4')"),
        ("[dirty_log]\ninitially_set = 'yes'\n", [], "c.toml:2: dirty_log.initially_set: Input should be a valid bool"),
        ("[dirty_log]\ninitially_set = 0\n", [], "c.toml:2: dirty_log.initially_set: Input should be a valid bool"),
        ("seed = '1'\n", [], "c.toml:1: seed: Input should be a valid integer"),
        ("", ["costs.vmexit=true"], "--set: costs.vmexit: expected a duration such as '2.5us', got a boolean"),
    ],
)
def test_values_of_the_wrong_type_are_refused_not_coerced(tmp_path: Path, text: str, sets: list[str],
                                                           expect: str) -> None:  # fmt: skip
    """Issue 15 item 7: no bool-to-int, string-to-int or float-to-int coercion (strict validation)."""
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p, sets)
    assert str(e.value).replace(str(tmp_path) + "/", "").startswith(expect), str(e.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("/nonexistent/x.toml")


def test_every_shipped_config_validates() -> None:
    """Each scenario in configs/ loads with every default filled in (its [sweep] table aside)."""
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.toml"))
    assert len(files) >= 9
    for path in files:
        load_config(path, [])


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        (["workload.per_vcpu_memory=300TiB"], "--set: workload.per_vcpu_memory: "),
        (["vm.vcpus=4096", "workload.per_vcpu_memory=2TiB"], "--set: workload.per_vcpu_memory: "),
        (["vm.base_gpa=4096TiB"], "--set: vm.base_gpa: "),
    ],
)
def test_a_region_past_the_guest_physical_space_names_the_key_the_user_set(sets: list[str], key: str) -> None:
    """Issue 15: an oversized region used to be reported as ``vm.base_gpa``, a key not set."""
    with pytest.raises(ConfigError) as e:
        load_config(None, sets)
    msg = str(e.value)
    assert msg.startswith(key) and "vm.vcpus × workload.per_vcpu_memory = " in msg and "4PiB" in msg


@pytest.mark.parametrize(
    ("second", "expect"),
    [
        ('op = "bogus"\nslot = 1\n', ":11: vmm.ops.1.op: must be one of"),  # a field of the entry: its own line
        ('op = "create"\nslot = 7\n', ":9: vmm.ops.1: slot 7 is not a memslot index (0..1)"),  # the entry's header
    ],
)
def test_errors_in_an_array_of_tables_name_the_entrys_own_line(tmp_path: Path, second: str, expect: str) -> None:
    """Issue 15: every [[vmm.ops]] error used to point at the same line."""
    cfg = tmp_path / "ops.toml"
    cfg.write_text('[vm]\nmemslots = 2\nabsent_memslots = [1]\n\n[[vmm.ops]]\nat = "10us"\nop = "flags"\nslot = 0\n'
                   f'[[vmm.ops]]\nat = "20us"\n{second}')  # fmt: skip
    with pytest.raises(ConfigError) as e:
        load_config(cfg, [])
    assert expect in str(e.value) and str(e.value).startswith(str(cfg))
