"""VM-wide vCPU requests, kicks and remote TLB flushes (``virt/kvm/kvm_main.c``, spec §9.1).

``kvm_make_all_cpus_request`` sets a request bit on every vCPU and sends an IPI to each vCPU that
needs one: with ``KVM_REQUEST_WAIT``, every vCPU not ``OUTSIDE_GUEST_MODE``; without it, only those
``IN_GUEST_MODE`` (which it moves to ``EXITING_GUEST_MODE``). A vCPU outside guest mode gets no IPI
and is not woken (``KVM_REQUEST_NO_WAKEUP``): it sees the bit at its next entry, which re-checks
requests after publishing ``IN_GUEST_MODE``.

With ``WAIT`` the requester blocks until every target has taken its IPI (``smp_call_function_many``
with ``wait``). A target takes the IPI when it arrives: in guest mode it exits for it, in the host it
runs the handler at once. So the requester is done one IPI latency after it sent the last IPI, plus
``ipi_ack`` per target for collecting the acknowledgements, and each target's arrival time is known
when the IPI is sent; the target vCPU records it
(``Vcpu.post_ipi``) and stops its batched accesses there.

``kvm_flush_remote_tlbs`` counts ``remote_tlb_flush_requests`` on every call and
``remote_tlb_flush`` when IPIs went out (x86 with EPT has no direct remote flush, so
``kvm_arch_flush_remote_tlbs`` fails and the request path runs). x86 has no ranged flush without
Hyper-V, so ``kvm_flush_remote_tlbs_range`` and its ``_gfn``/``_memslot`` helpers flush everything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vsim.vm import Vm

# vcpu->mode
OUTSIDE_GUEST_MODE, IN_GUEST_MODE, EXITING_GUEST_MODE, READING_SHADOW_PAGE_TABLES = 0, 1, 2, 3

# vcpu->requests bits, named as in include/linux/kvm_host.h and arch/x86/include/asm/kvm_host.h.
# Every request below is sent with KVM_REQUEST_WAIT | KVM_REQUEST_NO_WAKEUP.
KVM_REQ_TLB_FLUSH = 1 << 0
KVM_REQ_MMU_SYNC = 1 << 11  # KVM_ARCH_REQ(3): resync unsync shadow pages before entry
KVM_REQ_TLB_FLUSH_CURRENT = 1 << 26
KVM_REQ_UPDATE_CPU_DIRTY_LOGGING = 1 << 30
KVM_REQ_MMU_FREE_OBSOLETE_ROOTS = 1 << 31


def kvm_make_all_cpus_request(vm: Vm, req: int, t: int, wait: bool = True, me: int = -1) -> tuple[int, int]:
    """Set ``req`` on every vCPU at ``t`` and kick those that need an IPI (all but vCPU ``me``, the
    caller's own). Returns ``(ipis, done)``: the IPIs sent and when the requester may go on
    (``t`` plus the sends, plus one IPI latency when it waits for acknowledgements)."""
    c = vm.costs
    sent = 0
    for v in vm.vcpus:
        v.requests |= req
        mode = v.mode
        if v.id == me or mode == OUTSIDE_GUEST_MODE or (not wait and mode != IN_GUEST_MODE):
            continue
        if mode == IN_GUEST_MODE:
            v.mode = EXITING_GUEST_MODE
        sent += 1
        v.post_ipi(t + sent * c.ipi_send + c.ipi_latency)
    if vm.group is not None:
        for v in vm.vcpus:
            vm.group.notify(v)
    done = t + sent * c.ipi_send + (c.ipi_latency + sent * c.ipi_ack if wait and sent else 0)
    return sent, done


def kvm_flush_remote_tlbs(vm: Vm, t: int, me: int = -1) -> int:
    """``kvm_flush_remote_tlbs`` at ``t`` (``KVM_REQ_TLB_FLUSH``, WAIT): returns when the caller is
    done waiting for the acknowledgements."""
    vm.stat.remote_tlb_flush_requests += 1
    sent, done = kvm_make_all_cpus_request(vm, KVM_REQ_TLB_FLUSH, t, wait=True, me=me)
    if sent:
        vm.stat.remote_tlb_flush += 1
    if vm.sink.faults:
        vm.sink.emit("vsim_remote_tlb_flush", t, me, sent, done - t)
    if vm.checker is not None:
        vm.checker.on_flush(t, done)
    return done
