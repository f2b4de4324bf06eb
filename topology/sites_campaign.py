"""The campaign rule of :mod:`topology.sites`, and the messages and results it exchanges.

Pure: :func:`campaign_decision` takes everything it decides on as arguments (a clock reading, the
voters reachable, what beacons said), so it is tested without sockets. The rule, first match:

1. a handoff for us arrived less than ``handoff_s`` ago -> campaign (the voters reserved the
   lease for us: a transfer);
2. we transferred the resource away less than ``yield_s`` ago -> stand by (no tug of war);
3. fewer than a majority of the voters are reachable -> stand by: a minority never campaigns
   (and could not win anyway);
4. another site's beacon said ACTIVE and its announced lease, widened by the drift bound, has
   not run out (``heard_at + lease_left_s + presume_slack_s``) -> stand by;
5. we have been in the majority (listening for beacons) for ``preferred_listen_s`` if we are the
   resource's preferred site, else for ``standby_listen_s`` -> campaign;
6. otherwise stand by, listening.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from topology.lease import BodyMessage, HolderState, LeaseConfig, LeaseMessageError

__all__ = ["ActiveElsewhere", "Campaign", "CampaignTiming", "SiteBeacon", "TransferResult",
           "campaign_decision"]


# --------------------------------------------------------------------------------------------
# The campaign rule (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CampaignTiming:
    """The campaign rule's durations, all derived from the resource's :class:`LeaseConfig`
    (ρ = ``max_clock_drift``):

    ``preferred_listen_s = 2 * renew_interval_s``: the preferred site listens this long in the
    majority before campaigning (an active site beacons every ``renew_interval_s``).
    ``standby_listen_s = voter_hold_s + renew_interval_s``: another site listens this long: the
    preferred one has won and beaconed by then, and any lease granted before we listened lapsed.
    ``presume_slack_s = 2 * ρ * lease_s + renew_interval_s / 4``: added to an ACTIVE beacon's
    ``lease_left_s``: a voter's grant outlives the holder's view of the lease by ``2ρ lease_s``;
    a quarter interval covers the beacon's flight and our tick.
    ``handoff_s = voter_hold_s``: a handoff is honoured as long as the voters reserve the lease.
    ``yield_s = 2 * voter_hold_s``: after a transfer the old site does not campaign this long.
    ``target_fresh_s = 3 * renew_interval_s``: a transfer target must have beaconed this recently.
    ``tick_s = renew_interval_s / 4``: the ticker's period.
    """

    preferred_listen_s: float
    standby_listen_s: float
    presume_slack_s: float
    handoff_s: float
    yield_s: float
    target_fresh_s: float
    tick_s: float

    @classmethod
    def from_lease(cls, c: LeaseConfig) -> CampaignTiming:
        return cls(
            preferred_listen_s=2 * c.renew_interval_s,
            standby_listen_s=c.voter_hold_s + c.renew_interval_s,
            presume_slack_s=2 * c.max_clock_drift * c.lease_s + c.renew_interval_s / 4,
            handoff_s=c.voter_hold_s, yield_s=2 * c.voter_hold_s,
            target_fresh_s=3 * c.renew_interval_s, tick_s=c.renew_interval_s / 4)


@dataclass(frozen=True)
class ActiveElsewhere:
    """Another site's holder announced ACTIVE; presumed so until ``until_s`` (our clock)."""

    site: str
    node: str
    holder: str
    epoch: int
    until_s: float


@dataclass(frozen=True)
class Campaign:
    """Whether a standby campaigns, and why (shown in status, recorded when it flips)."""

    wanted: bool
    reason: str


def campaign_decision(now_s: float, *, preferred: bool, voters_reached: int, voters: int,
                      listening_since_s: float | None,
                      active_elsewhere: Iterable[ActiveElsewhere] = (),
                      handoff_until_s: float = -math.inf, handoff_from: str = "",
                      yielded_until_s: float = -math.inf, yielded_to: str = "",
                      timing: CampaignTiming) -> Campaign:
    """The campaign rule of the module docstring (first matching rule wins). Pure."""
    majority = voters // 2 + 1
    if now_s < handoff_until_s:
        return Campaign(True, f"handoff from {handoff_from}: campaigning for the reserved lease")
    if now_s < yielded_until_s:
        return Campaign(False, f"transferred to {yielded_to}; not campaigning for "
                               f"{yielded_until_s - now_s:.3g} s more")
    if voters_reached < majority:
        return Campaign(False, f"minority: reaches {voters_reached}/{voters} voters, needs "
                               f"{majority}")
    live = [a for a in active_elsewhere if now_s < a.until_s]
    if live:
        a = max(live, key=lambda x: (x.epoch, x.until_s))
        return Campaign(False, f"site {a.site} active at epoch {a.epoch} (presumed for "
                               f"{a.until_s - now_s:.3g} s more)")
    need_s = timing.preferred_listen_s if preferred else timing.standby_listen_s
    listened_s = 0.0 if listening_since_s is None else now_s - listening_since_s
    who = "preferred site" if preferred else "standby"
    if listened_s >= need_s:
        return Campaign(True, f"{who}: no active site heard in {listened_s:.3g} s in the "
                              f"majority")
    return Campaign(False, f"{who}: listening for an active site ({listened_s:.3g}/"
                           f"{need_s:.3g} s)")


# --------------------------------------------------------------------------------------------
# Beacon and transfer results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteBeacon(BodyMessage):
    """Controller -> other voters: ``holders`` is one ``[resource, holder_id, state, epoch,
    lease_left_s]`` per resource (``lease_left_s``: the holder's own view, 0 unless ACTIVE)."""

    TYPE: ClassVar[str] = "site_beacon"
    site: str
    node: str
    holders: tuple[Any, ...]

    def entries(self) -> list[tuple[str, str, HolderState, int, float]]:
        """The holder entries, checked. Raises :class:`LeaseMessageError` naming the bad one."""
        out = []
        for e in self.holders:
            ok = (isinstance(e, list | tuple) and len(e) == 5 and isinstance(e[0], str)
                  and isinstance(e[1], str) and e[2] in HolderState.__members__
                  and isinstance(e[3], int) and not isinstance(e[3], bool) and e[3] >= 0
                  and isinstance(e[4], int | float) and not isinstance(e[4], bool)
                  and math.isfinite(e[4]) and e[4] >= 0)
            if not ok:
                raise LeaseMessageError("holders", e, "each must be [resource, holder, state, "
                                                      "epoch >= 0, lease_left_s >= 0]")
            out.append((e[0], e[1], HolderState(e[2]), int(e[3]), float(e[4])))
        return out


@dataclass(frozen=True)
class TransferResult:
    """What :meth:`SiteRoles.transfer` did: ``accepted`` (the lease was released for
    ``to_holder``, who got a handoff), else ``reason`` says why nothing happened."""

    accepted: bool
    resource: str
    to_site: str
    reason: str
    to_holder: str | None = None
    epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "resource": self.resource, "to_site": self.to_site,
                "reason": self.reason, "to_holder": self.to_holder, "epoch": self.epoch}
