"""The vCPU group (vsim.vcpu.group): compiled accesses and TDP faults give the reference results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_config
from test_equivalence import _random_config, _random_shadow_config

from vsim.config import load_config
from vsim.events.sink import EventSink
from vsim.runner import run_scenario
from vsim.vcpu import group_state as k
from vsim.vm import Vm


def _group_sets(seed: int, backing_4k: bool, checker: bool = False, shadow: bool = False) -> list[str]:
    """A random equivalence config with the group on: events at ``faults``, the checker on or off."""
    config = _random_shadow_config(seed) if shadow else _random_config(seed)
    sets = [s for s in config if s not in ("events.level=all", "sim.invariants=true")]
    return [*sets, "events.level=faults", f"sim.invariants={str(checker).lower()}",
            *(["vm.backing_page_size=4K"] if backing_4k else [])]  # fmt: skip


def _outputs(sets: list[str], mode: str, out: Path) -> tuple[str, bytes]:
    cfg = load_config(None, [*sets, f"sim.mode={mode}"])
    res = run_scenario(cfg, out)
    if cfg.sim.invariants and cfg.memslots.generation_scheme != "single_increment":  # (that one is R1)
        assert res.stats["invariant_violations"] == []
    return json.dumps(res.stats), (out / "events.jsonl").read_bytes()


@pytest.mark.parametrize(("seed", "backing_4k"), [(s, True) for s in range(16)] + [(s, False) for s in (0, 6, 26, 29)])
def test_group_equals_reference(tmp_path: Path, seed: int, backing_4k: bool) -> None:
    """Memslot churn, host-MM invalidations, dirty logging and the selftests under the group, with
    the invariant checker on for half the seeds (it then sees the loop's SPTE changes and writes):
    byte-identical stats and fault logs to one SimPy event per access, and no violation. With 2M
    backing, dirty logging makes vCPUs split huge pages (``Vm.lockstep``) and the members' stretches
    end where another member acts."""
    _assert_group_equals_reference(tmp_path, _group_sets(seed, backing_4k, checker=seed % 2 == 0))


@pytest.mark.parametrize("seed", range(12))
def test_shadow_paging_members_equal_reference(tmp_path: Path, seed: int) -> None:
    """Shadow paging in the group (lockstep: each member's stretch of accesses ends where another
    member or the queue's head acts; #PF exits, CR3 writes and the guest kernel's own accesses run
    in Python): every paging mode, processes, forks, eviction, dirty logging and host-MM
    invalidations give byte-identical stats and fault logs to one SimPy event per access."""
    sets = _group_sets(seed, False, checker=seed % 2 == 0, shadow=True)
    sets = [s for s in sets if not s.startswith("vm.backing_page_size")]
    vm = Vm(load_config(None, sets))
    vm.run()
    assert vm.group is not None and vm.lockstep
    assert sum(vm.group.leaves.values()) > 0 or "vm.vcpus=1" in sets  # members joined and left
    _assert_group_equals_reference(tmp_path, sets)


@pytest.mark.parametrize("checker", [False, True])
def test_shadow_paging_members_run_the_passes_in_the_loop(tmp_path: Path, checker: bool) -> None:
    """Three shadow-paged vCPUs make many passes over their processes' memory while the host MM
    invalidates pages under them (zaps, remote flushes, kicks) and the guest switches processes
    (CR3 writes): the loop runs most accesses, members leave at the guest's context switches,
    and the results are those of one SimPy event per access."""
    sets = ["mmu.mode=shadow", "vm.vcpus=3", "guest.processes=2", "guest.process_memory=1MiB",
            "workload.per_vcpu_memory=4MiB", "guest.context_switch_interval=300us", "workload.passes=60",
            "workload.write_percent=30", "workload.access=random", "tlb.entries_4k=32", "tlb.ways_4k=4",
            "host_mm.invalidations=20", "host_mm.interval=100us", "host_mm.start=300us", "events.level=faults",
            f"sim.invariants={str(checker).lower()}"]  # fmt: skip
    vm = Vm(load_config(None, sets))
    vm.run()
    assert vm.group is not None and vm.group.faults == 0  # (shadow paging's faults are Python's)
    assert vm.group.accesses > 0.5 * sum(v.stat.accesses for v in vm.vcpus)
    assert vm.group.leaves[k.LEAVE_RUN] > 0 and vm.stat.remote_tlb_flush > 0
    _assert_group_equals_reference(tmp_path, sets)


def _assert_group_equals_reference(tmp_path: Path, sets: list[str]) -> None:
    stats_g, events_g = _outputs(sets, "batched", tmp_path / "g")
    stats_r, events_r = _outputs(sets, "reference", tmp_path / "r")
    assert stats_g == stats_r
    assert events_g == events_r
    # And the same page tables and host pages at the end (SPTE values are not in these logs).
    vms = [Vm(load_config(None, [*sets, f"sim.mode={mode}"])) for mode in ("batched", "reference")]
    for vm in vms:
        vm.run()
    g, r = (vm.mmu for vm in vms)
    assert g.n_tables == r.n_tables and np.array_equal(g.pool.free_tables(), r.pool.free_tables())
    assert np.array_equal(g.spt[: g.n_tables], r.spt[: r.n_tables])
    assert np.array_equal(g.sp_level[: g.n_tables], r.sp_level[: r.n_tables])
    hosts = [{id(s.host): s.host for s in vm.memslots.slots} for vm in vms]
    for hg, hr in zip(*(sorted(h.values(), key=lambda x: x.pfn_base) for h in hosts), strict=True):
        assert np.array_equal(hg.resident, hr.resident) and hg.populated_pages == hr.populated_pages


@pytest.mark.parametrize("seed", [9, 31])
def test_members_leave_for_a_contended_lock_and_for_requests_at_entry(seed: int) -> None:
    """Faults begun in compiled code finish in Python when a writer holds ``mmu_lock`` (or waits
    for it: the last reader hands it over) and when requests are pending at entry; the run still
    equals the run without the group."""
    sets = _group_sets(seed, True)
    vm = Vm(load_config(None, sets))
    vm.run()
    assert vm.group is not None and vm.group.faults > 0
    assert vm.group.leaves[k.LEAVE_LOCK] > 0 and vm.group.leaves[k.LEAVE_ENTRY] > 0
    off = Vm(load_config(None, [*sets, "sim.fault_kernel=false"]))
    off.run()
    assert off.group is None
    for a, b in zip(vm.vcpus, off.vcpus, strict=True):
        assert a.stat.as_dict() == b.stat.as_dict()
        assert list(a.stat.fault_service_ns) == list(b.stat.fault_service_ns)
    assert vm.stat.as_dict() == off.stat.as_dict()


def test_racing_members_fix_retry_and_see_spurious_faults_as_python_does() -> None:
    """Eight vCPUs populating the same pages at once: the compiled cmpxchg races end as KVM's do."""
    sets = ["vm.vcpus=8", "workload.per_vcpu_memory=512KiB", "workload.overlap=true", "workload.access=random"]
    runs = []
    for kernel in ("true", "false"):
        vm = Vm(make_config(*sets, f"sim.fault_kernel={kernel}", "sim.invariants=false"))
        vm.run()
        runs.append(vm)
    on, off = runs
    assert on.group is not None and on.group.faults > 0
    assert sum(v.stat.pf_spurious + v.stat.pf_retry for v in on.vcpus) > 0
    for a, b in zip(on.vcpus, off.vcpus, strict=True):
        assert a.stat.as_dict() == b.stat.as_dict()
    assert on.stat.as_dict() == off.stat.as_dict()
    assert np.array_equal(on.mmu.spt[: on.mmu.n_tables], off.mmu.spt[: off.mmu.n_tables])


def test_group_is_off_where_compiled_code_cannot_follow() -> None:
    for extra in (["sim.mode=reference"], ["mmu.ept_ad=false"], ["sim.fault_kernel=false"]):
        assert Vm(make_config("sim.invariants=false", *extra)).group is None, extra
    assert Vm(make_config("sim.invariants=true")).group is not None  # the checker sees the loop too
    assert Vm(make_config("sim.invariants=false"), EventSink("all")).group is None  # records at every SPTE change
    assert Vm(make_config("sim.invariants=false"), EventSink("faults")).group is not None


def _run_logged(sets: list[str], shrink: bool = False) -> tuple[Vm, bytes]:
    out: list[bytes] = []
    vm = Vm(load_config(None, sets), EventSink("faults", consumer=lambda b: out.append(b.render())))
    if shrink:  # output buffers just big enough for one fault per member: a flush stop every few faults
        nv = len(vm.vcpus)
        assert vm.group is not None
        vm.group.evbuf = np.zeros((2 * nv + 2, 6), dtype=np.int64)
        vm.group.srvbuf = np.zeros((nv + 1, 2), dtype=np.int64)
        vm.group.srcubuf = np.zeros((nv + 1, 3), dtype=np.int64)
    vm.run()
    vm.sink.flush()
    return vm, b"".join(out)


def test_full_output_buffers_stop_the_loop_before_any_member_overruns_them() -> None:
    """Every member may have a fault under way whose outcome and service time are still to be
    recorded: the loop stops while there is room for all of them."""
    sets = ["vm.vcpus=10", "workload.per_vcpu_memory=256KiB", "workload.overlap=true", "workload.access=random",
            "sim.invariants=false", "host_mm.invalidations=20", "host_mm.interval=3us",
            "host_mm.start=20us"]  # fmt: skip
    small, log_small = _run_logged(sets, shrink=True)
    ref, log_ref = _run_logged([*sets, "sim.mode=reference"])
    assert small.group is not None and small.group.faults > 0
    assert log_small == log_ref
    for a, b in zip(small.vcpus, ref.vcpus, strict=True):
        assert a.stat.as_dict() == b.stat.as_dict()


def test_the_event_buffer_stays_small_while_members_run_ahead_of_the_clock() -> None:
    """Members run far ahead of SimPy's clock; the sink still hands records on as soon as no
    earlier one can come (a member's key or the queue's head), so memory stays bounded."""
    kept: list[int] = []
    sink: EventSink
    sink = EventSink("faults", consumer=lambda b: kept.append(sink._n), limit=1024)
    vm = Vm(make_config("vm.vcpus=8", "workload.per_vcpu_memory=8MiB", "workload.passes=2",
                        "sim.invariants=false"), sink)  # fmt: skip
    vm.run()
    sink.flush()
    faults = sum(v.stat.pf_taken for v in vm.vcpus)
    assert vm.group is not None and vm.group.faults == faults and sink.emitted == 2 * faults
    assert max(kept) < 4096  # of more than 32,768 records


@pytest.mark.parametrize("manual", ["true", "false"])
def test_write_protection_faults_of_dirty_logging_are_fast_in_the_loop(tmp_path: Path, manual: str) -> None:
    """dirty_log_perf with 4K pages: writes to write-protected SPTEs take fast_page_fault in the
    loop (W back, the page marked in the bitmap), as in the reference mode."""
    sets = ["selftest.name=dirty_log_perf", "selftest.iterations=2", "workload.kind=memstress", "workload.passes=3",
            "vm.vcpus=4", "workload.per_vcpu_memory=1MiB", "vm.backing_page_size=4K",
            f"dirty_log.manual_protect={manual}", "events.level=faults"]  # fmt: skip
    vm = Vm(load_config(None, sets))
    vm.run()
    assert vm.group is not None and sum(v.stat.pf_fast for v in vm.vcpus) > 0
    assert vm.group.faults == sum(v.stat.pf_taken for v in vm.vcpus)  # every fault taken in the loop
    stats_g, events_g = _outputs(sets, "batched", tmp_path / "g")
    stats_r, events_r = _outputs(sets, "reference", tmp_path / "r")
    assert stats_g == stats_r
    assert events_g == events_r


def _legacy(*sets: str) -> list[str]:
    # (n_max_mmu_pages high enough that no fault may zap: else the vCPUs run in lockstep, without the group)
    return ["mmu.mode=legacy_tdp", "mmu.nr_mmu_pages=1000", "sim.invariants=false", "workload.kind=memstress", *sets]


def test_legacy_faults_queue_for_the_write_lock_in_the_loop_in_fifo_order() -> None:
    """Eight vCPUs fault their first page (eight neighbouring gfns) at the same instant on the legacy
    MMU: every fault runs in compiled code, and they take ``mmu_lock`` for write one after another
    in vCPU order. Each had its host page faulted in before it queued, so the first holder creates
    the three direct pages below the root, maps its leaf and prefetches the other seven (without
    the Accessed bit); each later holder finds its prefetched SPTE, sets A on it (``mmu_set_spte``:
    a changed SPTE of the same pfn, ``RET_PF_FIXED``) and takes ``legacy_direct_map``. So vCPU k
    waits ``H0 + (k - 1) * legacy_direct_map`` (a FIFO queue, worked by hand)."""
    vm = Vm(make_config(*_legacy("vm.vcpus=8", "workload.per_vcpu_memory=4KiB", "workload.passes=1")))
    vm.run()
    c = vm.costs
    assert vm.group is not None and vm.group.faults == 8 == sum(v.stat.pf_taken for v in vm.vcpus)
    h0 = c.legacy_direct_map + 3 * c.sp_alloc + 7 * c.prefetch_spte
    # (The first eight acquisitions are the root loads at time 0, mmu_alloc_direct_roots, uncontended.)
    assert vm.mmu_lock.waits("write") == [0] * 8 + [0] + [h0 + (i - 1) * c.legacy_direct_map for i in range(1, 8)]
    assert [(v.stat.pf_fixed, v.stat.pf_spurious) for v in vm.vcpus] == [(1, 0)] * 8
    assert vm.stat.pages_4k == 8
    assert vm.mmu_lock.contended == 7 and vm.stat.mmu_shadow_pages == 4  # the root and three below it


@pytest.mark.parametrize("poke", [False, True])
def test_legacy_faults_in_the_loop_equal_python(poke: bool) -> None:
    """Many vCPUs populating on the legacy MMU, with prefetch: the same stats, lock waits, service
    times and page tables as without the group. ``poke`` makes every locked section go on in
    Python, holding the lock (``LEAVE_LOCKED``, as a zap or an SPTE drop would)."""
    sets = _legacy("vm.vcpus=12", "workload.per_vcpu_memory=1MiB", "workload.passes=2", "workload.overlap=true",
                   "workload.access=random")  # fmt: skip
    vm = Vm(make_config(*sets))
    assert vm.group is not None
    if poke:
        vm.group.g[k.G_N_MAX] = 0  # the loop thinks make_mmu_pages_available would zap
    vm.run()
    off = Vm(make_config(*sets, "sim.fault_kernel=false"))
    off.run()
    assert off.group is None and vm.group.faults > 0
    assert (vm.group.leaves[k.LEAVE_LOCKED] > 0) == poke
    for a, b in zip(vm.vcpus, off.vcpus, strict=True):
        assert a.stat.as_dict() == b.stat.as_dict()
        assert list(a.stat.fault_service_ns) == list(b.stat.fault_service_ns)
    assert vm.stat.as_dict() == off.stat.as_dict()
    assert vm.mmu_lock.waits("write") == off.mmu_lock.waits("write") and vm.mmu_lock.contended > 0
    assert np.array_equal(vm.mmu.spt[: vm.mmu.n_tables], off.mmu.spt[: off.mmu.n_tables])


@pytest.mark.parametrize("mode", ["tdp_mmu", "legacy_tdp"])
def test_the_checker_sees_every_spte_change_and_write_the_loop_makes(mode: str) -> None:
    """With the checker on, the loop logs its SPTE changes and the driver replays them: the checker
    sees the same changes, in the same order, as when every fault runs in Python, and the same
    completed writes (the dirty-log check's ``written``)."""
    sets = [f"mmu.mode={mode}", "mmu.nr_mmu_pages=1000", "sim.invariants=true", "vm.vcpus=6",
            "workload.per_vcpu_memory=1MiB", "workload.passes=2", "workload.write_percent=30",
            "workload.access=random"]  # fmt: skip
    seen = []
    for kernel in ("true", "false"):
        vm = Vm(make_config(*sets, f"sim.fault_kernel={kernel}"))
        assert vm.checker is not None and (vm.group is not None) == (kernel == "true")
        changes: list[tuple[int, ...]] = []
        hook = vm.checker.on_spte_changed

        def spy(gfn: int, old: int, new: int, level: int, t: int, actor: int, hook=hook, changes=changes) -> None:  # type: ignore[no-untyped-def]
            changes.append((gfn, old, new, level, t, actor))
            hook(gfn, old, new, level, t, actor)

        vm.checker.on_spte_changed = spy  # type: ignore[method-assign]
        vm.run()
        assert vm.checker.violations == []
        seen.append((changes, vm.checker.written.copy(), vm))
    (on, written_on, vm_on), (off, written_off, _) = seen
    assert vm_on.group is not None and vm_on.group.faults > 100
    assert len(on) >= vm_on.stat.pages_4k > 0 and on == off
    assert written_on.any() and np.array_equal(written_on, written_off)
