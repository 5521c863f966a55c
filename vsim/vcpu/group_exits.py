"""Exits and entry of a vCPU group member, in compiled code.

``irq_exit`` takes a kick's IPI (``handle_external_interrupt``), ``guest_sync`` a pass end's
``GUEST_SYNC`` with no selftest program, ``service_flush`` the TLB-flush requests at entry, and
``entry`` is ``vcpu_enter_guest``'s end: ``srcu_read_unlock``, the IPIs taken in the host, VM entry
and a fault's service time. Line for line ``VcpuExits`` and ``VcpuRequests``.
"""

from __future__ import annotations

from numba import njit

from vsim.requests import KVM_REQ_TLB_FLUSH
from vsim.vcpu.group_state import (
    C_TLB_FLUSH,
    C_USERSPACE_EXIT,
    C_VMENTRY,
    C_VMEXIT,
    G_NEXT_SYNC,
    G_NSRCU,
    G_NSRV,
    G_SRCU_NEXT,
    M_AFTER,
    M_EXIT_SEQ,
    M_IN_FAULT,
    M_IPI_TAKEN,
    M_KICK,
    M_MODE,
    M_NIPI,
    M_NOW,
    M_PASS_END,
    M_PHASE,
    M_REQ,
    M_SRCU_REG,
    M_T_EXIT,
    M_TOKEN,
    M_TOKEN_T,
    NEVER,
    PH_ENTRY,
    PH_NEXT,
    PH_RUN,
    S_EXITS,
    S_IO_EXITS,
    S_IRQ_EXITS,
    S_TLB_FLUSH,
    SRCU_FORGET,
)
from vsim.vcpu.tlb import EMPTY


@njit(cache=True)
def vm_exit(m, ms, ss, g, c, t_token, t_exit, in_fault):
    """``VcpuExits._exit``: leave guest mode at ``t_exit``, enter KVM under ``kvm->srcu`` (a read
    side from ``t_token``); the member's clock goes on after the exit's cost."""
    ms[m, M_MODE] = 0  # OUTSIDE_GUEST_MODE
    ss[m, S_EXITS] += 1
    ms[m, M_EXIT_SEQ] += 1
    g[G_SRCU_NEXT] += 1  # srcu_read_lock
    ms[m, M_TOKEN] = g[G_SRCU_NEXT]
    ms[m, M_TOKEN_T] = t_token
    ms[m, M_SRCU_REG] = 0
    ms[m, M_T_EXIT] = t_exit
    ms[m, M_IN_FAULT] = in_fault
    ms[m, M_NOW] = t_exit + c[C_VMEXIT]


@njit(cache=True)
def guest_sync(m, ms, ss, g, c, srcubuf):
    """``VcpuExits.guest_sync`` with no selftest program: the ucall's port I/O exits to userspace
    (``KVM_EXIT_IO``), ``KVM_RUN`` returns and is called again; entry and the next chunk follow."""
    now = ms[m, M_NOW]
    vm_exit(m, ms, ss, g, c, now, now, 0)
    ss[m, S_IO_EXITS] += 1
    now = ms[m, M_NOW]
    if now >= g[G_NEXT_SYNC]:  # the exit's read side ends as KVM_RUN returns
        k = g[G_NSRCU]
        srcubuf[k, 0] = ms[m, M_TOKEN]
        srcubuf[k, 1] = ms[m, M_TOKEN_T]
        srcubuf[k, 2] = now
        g[G_NSRCU] = k + 1
    now += c[C_USERSPACE_EXIT]
    g[G_SRCU_NEXT] += 1  # KVM_RUN again: vcpu_enter_guest under a new read side
    ms[m, M_TOKEN] = g[G_SRCU_NEXT]
    ms[m, M_TOKEN_T] = now
    ms[m, M_PASS_END] = 0  # this pass's sync is done
    ms[m, M_NOW] = now
    ms[m, M_PHASE] = PH_ENTRY
    ms[m, M_AFTER] = PH_NEXT


@njit(cache=True)
def irq_exit(m, ms, ss, g, c):
    """``handle_external_interrupt``: the kick's IPI arrives in guest mode; exit (``EXTERNAL_INTERRUPT``,
    under ``kvm->srcu``) and acknowledge it; entry comes next."""
    now = max(ms[m, M_NOW], ms[m, M_KICK])
    vm_exit(m, ms, ss, g, c, now, now, 0)
    ss[m, S_IRQ_EXITS] += 1
    ms[m, M_PHASE] = PH_ENTRY


@njit(cache=True)
def service_flush(m, ms, ss, c, tags, wr, count):
    """``vcpu_enter_guest``'s ``KVM_REQ_TLB_FLUSH`` (``kvm_vcpu_flush_tlb_all``) or
    ``KVM_REQ_TLB_FLUSH_CURRENT``: this vCPU's TLB empties (the only requests pending)."""
    req = ms[m, M_REQ]
    ms[m, M_REQ] = 0
    if req & KVM_REQ_TLB_FLUSH:
        ss[m, S_TLB_FLUSH] += 1
    tags[m, :, :, :] = EMPTY
    wr[m, :, :, :] = 0
    count[m, :] = 0
    ms[m, M_NOW] += c[C_TLB_FLUSH]


@njit(cache=True)
def entry(m, ms, g, c, srvbuf, srcubuf):
    """``vcpu_enter_guest`` with no request pending: ``srcu_read_unlock``, the IPIs taken in the host,
    VM entry, and a fault's service time."""
    now = ms[m, M_NOW]
    if now >= g[G_NEXT_SYNC] or ms[m, M_SRCU_REG]:
        # A synchronize_srcu may still need this reader (or the driver registered it): report it.
        k = g[G_NSRCU]
        srcubuf[k, 0] = ms[m, M_TOKEN]
        srcubuf[k, 1] = ms[m, M_TOKEN_T]
        srcubuf[k, 2] = now if now >= g[G_NEXT_SYNC] else SRCU_FORGET
        g[G_NSRCU] = k + 1
    if ms[m, M_NIPI] and ms[m, M_KICK] <= now:  # an IPI that arrived in the host ran its handler there
        ms[m, M_NIPI] -= 1
        ms[m, M_IPI_TAKEN] += 1
        ms[m, M_KICK] = NEVER  # (a second pending IPI makes the member leave: F_LEAVE)
    now += c[C_VMENTRY]
    ms[m, M_NOW] = now
    ms[m, M_MODE] = 1  # IN_GUEST_MODE
    if ms[m, M_IN_FAULT]:
        k = g[G_NSRV]
        srvbuf[k, 0] = m
        srvbuf[k, 1] = now - ms[m, M_T_EXIT]
        g[G_NSRV] = k + 1
    ms[m, M_PHASE] = ms[m, M_AFTER]
    ms[m, M_AFTER] = PH_RUN
