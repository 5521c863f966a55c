"""mmu_lock as a qrwlock: sharing, writer exclusion, FIFO fairness and wait accounting."""

from __future__ import annotations

import pytest
import simpy

from vsim.events.sink import EventSink
from vsim.mmu.mmu_lock import MmuLock


def _drive(script):  # type: ignore[no-untyped-def]
    """Run (actor, start_ns, mode, hold_ns) requests; returns (actor -> acquire time, lock)."""
    env = simpy.Environment()
    lock = MmuLock(env, EventSink("off"))
    got: dict[int, int] = {}

    def proc(actor: int, start: int, mode: str, hold: int):  # type: ignore[no-untyped-def]
        yield env.timeout(start)
        ev = (lock.read_lock if mode == "read" else lock.write_lock)(actor, env.now)
        t = env.now if ev is None else (yield ev)
        got[actor] = t
        yield env.timeout(t + hold - env.now)
        (lock.read_unlock if mode == "read" else lock.write_unlock)(actor, env.now)

    for a in script:
        env.process(proc(*a))
    env.run()
    return got, lock


def test_readers_share_and_writer_waits_for_all_readers() -> None:
    got, lock = _drive([(0, 0, "read", 100), (1, 10, "read", 100), (2, 20, "write", 50)])
    assert got == {0: 0, 1: 10, 2: 110}
    assert lock.waits("write") == [90] and lock.waits("read") == [0, 0]
    assert lock.wait_by_actor == {2: 90}


def test_waiting_writer_blocks_new_readers() -> None:
    # qrwlock fairness: reader 2 arrives while writer 1 waits, so it queues behind the writer.
    got, lock = _drive([(0, 0, "read", 100), (1, 10, "write", 50), (2, 20, "read", 10)])
    assert got == {0: 0, 1: 100, 2: 150}
    assert lock.wait_by_actor == {1: 90, 2: 130}
    assert lock.contended == 2


def test_consecutive_readers_at_queue_head_enter_together() -> None:
    got, _ = _drive(
        [(0, 0, "write", 100), (1, 10, "read", 30), (2, 20, "read", 30), (3, 30, "write", 10), (4, 40, "read", 5)]
    )
    assert got[1] == got[2] == 100  # both readers granted when the writer leaves
    assert got[3] == 130  # the next writer waits for both
    assert got[4] == 140  # the last reader queued behind that writer


def test_writers_exclude_each_other_fifo() -> None:
    got, lock = _drive([(0, 0, "write", 10), (1, 1, "write", 10), (2, 2, "write", 10)])
    assert got == {0: 0, 1: 10, 2: 20}
    assert lock.waits("write") == [0, 9, 18]


def test_lockdep_asserts_the_mode_kvm_asserts_while_the_checker_is_on() -> None:
    """``__kvm_mmu_prepare_zap_page`` needs ``mmu_lock`` for write and ``tdp_mmu_set_spte_atomic``
    for read (``lockdep_assert_held_write/_read``): without it, a checked run stops."""
    lock = MmuLock(simpy.Environment(), EventSink("off"))
    lock.lockdep = True
    with pytest.raises(AssertionError):
        lock.lockdep_assert_held(3, write=True)
    assert lock.read_lock(3, 0) is None
    lock.lockdep_assert_held(3, write=False)
    with pytest.raises(AssertionError):
        lock.lockdep_assert_held(4, write=False)  # another reader does not count
    with pytest.raises(AssertionError):
        lock.lockdep_assert_held(3, write=True)
    lock.read_unlock(3, 1)
    with pytest.raises(AssertionError):
        lock.lockdep_assert_held(3, write=False)
    assert lock.write_lock(-1, 2) is None
    lock.lockdep_assert_held(-1, write=True)
    lock.lockdep = False
    lock.lockdep_assert_held(5, write=True)  # unchecked runs assert nothing


def test_the_shadow_zap_and_the_tdp_install_check_their_lock() -> None:
    """The call sites: zapping a shadow page, and a TDP install, without ``mmu_lock``."""
    from conftest import make_config

    from vsim.mmu.page_fault import KvmPageFault
    from vsim.vm import Vm

    legacy = Vm(make_config("mmu.mode=legacy_tdp", "vm.vcpus=1", "workload.per_vcpu_memory=2MiB",
                            "sim.invariants=true"))  # fmt: skip
    legacy.run()
    sp = next(iter(legacy.mmu.active))  # type: ignore[union-attr]
    with pytest.raises(AssertionError, match="for write"):
        legacy.mmu.kvm_mmu_prepare_zap_page(sp, [], -1, legacy.env.now)  # type: ignore[union-attr]
    tdp = Vm(make_config("vm.vcpus=1", "workload.per_vcpu_memory=2MiB", "sim.invariants=true"))
    tdp.run()
    v = tdp.vcpus[0]
    fault = KvmPageFault(addr=0, gfn=tdp.region_base_gfn, error_code=0, id=0, write=False, present=False)
    with pytest.raises(AssertionError, match="for read"):
        tdp.mmu._map_install(v, fault, tdp.mmu.walk_to(v.root, fault.gfn, 1))  # type: ignore[union-attr, arg-type]


