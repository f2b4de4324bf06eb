"""Whether a connector may send new orders: only while its site holds the venue's lease.

In a multi-site deployment every site runs a connector per venue, on the same venue account;
exactly one site holds the venue's lease (``topology.sites``) and only its connector orders.
The lease layer sends role events (by ``on_role_event``)::

    {"kind": "activate" | "renew", "resource": venue, "epoch": E, "valid_for_s": T,
     "sent_wall_s": W}
    {"kind": "deactivate", "resource": venue, "epoch": E, "reason": "..."}

The gate turns ``valid_for_s`` into a local deadline, conservatively: ``receipt + T - (time
the event spent in transit, from the wall clocks) - margin_s``. New orders pass only while
ACTIVE and before that deadline; when it passes without a renewal the gate lapses to STANDBY
by itself — a connector cut off from its site's lease stops ordering on its own, before the
lease ends (the lease's holder window already ends ``stop_margin_s`` before the voters'
grant). Events with an epoch lower than the highest seen are stale and dropped (a restarted
or delayed old holder can never re-activate a newer gate). Every order sent while ACTIVE is
stamped with the epoch (label ``e<epoch>.<...>``), and the venue refuses labels older than
the highest epoch it has seen (``VenueEngine._fence``): the second line of defence.

States (one table, ``TRANSITIONS``): STANDBY → (activate) ACTIVATING → (reconciled) ACTIVE →
(deactivate | lapse) STANDBY. ACTIVATING is the reconciliation with the venue the connector
runs before its first order as the new active: fills and open orders are the venue's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

TRANSITIONS: Mapping[tuple[str, str], str] = {
    ("STANDBY", "activate"): "ACTIVATING",
    ("ACTIVATING", "reconciled"): "ACTIVE",
    ("ACTIVATING", "deactivate"): "STANDBY",
    ("ACTIVATING", "lapse"): "STANDBY",
    ("ACTIVE", "deactivate"): "STANDBY",
    ("ACTIVE", "lapse"): "STANDBY",
}


class RoleGate:
    """The gate of one connector (``enabled=False``: a single-site deployment, always open)."""

    def __init__(self, enabled: bool, resource: str, margin_s: float = 0.05) -> None:
        self.enabled = enabled
        self.resource = resource
        self.margin_s = margin_s
        self.state = "STANDBY"
        self.epoch = 0
        self.deadline_s = -math.inf  # monotonic
        self.history: list[tuple[float, str, str, str]] = []
        self.counts: Counter[str] = Counter()

    def _transition(self, trigger: str, now_s: float, reason: str) -> bool:
        to = TRANSITIONS.get((self.state, trigger))
        if to is None:
            return False
        self.history.append((now_s, self.state, to, reason))
        del self.history[:-50]
        self.state = to
        return True

    def on_event(self, event: Mapping[str, Any], now_s: float, wall_s: float) -> str | None:
        """Take a role event; returns ``"activate"`` when the connector must now reconcile and
        then call :meth:`reconciled`, ``"deactivate"`` when it must stop (cancel its resting
        orders), else None. Malformed or foreign events are counted and ignored."""
        kind = event.get("kind")
        epoch = event.get("epoch")
        if event.get("resource") != self.resource or not isinstance(epoch, int) or \
                isinstance(epoch, bool) or kind not in ("activate", "renew", "deactivate"):
            self.counts["ignored"] += 1
            return None
        if epoch < self.epoch:
            self.counts["stale"] += 1
            return None
        if kind == "deactivate":
            if epoch == self.epoch and self._transition("deactivate", now_s,
                                                       str(event.get("reason", ""))):
                self.deadline_s = -math.inf
                return "deactivate"
            return None
        valid_for_s, sent_wall_s = event.get("valid_for_s"), event.get("sent_wall_s", wall_s)
        if not isinstance(valid_for_s, int | float) or not math.isfinite(valid_for_s) or \
                not isinstance(sent_wall_s, int | float) or not math.isfinite(sent_wall_s):
            self.counts["malformed"] += 1
            return None
        transit_s = max(0.0, wall_s - float(sent_wall_s))
        deadline = now_s + float(valid_for_s) - transit_s - self.margin_s
        newer = epoch > self.epoch
        if newer and self.state != "STANDBY":  # a newer lease while holding an old one
            self._transition("deactivate", now_s, f"superseded by epoch {epoch}")
        self.epoch = epoch
        self.deadline_s = deadline
        self.counts[kind] += 1
        if self.state == "STANDBY" and self._transition("activate", now_s,
                                                        f"lease epoch {epoch}"):
            return "activate"
        return None

    def reconciled(self, now_s: float) -> bool:
        """The venue reconciliation of an activation finished: ACTIVE if still in time."""
        if self.state != "ACTIVATING" or now_s >= self.deadline_s:
            self.lapse_if_due(now_s)
            return False
        return self._transition("reconciled", now_s, "reconciled with the venue")

    def lapse_if_due(self, now_s: float) -> bool:
        """STANDBY once the deadline has passed without a renewal; True if it just lapsed."""
        if self.state in ("ACTIVE", "ACTIVATING") and now_s >= self.deadline_s:
            self.counts["lapsed"] += 1
            return self._transition("lapse", now_s, f"no renewal of epoch {self.epoch} in time")
        return False

    def may_send(self, now_s: float) -> bool:
        if not self.enabled:
            return True
        self.lapse_if_due(now_s)
        return self.state == "ACTIVE" and now_s < self.deadline_s

    def refusal(self, now_s: float) -> str:
        left = self.deadline_s - now_s
        return (f"site not active for {self.resource}: role {self.state}, epoch {self.epoch}"
                + (f", lease left {left:.3f} s" if math.isfinite(left) else ""))

    def label(self, base: str) -> str:
        """The order label, stamped with the epoch when gated."""
        return f"e{self.epoch}.{base}" if self.enabled else base

    def status(self, now_s: float) -> dict[str, Any]:
        left = self.deadline_s - now_s
        return {"enabled": self.enabled, "state": self.state, "epoch": self.epoch,
                "lease_left_s": round(left, 4) if math.isfinite(left) else None,
                "counts": dict(self.counts),
                "history": [list(h) for h in self.history[-10:]]}
