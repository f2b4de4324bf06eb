"""The mesh as Ray metrics (``ray.util.metrics``; Prometheus names get a ``ray_`` prefix).

A :class:`MeshMetrics` thread in each agent actor exports, every ``every_s``:

* ``bastion_mesh_phi{node, peer, peer_site}``: the phi-accrual suspicion level of each peer
  (what the failure detector compares with its threshold);
* ``bastion_mesh_peer_alive{node, peer, peer_site}``: 1 while the peer is ``alive``;
* on a site's controller, per resource: ``bastion_site_lease_epoch{site, resource}`` and
  ``bastion_site_active{site, resource}`` (1 while this site may act).

Failures are counted and never raised: metrics must not disturb the heartbeat path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["MeshMetrics"]

log = logging.getLogger(__name__)

_SPECS = {
    "bastion_mesh_phi": ("phi-accrual suspicion of a peer", ("node", "peer", "peer_site")),
    "bastion_mesh_peer_alive": ("1 while the peer is alive", ("node", "peer", "peer_site")),
    "bastion_site_lease_epoch": ("lease epoch this site holds (or last held)",
                                 ("site", "resource")),
    "bastion_site_active": ("1 while this site may act for the resource", ("site", "resource")),
}


class MeshMetrics:
    """Exports ``status()`` (the agent's) and ``roles()`` (the site roles' status or None)."""

    def __init__(self, node_id: str, site: str, status: Callable[[], dict[str, Any]],
                 roles: Callable[[], dict[str, Any] | None], every_s: float = 2.0) -> None:
        self.node_id, self.site = node_id, site
        self._status, self._roles = status, roles
        self.every_s = every_s
        self.failures = 0
        self.exports = 0
        self._gauges: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mesh-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _set(self, name: str, value: float, tags: dict[str, str]) -> None:
        gauge = self._gauges.get(name)
        if gauge is None:
            from ray.util.metrics import Gauge

            description, keys = _SPECS[name]
            gauge = self._gauges[name] = Gauge(name, description=description, tag_keys=keys)
        gauge.set(float(value), tags=tags)

    def export_once(self) -> None:
        node = self.node_id[:12]
        for peer, m in self._status()["members"].items():
            tags = {"node": node, "peer": peer[:12], "peer_site": str(m.get("site"))}
            if m.get("phi") is not None:
                self._set("bastion_mesh_phi", m["phi"], tags)
            self._set("bastion_mesh_peer_alive", 1.0 if m.get("state") == "alive" else 0.0,
                      tags)
        roles = self._roles()
        for resource, r in ((roles or {}).get("resources") or {}).items():
            tags = {"site": self.site, "resource": resource}
            self._set("bastion_site_lease_epoch", float(r.get("epoch") or 0), tags)
            self._set("bastion_site_active", 1.0 if r.get("may_act") else 0.0, tags)
        self.exports += 1

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.export_once()
            except Exception as exc:  # noqa: BLE001 - never disturb the agent
                self.failures += 1
                if self.failures in (1, 100):
                    log.warning("mesh metrics: %r (failure %d)", exc, self.failures)