def test_a_hand_over_to_a_waiter_queued_from_compiled_code_goes_to_the_grantee() -> None:
    """The vCPU group queues its members on the lock's own arrays (``lock_acquire`` with
    ``group``): a Python release hands them the lock through ``LockGrantee``, in FIFO order with
    the Python waiters, and a group-only hand-over stops at a Python waiter."""
    from vsim.mmu.mmu_lock import GRANT_PYTHON, lock_acquire, lock_grant_next, lock_release

    env = simpy.Environment()
    lock = MmuLock(env, EventSink("off"), max_waiters=4)
    granted: list[tuple[int, int]] = []

    class Group:
        def lock_granted(self, actor: int, t: int) -> None:
            granted.append((actor, t))

    lock.grantee = Group()
    assert lock.write_lock(-1, 0) is None  # the VMM holds it
    assert not lock_acquire(lock.lk, lock.q, True, 3, 5, True)  # member 3 queues in the loop
    ev = lock.write_lock(-2, 6)  # then a Python actor
    assert ev is not None and lock.waiters == 2
    lock.write_unlock(-1, 10)
    assert granted == [(3, 10)] and lock.writer == 3 and not ev.triggered
    # Member 3 releases in compiled code: the head waits in Python, so the loop leaves it queued.
    assert lock_release(lock.lk, True)
    assert lock_grant_next(lock.lk, lock.q, 20, True) == GRANT_PYTHON and lock.waiters == 1
    lock.grant(20)  # the driver's hand-over
    assert lock.writer == -2 and ev.triggered and ev.value == 20
    assert lock.waits("write") == [0, 5, 14] and lock.wait_by_actor == {3: 5, -2: 14}


def test_range_operations_and_the_invalidation_sequence_check_their_lock() -> None:
    """``tdp_mmu_zap_leafs`` and ``kvm_mmu_invalidate_begin``/``_end`` need the write lock; the TDP
    MMU's slot-wide write protection runs under either mode (``kvm_lockdep_assert_mmu_lock_held``),
    the legacy MMU's rmap walks only under the write lock (``__walk_slot_rmaps``)."""
    from conftest import make_config

    from vsim.vm import Vm

    sets = ("vm.vcpus=1", "workload.per_vcpu_memory=2MiB", "sim.invariants=true")
    tdp = Vm(make_config(*sets))
    tdp.run()
    lo = tdp.region_base_gfn
    lock, mmu = tdp.mmu_lock, tdp.mmu
    with pytest.raises(AssertionError, match="needs mmu_lock"):
        mmu.wrprot_range(lo, lo + 512, 1, False, -1, tdp.env.now)  # type: ignore[union-attr]
    assert lock.read_lock(-1, tdp.env.now) is None
    mmu.wrprot_range(lo, lo + 512, 1, False, -1, tdp.env.now)  # type: ignore[union-attr]
    with pytest.raises(AssertionError, match="for write"):
        mmu.zap_leafs(lo, lo + 1, -1, tdp.env.now)  # type: ignore[union-attr]
    with pytest.raises(AssertionError, match="for write"):
        tdp.kvm_mmu_invalidate_begin(lo, lo + 1, -1)
    lock.read_unlock(-1, tdp.env.now)
    assert lock.write_lock(-1, tdp.env.now) is None
    tdp.kvm_mmu_invalidate_begin(lo, lo + 1, -1)
    mmu.zap_leafs(lo, lo + 1, -1, tdp.env.now)  # type: ignore[union-attr]
    tdp.kvm_mmu_invalidate_end(-1)
    lock.write_unlock(-1, tdp.env.now)
    legacy = Vm(make_config(*sets, "mmu.mode=legacy_tdp"))
    legacy.run()
    assert legacy.mmu_lock.read_lock(-1, legacy.env.now) is None
    with pytest.raises(AssertionError, match="for write"):
        legacy.mmu.wrprot_range(lo, lo + 512, 1, False, -1, legacy.env.now)  # type: ignore[union-attr]
