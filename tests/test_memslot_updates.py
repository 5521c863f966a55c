"""Memslot updates under SRCU: generations per scheme, MMIO SPTEs, and the R1 race (spec §5, §6, §12)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import simulate

from vsim.config import load_config
from vsim.mmu.mmio import (
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    check_mmio_spte,
    get_mmio_spte_generation,
    get_mmio_spte_gfn,
    is_mmio_spte,
    make_mmio_spte,
)
from vsim.mmu.spte import SPTE_MMU_PRESENT

ROOT = Path(__file__).resolve().parent.parent
HOTPLUG = ["vm.vcpus=2", "vm.memslots=2", "vm.absent_memslots=[1]", "workload.per_vcpu_memory=256KiB",
           "workload.overlap=true", "workload.passes=3"]  # fmt: skip


def test_mmio_spte_encoding_and_generation_check() -> None:
    gen = (0x5A5 << 8) | 0xC3  # 19 bits: 8 low, 11 high
    spte = make_mmio_spte(0x12345, gen)
    assert is_mmio_spte(spte) and not spte & SPTE_MMU_PRESENT
    assert spte & 0b111 == 0b110  # EPT W|X without R: a misconfiguration
    assert get_mmio_spte_generation(spte) == gen and get_mmio_spte_gfn(spte) == 0x12345
    assert check_mmio_spte(gen, spte)
    assert not check_mmio_spte(gen + 1, spte)
    assert not check_mmio_spte(gen | KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS, spte)  # in progress: never valid
    assert check_mmio_spte(gen + (1 << 19), spte)  # only 19 bits are stored (hence the wrap zap)


@pytest.mark.parametrize(
    ("scheme", "spaces", "final"),
    [("in_progress_bit", 1, 2), ("double_increment", 1, 4), ("single_increment", 1, 2), ("in_progress_bit", 2, 4)],
)
def test_generation_per_scheme(scheme: str, spaces: int, final: int) -> None:
    # Two updates (CREATE, then FLAGS_ONLY): each is one swap.
    vm, stats, sink = simulate(*HOTPLUG, f"memslots.generation_scheme={scheme}", f"memslots.address_spaces={spaces}",
                               'vmm.ops=[{at="20us", op="create", slot=1}, {at="60us", op="flags", slot=0, '
                               'log_dirty=true}]', level="faults")  # fmt: skip
    assert stats["memslots_generation"] == final
    gens = [(r[4], r[5]) for r in sink.kept if r[0] == "vsim_memslots_generation"]
    assert len(gens) == 4  # published, settled; twice
    if scheme == "in_progress_bit":
        assert gens == [(0, 1), (spaces, 0), (spaces, 1), (2 * spaces, 0)]
    elif scheme == "double_increment":
        assert gens == [(1, 0), (2, 0), (3, 0), (4, 0)]
    else:
        assert gens == [(1, 0), (1, 0), (2, 0), (2, 0)]
    assert stats["vm"]["memslot_updates"] == 2
    slot0 = vm.memslots.gfn_to_memslot(vm.memslots.slots[0].base_gfn)
    assert slot0 is not None and slot0.flags & 1  # KVM_MEM_LOG_DIRTY_PAGES


def test_update_waits_for_vcpus_inside_an_exit() -> None:
    # With a 1 ns grace period, what the update waits for is the vCPUs still handling an exit.
    vm, stats, sink = simulate(*HOTPLUG, 'vmm.ops=[{at="20us", op="create", slot=1}]', "costs.srcu_expedited_gp=1ns",
                               level="faults")  # fmt: skip
    ((t_s, readers),) = [(r[1], r[3]) for r in sink.kept if r[0] == "vsim_synchronize_srcu"]
    ((t_e, grace),) = [(r[1], r[3]) for r in sink.kept if r[0] == "vsim_synchronize_srcu_done"]
    assert readers == 2 and t_e - t_s == grace > 1
    # It ends exactly when the last of those readers re-enters the guest.
    entries = [r[1] for r in sink.kept if r[0] == "vsim_page_fault_ret" and r[1] <= t_e]
    assert t_e >= max(entries)
    assert stats["latency_ns"]["srcu_grace_period"]["max"] == grace
    (done,) = [r for r in sink.kept if r[0] == "vsim_set_memory_region_done"]
    assert done[6] == vm.costs.memslot_update + grace and done[7] == grace


def test_mmio_then_hotplug_maps_the_new_slot() -> None:
    vm, stats, _ = simulate(*HOTPLUG, 'vmm.ops=[{at="400us", op="create", slot=1}]')
    tot = stats["vcpu_total"]
    assert tot["pf_mmio_spte_created"] > 0 and tot["mmio_exits"] >= tot["pf_mmio_spte_created"]
    assert tot["insn_emulation"] == tot["mmio_exits"]
    assert stats["vm"]["pages_4k"] == 128  # after the hot-plug every page got mapped
    assert stats["vm"]["mmio_on_backed_gfn"] == 0


def test_mmio_caching_off_installs_no_mmio_sptes() -> None:
    _, stats, _ = simulate(*HOTPLUG, "memslots.mmio_caching=false")
    tot = stats["vcpu_total"]
    assert tot["pf_mmio_spte_created"] == 0
    assert tot["mmio_exits"] == tot["pf_emulate"] > 0  # every MMIO access takes the full fault path


def test_race_scenario_outcome_per_scheme() -> None:
    outcomes = {}
    for scheme in ("in_progress_bit", "double_increment", "single_increment"):
        cfg = load_config(ROOT / "configs" / "mmio_generation_race.toml", [f"memslots.generation_scheme={scheme}",
                                                                          "events.level=off"])  # fmt: skip
        from vsim.runner import collect_stats
        from vsim.vm import Vm

        vm = Vm(cfg)
        stats = collect_stats(vm, vm.run())
        rules = {v["rule"] for v in stats["invariant_violations"]}
        outcomes[scheme] = (stats["vm"]["mmio_on_backed_gfn"], rules, stats["vm"]["pages_4k"])
    assert outcomes["in_progress_bit"] == (0, set(), 512)
    assert outcomes["double_increment"] == (0, set(), 512)
    stale, rules, pages = outcomes["single_increment"]
    assert stale > 0 and rules == {"stale_mmio"} and pages < 512  # some gfns stay MMIO forever


def test_bad_vmm_schedules_are_rejected() -> None:
    from vsim.config import ConfigError

    for sets, msg in (
        (['vmm.ops=[{at="1us", op="delete", slot=0}]'], "must be one of 'create' or 'flags'"),
        (["vm.memslots=2", 'vmm.ops=[{at="1us", op="create", slot=1}]'], "create of slot 1, which exists"),
        (["vm.memslots=2", "vm.absent_memslots=[1]", 'vmm.ops=[{at="1us", op="flags", slot=1}]'],
         "flags on slot 1, which does not exist"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=msg):
            load_config(None, sets)
