"""The request / kick / acknowledge protocol of ``kvm_make_all_cpus_request`` and remote flushes."""

from __future__ import annotations

from conftest import make_config

from vsim.requests import (
    EXITING_GUEST_MODE,
    IN_GUEST_MODE,
    KVM_REQ_TLB_FLUSH,
    OUTSIDE_GUEST_MODE,
    kvm_flush_remote_tlbs,
)
from vsim.sched import ACTOR_PRIO_BASE, At
from vsim.vm import Vm


def _vm_with_flush_at(t_flush: int, *sets: str) -> tuple[Vm, dict[str, int]]:
    """A VM whose vCPUs run memstress, and a requester that flushes remote TLBs at ``t_flush``."""
    vm = Vm(make_config("vm.vcpus=3", "workload.per_vcpu_memory=16MiB", "workload.passes=4", *sets))
    vm.lockstep = True  # the test's requester is not the VMM: bound the vCPUs by the event queue
    seen: dict[str, int] = {}

    def requester():  # type: ignore[no-untyped-def]
        yield At(vm.env, t_flush, ACTOR_PRIO_BASE)
        seen["modes"] = [v.mode for v in vm.vcpus]  # type: ignore[assignment]
        seen["done"] = kvm_flush_remote_tlbs(vm, vm.env.now)
        seen["modes_after"] = [v.mode for v in vm.vcpus]  # type: ignore[assignment]
        seen["kick_at"] = [v.kick_at for v in vm.vcpus]  # type: ignore[assignment]

    vm.env.process(requester())
    return vm, seen


def test_flush_kicks_every_running_vcpu_and_waits_for_the_last_ipi() -> None:
    t = 15_000_000
    vm, seen = _vm_with_flush_at(t)
    c = vm.costs
    vm.run()
    assert seen["modes"] == [IN_GUEST_MODE] * 3
    assert seen["modes_after"] == [EXITING_GUEST_MODE] * 3
    # One IPI per vCPU, sent one after another; the requester waits one latency after the last.
    assert seen["kick_at"] == [t + (i + 1) * c.ipi_send + c.ipi_latency for i in range(3)]
    assert seen["done"] == t + 3 * (c.ipi_send + c.ipi_ack) + c.ipi_latency
    assert vm.stat.remote_tlb_flush == 1 and vm.stat.remote_tlb_flush_requests == 1
    for v in vm.vcpus:
        assert v.stat.irq_exits == 1  # each exited at its IPI's arrival
        assert v.stat.tlb_flush == 1  # and flushed before re-entering
        assert v.requests == 0


def test_vcpu_outside_guest_mode_gets_no_ipi_and_flushes_at_its_next_entry() -> None:
    # Every vCPU has finished its workload (KVM_RUN returned) before the flush.
    vm, seen = _vm_with_flush_at(10**12)
    vm.run()
    assert seen["modes"] == [OUTSIDE_GUEST_MODE] * 3
    assert seen["done"] == 10**12  # no IPI, nothing to wait for
    assert vm.stat.remote_tlb_flush_requests == 1
    assert vm.stat.remote_tlb_flush == 0  # counted only when IPIs went out
    for v in vm.vcpus:
        assert v.stat.irq_exits == 0 and v.stat.tlb_flush == 0  # NO_WAKEUP: nobody was woken
        assert v.requests & KVM_REQ_TLB_FLUSH  # still pending
        assert v.tlb.count.sum() > 0  # its TLB still holds the old translations
    # The next KVM_RUN handles the request before entering the guest.
    vm.set_workloads(vm.cfg.workload)
    vm.run()
    for v in vm.vcpus:
        assert v.stat.tlb_flush == 1 and v.requests == 0


def test_each_ipi_that_arrives_in_guest_mode_exits_once() -> None:
    """Two flushes close together: a vCPU back in the guest before the second IPI arrives exits
    again; an IPI that arrives while it is still in the host costs no second exit."""
    t = 15_000_000
    vm, _ = _vm_with_flush_at(t)
    c = vm.costs

    def second():  # type: ignore[no-untyped-def]
        yield At(vm.env, t + 1, ACTOR_PRIO_BASE + 1)
        kvm_flush_remote_tlbs(vm, vm.env.now)

    vm.env.process(second())
    vm.run()
    # Vcpus already EXITING still get the second IPI (WAIT targets every vCPU not outside).
    assert vm.stat.remote_tlb_flush == 2
    # The second IPI lands 1 ns after the first, while each vCPU is still exiting: one exit each.
    assert c.vmexit > 1
    assert [v.stat.irq_exits for v in vm.vcpus] == [1, 1, 1]
    assert [v.stat.tlb_flush for v in vm.vcpus] == [1, 1, 1]
