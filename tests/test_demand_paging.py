"""demand_paging_test through userfaultfd: missing pages are filled by handler threads."""

from __future__ import annotations

from conftest import make_config, simulate

PAGES = 3 * 256  # 3 vCPUs x 1 MiB


def _run(*sets: str) -> dict:  # type: ignore[type-arg]
    _, stats, _ = simulate("vm.vcpus=3", "workload.per_vcpu_memory=1MiB", "selftest.name=demand_paging",
                           "host_mm.uffd=true", *sets)  # fmt: skip
    return stats["selftest"]  # type: ignore[no-any-return]


def test_one_handler_serializes_page_ins() -> None:
    st = _run("host_mm.uffd_handlers=1")
    c = make_config().costs
    total = dict(st["phases_ns"])["Total guest execution time"]
    assert st["pages"] == PAGES
    # One handler fills every page in turn: the run lasts at least all the page-ins back to back.
    assert total >= PAGES * c.uffd_page_in
    assert st["uffd_wait_ns"] > 0
    assert st["demand_paging_rate_pages_per_s"] == round(PAGES * 1e9 / total)


def test_a_handler_per_vcpu_removes_the_queueing_and_delay_adds_per_page() -> None:
    one = _run("host_mm.uffd_handlers=1")
    per_vcpu = _run("host_mm.uffd_handlers=3")
    assert per_vcpu["uffd_wait_ns"] == 0
    assert per_vcpu["demand_paging_rate_pages_per_s"] > one["demand_paging_rate_pages_per_s"]
    # The three handlers work in parallel: faster than all page-ins back to back.
    assert dict(per_vcpu["phases_ns"])["Total guest execution time"] < PAGES * make_config().costs.uffd_page_in
    slow = _run("host_mm.uffd_handlers=3", "host_mm.uffd_delay=10us")
    t = dict(slow["phases_ns"])["Total guest execution time"]
    t0 = dict(per_vcpu["phases_ns"])["Total guest execution time"]
    assert t - t0 == 256 * 10_000  # each vCPU waits the delay once per page, in sequence
