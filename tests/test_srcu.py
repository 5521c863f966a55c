"""kvm->srcu: synchronize_srcu waits for exactly the readers that started before it."""

from __future__ import annotations

import simpy

from vsim.events.sink import EventSink
from vsim.srcu import Srcu


def _sync_at(readers: list[tuple[int, int]], t_s: int) -> int:
    """Readers (start, end); a synchronize at ``t_s`` returns when the ones it must wait for end."""
    env = simpy.Environment()
    srcu = Srcu(env, EventSink("off"), lambda: t_s)
    done: list[int] = []

    def reader(start: int, end: int):  # type: ignore[no-untyped-def]
        yield env.timeout(start)
        tok = srcu.read_lock(env.now)
        yield env.timeout(end - start)
        srcu.read_unlock(tok, env.now)

    def syncer():  # type: ignore[no-untyped-def]
        yield env.timeout(t_s)
        ev = srcu.wait_for(srcu.readers_before(env.now))
        if ev is not None:
            yield ev
        done.append(env.now)

    for r in readers:
        env.process(reader(*r))
    env.process(syncer())
    env.run()
    return done[0]


def test_waits_for_readers_that_started_before() -> None:
    assert _sync_at([(0, 100), (10, 250)], 50) == 250


def test_readers_starting_later_do_not_delay_it() -> None:
    assert _sync_at([(0, 100), (60, 10_000)], 50) == 100


def test_no_readers_returns_at_once_and_finished_readers_do_not_count() -> None:
    assert _sync_at([(0, 40)], 50) == 50
    assert _sync_at([], 50) == 50


def test_reader_registered_ahead_of_the_clock_is_judged_by_its_times() -> None:
    env = simpy.Environment()
    srcu = Srcu(env, EventSink("off"), lambda: 0)
    early = srcu.read_lock(30)  # a vCPU that knows its exit handling runs 30..90
    srcu.read_unlock(early, 90)
    late = srcu.read_lock(70)  # starts after a synchronize at 50
    assert srcu.readers_before(50) == {early}
    assert srcu.readers_before(30) == set()  # a reader starting exactly then is not "before"
    assert srcu.readers_before(90) == {early, late}  # ending exactly then is still inside


def test_readers_no_synchronize_can_need_are_forgotten() -> None:
    env = simpy.Environment()
    srcu = Srcu(env, EventSink("off"), lambda: 1000)  # nothing can synchronize before t=1000
    for t in range(0, 5000, 10):
        srcu.read_unlock(srcu.read_lock(t), t + 5)
    assert len(srcu._readers) == 400  # the readers ending at or after t=1000 (t = 1000..4990) are kept
    (tok,) = srcu.readers_before(2003)  # the one that ran 2000..2005
    assert srcu._readers[tok] == [2000, 2005]
