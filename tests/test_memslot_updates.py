"""Memslot updates under SRCU: generations per scheme, MMIO SPTEs, and the R1 race (spec §5, §6, §12)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_config, simulate

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
        (['vmm.ops=[{at="1us", op="resize", slot=0}]'], "must be one of 'create', 'delete', 'move' or 'flags'"),
        (["vm.memslots=2", 'vmm.ops=[{at="1us", op="move", slot=1, to_gpa="4GiB"}]'], "overlaps another memslot"),
        (["vm.memslots=2", 'vmm.ops=[{at="1us", op="delete", slot=1}, {at="2us", op="delete", slot=1}]'],
         "delete of slot 1, which does not exist"),
        (["vm.memslots=2", 'vmm.ops=[{at="1us", op="create", slot=1}]'], "create of slot 1, which exists"),
        (["vm.memslots=2", "vm.absent_memslots=[1]", 'vmm.ops=[{at="1us", op="flags", slot=1}]'],
         "flags of slot 1, which does not exist"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=msg):
            load_config(None, sets)


def test_delete_and_move_bump_twice_create_once() -> None:
    for scheme, per_swap in (("in_progress_bit", 1), ("double_increment", 2), ("single_increment", 1)):
        ops = ('vmm.ops=[{at="20us", op="delete", slot=1}, {at="200us", op="create", slot=1}, '
               '{at="300us", op="move", slot=1, to_gpa="8GiB"}]')  # fmt: skip
        sets = ("vm.vcpus=2", "vm.memslots=2", "workload.per_vcpu_memory=256KiB", "workload.passes=4",
                f"memslots.generation_scheme={scheme}", ops)  # fmt: skip
        _, stats, sink = simulate(*sets, level="faults")
        done = [r for r in sink.kept if r[0] == "vsim_set_memory_region_done"]
        assert [r[4] for r in done] == ["KVM_MR_DELETE", "KVM_MR_CREATE", "KVM_MR_MOVE"]
        assert stats["memslots_generation"] == (2 + 1 + 2) * per_swap
        assert [r[8] > 0 for r in done] == [True, False, True]  # DELETE and MOVE zapped
        assert stats["vm"]["mmu_fast_zaps"] == 2


def test_after_fast_zap_no_vcpu_enters_on_an_obsolete_root() -> None:
    # The invariant checker (on in every test) flags any VM entry on an invalid root.
    # A long uniform stream over populated memory: at 1 ms the vCPUs run in guest mode and are kicked.
    vm, stats, sink = simulate("vm.vcpus=4", "vm.memslots=2", "workload.per_vcpu_memory=512KiB",
                               "workload.kind=uniform", "workload.accesses=300000",
                               'vmm.ops=[{at="1ms", op="delete", slot=1}, {at="1200us", op="create", slot=1}]',
                               level="all")  # fmt: skip
    assert all(not r.invalid for r in vm.mmu.roots) and len(vm.mmu.roots) == 1
    assert all(v.root is vm.mmu.roots[0] for v in vm.vcpus)
    irq = [r for r in sink.kept if r[0] == "kvm_exit" and r[4] == "EXTERNAL_INTERRUPT"]
    assert stats["vcpu_total"]["irq_exits"] == len(irq) > 0  # vCPUs in guest mode were kicked
    assert stats["vm"]["tdp_sptes_zapped"] > 0 and stats["vm"]["refaults"] > 0


def test_fault_on_an_invalid_slot_retries() -> None:
    # While a DELETE waits for its grace period with the slot INVALID, faults on it retry (R2).
    _, stats, _ = simulate("vm.vcpus=4", "vm.memslots=2", "workload.per_vcpu_memory=512KiB", "workload.passes=2",
                           "costs.srcu_expedited_gp=200us", 'vmm.ops=[{at="50us", op="delete", slot=1}]')  # fmt: skip
    assert stats["vcpu_total"]["pf_retry"] > 3


def test_stress_scenario_reports_latency_split() -> None:
    cfg = load_config(ROOT / "configs" / "memslot_modification_stress.toml", ["vmm.stress.iterations=20",
                                                                               "events.level=off"])  # fmt: skip
    from vsim.runner import collect_stats
    from vsim.vm import Vm

    vm = Vm(cfg)
    stats = collect_stats(vm, vm.run())
    lat = stats["latency_ns"]
    assert stats["vm"]["memslot_updates"] == 40 and stats["vm"]["mmu_fast_zaps"] == 20
    assert lat["memslot_update"]["count"] == 40
    assert lat["memslot_update_zap"]["max"] > 0 and lat["memslot_update_srcu"]["p50"] >= cfg.costs.srcu_expedited_gp
    assert stats["vm"]["refaults"] > 0 and stats["invariant_violations"] == []


def test_mmio_generation_wrap_zaps_all() -> None:
    # Two updates before the 19-bit MMIO generation would wrap: the second wraps it to 0, and KVM
    # zaps everything so that no old MMIO SPTE can look current again.
    wrap = (1 << 19) - 2
    _, stats, _ = simulate(*HOTPLUG, f"memslots.initial_generation={wrap}",
                           'vmm.ops=[{at="20us", op="create", slot=1}, {at="60us", op="flags", slot=0}]')  # fmt: skip
    assert stats["memslots_generation"] == 1 << 19
    assert stats["vm"]["mmio_generation_wraps"] == 1 and stats["vm"]["mmu_fast_zaps"] == 1
    assert stats["vm"]["mmio_on_backed_gfn"] == 0


def test_r2_switch_emulates_accesses_to_a_slot_being_deleted() -> None:
    """R2 brought back: a fault on the INVALID slot is taken for no slot and emulated as MMIO."""
    from vsim.vm import Vm

    vm = Vm(make_config("vm.vcpus=4", "vm.memslots=2", "workload.per_vcpu_memory=512KiB", "workload.passes=2",
                        "costs.srcu_expedited_gp=200us", 'vmm.ops=[{at="50us", op="delete", slot=1}]',
                        "memslots.invalid_slot_retry=false"))  # fmt: skip
    vm.run()
    assert "mmio_on_invalid_slot" in {rule for _, rule, _ in vm.checker.violations}  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["tdp_mmu", "legacy_tdp"])
def test_r3_switch_installs_into_obsolete_roots(mode: str) -> None:
    """R3 brought back: without the root check in ``is_page_fault_stale``, faults racing the fast
    zaps of the stress loop map into invalidated roots."""
    from vsim.vm import Vm

    cfg = load_config(ROOT / "configs" / "memslot_modification_stress.toml",
                      ["sim.invariants=true", "events.level=off", "vmm.stress.iterations=30",
                       "mmu.stale_root_check=false", f"mmu.mode={mode}"])  # fmt: skip
    vm = Vm(cfg)
    vm.run()
    assert {rule for _, rule, _ in vm.checker.violations} == {"install_into_obsolete_root"}  # type: ignore[union-attr]
