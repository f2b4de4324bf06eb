"""CPU priority for the threads that keep a node's heartbeats on time.

A failure detector is only as good as its own scheduling: an agent that waits behind CPU-bound
work sends late heartbeats and reads frames late, and its peers suspect a healthy node (the
soak benchmark counts exactly that). Corosync, for the same reason, runs its token loop under
``SCHED_RR``. :func:`raise_priority` gives the calling thread — and, since Linux scheduling
attributes are per thread and inherited, every thread it starts afterwards — in order of
preference:

* ``"realtime"``: ``SCHED_RR`` at ``rt_priority`` (1..99; low values suffice: any real-time
  thread runs before every normal one). The kernel's real-time throttling
  (``sched_rt_runtime_us``, 95 % by default) still leaves CPU to everything else should an
  agent ever spin. Needs root or ``CAP_SYS_NICE``; falls back to ``"nice"``.
* ``"nice"``: ``SCHED_OTHER`` at nice ``nice`` (0 lifts a Ray worker's nice 15; below the
  current value needs root).
* ``"inherit"``: leave it.

Returns what was applied (``"realtime"``, ``"nice"`` or ``"inherit"``), never raises.
"""

from __future__ import annotations

import os
import threading
from typing import Literal

__all__ = ["Priority", "raise_priority"]

Priority = Literal["realtime", "nice", "inherit"]


def raise_priority(mode: Priority = "realtime", *, rt_priority: int = 10,
                   nice: int | None = 0) -> Priority:
    """See the module docstring."""
    tid = threading.get_native_id()
    if mode == "realtime":
        try:
            os.sched_setscheduler(tid, os.SCHED_RR, os.sched_param(rt_priority))
            return "realtime"
        except (PermissionError, OSError, AttributeError, ValueError):
            mode = "nice"
    if mode == "nice" and nice is not None:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            return "nice"
        except (PermissionError, OSError):
            pass
    return "inherit"
