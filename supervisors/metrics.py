"""Ray metrics of supervision trees (``ray.util.metrics``: the dashboard's metrics views and
Prometheus scrape them from every node's metrics agent, prefixed ``ray_``).

Every supervisor exports its children, after each change of state (no polling):

* ``bastion_child_up{tree, path, supervisor}``: 1 while the child runs, else 0;
* ``bastion_child_restarts{tree, path}``: restarts since the tree started (a gauge holding the
  supervisor's count, which survives supervisor restarts, rather than a per-process counter);
* ``bastion_child_start_time_seconds{tree, path}``: wall time of its last start (uptime is
  ``time() - this`` in PromQL);
* ``bastion_supervisor_restarts_in_period{tree, path}``: restarts inside the intensity window,
  beside ``bastion_supervisor_intensity`` (the limit): how close it is to giving up.

:class:`Gauges` is the small shared helper: gauges made lazily (``ray.util.metrics`` needs a
Ray worker), values set with tags, errors counted and never raised — metrics must never
break what they describe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["Gauges", "TreeMetrics"]

log = logging.getLogger(__name__)


class Gauges:
    """Named ``ray.util.metrics.Gauge`` objects with fixed tag keys, made on first use."""

    def __init__(self, specs: Mapping[str, tuple[str, tuple[str, ...]]]) -> None:
        self._specs = dict(specs)  # name -> (description, tag keys)
        self._gauges: dict[str, Any] = {}
        self.failures = 0
        self.last_set_s: float | None = None

    def set(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        try:
            gauge = self._gauges.get(name)
            if gauge is None:
                from ray.util.metrics import Gauge

                description, keys = self._specs[name]
                gauge = self._gauges[name] = Gauge(name, description=description,
                                                   tag_keys=keys)
            gauge.set(float(value), tags={k: str(v) for k, v in tags.items()})
            self.last_set_s = time.time()
        except Exception as exc:  # noqa: BLE001 - never let metrics break the actor
            self.failures += 1
            if self.failures in (1, 100, 10_000):
                log.warning("metric %s: %r (failure %d)", name, exc, self.failures)


_TREE_GAUGES = {
    "bastion_child_up": ("1 while the supervised child runs, else 0",
                         ("tree", "path", "supervisor")),
    "bastion_child_restarts": ("restarts of the supervised child since its tree started",
                               ("tree", "path")),
    "bastion_child_start_time_seconds": ("wall time of the child's last start",
                                         ("tree", "path")),
    "bastion_supervisor_restarts_in_period": ("restarts inside the supervisor's intensity "
                                              "window", ("tree", "path")),
    "bastion_supervisor_intensity": ("restarts allowed in the intensity window",
                                     ("tree", "path")),
}


class TreeMetrics:
    """What one supervisor exports (see the module docstring)."""

    def __init__(self, tree: str, supervisor: str) -> None:
        self.tree = tree
        self.supervisor = supervisor
        self.gauges = Gauges(_TREE_GAUGES)

    def update(self, children: Iterable[Mapping[str, Any]], restarts_in_period: int,
               intensity: int) -> None:
        g, tree = self.gauges, self.tree
        for info in children:
            path = str(info["actor_name"])
            g.set("bastion_child_up", 1.0 if info["status"] == "running" else 0.0,
                  {"tree": tree, "path": path, "supervisor": self.supervisor})
            g.set("bastion_child_restarts", float(info["restarts"]),
                  {"tree": tree, "path": path})
            if info.get("started_at"):
                g.set("bastion_child_start_time_seconds", float(info["started_at"]),
                      {"tree": tree, "path": path})
        g.set("bastion_supervisor_restarts_in_period", float(restarts_in_period),
              {"tree": tree, "path": self.supervisor})
        g.set("bastion_supervisor_intensity", float(intensity),
              {"tree": tree, "path": self.supervisor})
