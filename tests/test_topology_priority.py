"""CPU priority of agent threads (topology.priority), on this machine's real scheduler."""

from __future__ import annotations

import os
import threading

import pytest

from topology.priority import raise_priority


def _in_thread(fn):  # run fn in a fresh thread, return its result
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", fn()))
    t.start()
    t.join(5)
    return out["v"]


def _rr_permitted() -> bool:
    def probe() -> bool:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
            return True
        except OSError:
            return False
    return _in_thread(probe)


@pytest.mark.skipif(not _rr_permitted(), reason="SCHED_RR needs root or CAP_SYS_NICE")
def test_priority_when_realtime_then_thread_and_the_threads_it_starts_run_sched_rr() -> None:
    def body() -> tuple[str, int, int, int]:
        applied = raise_priority("realtime", rt_priority=5)
        child = _in_thread(lambda: (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority))
        return applied, os.sched_getscheduler(0), *child

    applied, policy, child_policy, child_prio = _in_thread(body)
    assert applied == "realtime" and policy == os.SCHED_RR
    assert child_policy == os.SCHED_RR and child_prio == 5  # inherited by later threads
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's other threads untouched


def test_priority_when_nice_or_inherit_then_only_that_applies() -> None:
    def body() -> tuple[str, int, int]:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)
        applied = raise_priority("inherit")
        return applied, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), \
            os.sched_getscheduler(0)

    applied, nice, policy = _in_thread(body)
    assert applied == "inherit" and nice == 5 and policy == os.SCHED_OTHER
    if os.geteuid() == 0:
        got = _in_thread(lambda: (raise_priority("nice", nice=0), os.getpriority(
            os.PRIO_PROCESS, threading.get_native_id())))
        assert got == ("nice", 0)
