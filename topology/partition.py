"""The partition picture: from who-hears-whom views to groups, bridges and the majority.

Input: one reachability view per node (``View.reachable``: peer -> heard directly), which may
disagree (A hears B, B does not hear A). Output, from :func:`analyze`, a
:class:`PartitionPicture`:

- **links**: A and B are *linked* when each hears the other (mutual reachability). A link heard
  one way only is **asymmetric** (reported as ``(hears, not_heard_back)``; only between nodes
  whose views are fresh, so a stale view does not invent asymmetry).
- **bridges**: a node whose removal splits its linked component into two or more parts of at
  least ``min_side`` (2) nodes each — it can reach groups that cannot reach each other. A node
  that merely hangs off one other node (a pendant, one broken link in a triangle) makes nobody a
  bridge: messages get relayed, that is not a partition.
- **groups**: the linked components once bridges are taken out. One group and no bridge: whole;
  anything else: ``partitioned``. A group of one with no link at all is also **isolated**. A node
  nobody hears looks the same whether it crashed or was cut off: it is isolated until the caller
  drops it (``down=`` / the tracker forgets it after ``forget_after_s``).
- **votes** (sites + witnesses, :class:`Voters`): a site's vote goes to the group holding
  *strictly more than half of the site's roster* — its configured nodes, dead ones included —
  and to nobody on a tie. Rosters, not live nodes, because two observers on opposite sides of a
  cut each see only their own side alive: with live-node denominators both would award
  themselves the site. A witness's vote goes to the group that contains it. Bridges hold no
  vote (a witness bridging two sites that cannot see each other is the classic tie: both sides
  could win it, so neither is given it; such votes are listed in ``unheld``). The ``majority``
  is the group holding more than half of all votes; with votes disjoint across groups there is
  at most one.

The picture is advisory — it tells operators and the failover controller where the majority
most likely is. Safety (never two active sites) rests on the lease, which a majority of voters
must actually grant (``topology/lease.py``).

:class:`PartitionTracker` keeps the latest view per node, re-analyses on demand and publishes
``partitioned`` / ``healed`` :class:`PartitionEvent` s when the picture changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from topology.frames import View
from topology.membership import EventQueue

__all__ = ["Bridge", "Group", "PartitionEvent", "PartitionPicture", "PartitionTracker",
           "Voters", "analyze"]


@dataclass(frozen=True)
class Voters:
    """Who votes: each site (by roster) and each witness node, one vote each."""

    sites: Mapping[str, frozenset[str]]
    witnesses: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for site, roster in self.sites.items():
            if not roster:
                raise ValueError(f"voters.sites[{site!r}]: a site needs at least one node")
        overlap = self.witnesses & frozenset().union(*self.sites.values())
        if overlap:
            raise ValueError(f"voters.witnesses = {sorted(overlap)}: also in a site roster")

    @classmethod
    def from_node_sites(cls, node_sites: Mapping[str, str],
                        witnesses: Iterable[str] = ()) -> Voters:
        """Rosters from a node -> site map (witness nodes left out of the rosters)."""
        wit = frozenset(witnesses)
        rosters: dict[str, set[str]] = {}
        for node, site in node_sites.items():
            if node not in wit:
                rosters.setdefault(site, set()).add(node)
        return cls({s: frozenset(r) for s, r in rosters.items()}, wit)

    @property
    def total(self) -> int:
        return len(self.sites) + len(self.witnesses)


@dataclass(frozen=True)
class Group:
    """Nodes that reach each other (through links), sorted; the votes they hold."""

    nodes: tuple[str, ...]
    sites: tuple[str, ...] = ()
    witnesses: tuple[str, ...] = ()

    @property
    def votes(self) -> int:
        return len(self.sites) + len(self.witnesses)


@dataclass(frozen=True)
class Bridge:
    """A node linking groups (indexes into ``PartitionPicture.groups``) that cannot reach each
    other without it."""

    node: str
    groups: tuple[int, ...]


@dataclass(frozen=True)
class PartitionPicture:
    groups: tuple[Group, ...]
    bridges: tuple[Bridge, ...] = ()
    isolated: tuple[str, ...] = ()
    asymmetric: tuple[tuple[str, str], ...] = ()
    stale: tuple[str, ...] = ()        # nodes whose view is old (still used)
    unknown: tuple[str, ...] = ()      # nodes heard of without a view (assumed to hear nobody)
    down: tuple[str, ...] = ()         # nodes the caller excluded
    majority: int | None = None        # index of the group holding > half of the votes
    total_votes: int = 0
    unheld: tuple[str, ...] = ()       # voters (site names, witness ids) no group holds

    @property
    def partitioned(self) -> bool:
        return len(self.groups) > 1 or bool(self.bridges)

    def group_of(self, node: str) -> int | None:
        return next((i for i, g in enumerate(self.groups) if node in g.nodes), None)

    def has_majority(self, node: str) -> bool:
        """Whether ``node`` is in the majority group."""
        return self.majority is not None and self.group_of(node) == self.majority

    @property
    def shape(self) -> tuple:
        """What the events compare: groups, bridges and the majority."""
        return (tuple(g.nodes for g in self.groups), tuple(b.node for b in self.bridges),
                self.majority)

    def summary(self) -> str:
        def group(i: int, g: Group) -> str:
            tag = ", majority" if i == self.majority else ""
            votes = f" ({g.votes}/{self.total_votes} votes{tag})" if self.total_votes else ""
            return "[" + " ".join(g.nodes) + "]" + votes
        parts = [f"{len(self.groups)} group{'s' if len(self.groups) != 1 else ''}: "
                 + " | ".join(group(i, g) for i, g in enumerate(self.groups))]
        if self.bridges:
            parts.append("bridges: " + ", ".join(
                f"{b.node} -> {list(b.groups)}" for b in self.bridges))
        if self.isolated:
            parts.append("isolated: " + " ".join(self.isolated))
        if self.asymmetric:
            parts.append("one-way: " + " ".join(f"{a}->{b}" for a, b in self.asymmetric))
        if self.unheld:
            parts.append("unheld votes: " + " ".join(self.unheld))
        return "; ".join(parts)


def analyze(views: Mapping[str, Mapping[str, bool]], *, members: Iterable[str] | None = None,
            voters: Voters | None = None, stale: Iterable[str] = (), down: Iterable[str] = (),
            min_side: int = 2) -> PartitionPicture:
    """The partition picture of ``views`` (node -> {peer: heard}).

    ``members``: the nodes the picture is about (default: every node with a view or named in
    one); ``stale``: nodes whose view is old — used, but not for asymmetry; ``down``: nodes to
    leave out of groups (e.g. those membership declared dead); their roster places still count.
    ``voters``: default one vote per member (each shown in ``Group.sites`` under its own id).
    Pure and deterministic.
    """
    excluded = frozenset(down)
    if members is None:
        universe = set(views) | {p for v in views.values() for p in v}
    else:
        universe = set(members)
    nodes = sorted(universe - excluded)
    node_set = set(nodes)
    stale_set = frozenset(stale) & node_set

    def hears(a: str, b: str) -> bool:
        return bool(views.get(a, {}).get(b, False))

    links: dict[str, set[str]] = {n: set() for n in nodes}
    asymmetric = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            ab, ba = hears(a, b), hears(b, a)
            if ab and ba:
                links[a].add(b)
                links[b].add(a)
            elif ab != ba and a in views and b in views and not {a, b} & stale_set:
                asymmetric.append((a, b) if ab else (b, a))

    bridges = [n for n in nodes if len(links[n]) >= 2 and _splits(links, n, min_side)]
    bridge_set = set(bridges)
    groups_nodes = _components(links, [n for n in nodes if n not in bridge_set])
    groups_nodes.sort(key=lambda g: (-len(g), g))
    where = {n: i for i, g in enumerate(groups_nodes) for n in g}

    if voters is None:
        voters = Voters({n: frozenset([n]) for n in universe}) if universe else Voters({})
    groups, held = [], set()
    for g in groups_nodes:
        members_g = set(g)
        sites = tuple(sorted(s for s, roster in voters.sites.items()
                             if 2 * len(roster & members_g) > len(roster)))
        witnesses = tuple(sorted(w for w in voters.witnesses if w in members_g))
        held.update(sites, witnesses)
        groups.append(Group(tuple(g), sites, witnesses))
    majority = next((i for i, g in enumerate(groups) if 2 * g.votes > voters.total), None)
    unheld = tuple(sorted((set(voters.sites) | set(voters.witnesses)) - held))

    return PartitionPicture(
        groups=tuple(groups),
        bridges=tuple(Bridge(b, tuple(sorted({where[p] for p in links[b] if p in where})))
                      for b in bridges),
        isolated=tuple(n for n in nodes if not links[n]),
        asymmetric=tuple(sorted(asymmetric)),
        stale=tuple(sorted(stale_set)),
        unknown=tuple(n for n in nodes if n not in views),
        down=tuple(sorted(excluded & universe)),
        majority=majority,
        total_votes=voters.total,
        unheld=unheld,
    )


def _components(links: Mapping[str, set[str]], nodes: Iterable[str]) -> list[list[str]]:
    """Connected components of ``links`` restricted to ``nodes``; each sorted."""
    allowed = set(nodes)
    seen: set[str] = set()
    out = []
    for start in sorted(allowed):
        if start in seen:
            continue
        comp, stack = [], [start]
        seen.add(start)
        while stack:
            n = stack.pop()
            comp.append(n)
            for p in links[n]:
                if p in allowed and p not in seen:
                    seen.add(p)
                    stack.append(p)
        out.append(sorted(comp))
    return out


def _splits(links: Mapping[str, set[str]], node: str, min_side: int) -> bool:
    """Whether removing ``node`` leaves >= 2 parts of >= ``min_side`` among its component."""
    [component] = [c for c in _components(links, links) if node in c]
    parts = _components(links, [n for n in component if n != node])
    return sum(1 for p in parts if len(p) >= min_side) >= 2


# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PartitionEvent:
    """``kind``: ``partitioned`` (the picture became, or stays but changed, partitioned) or
    ``healed`` (one group again)."""

    kind: str
    ts_s: float
    picture: PartitionPicture
    reason: str


@dataclass
class _Seen:
    reachable: dict[str, bool]
    at_s: float
    incarnation: int = 0


class PartitionTracker:
    """The latest view of every node, and events when the picture they give changes.

    Feed it every View received (``observe``) and our own reachability (``update`` with our
    node id), then call ``evaluate(now_s)`` (each gossip interval is enough). A view older than
    ``stale_after_s`` is kept — a node that crashed still shows what it last heard, and the
    fresh views of the others, no longer hearing it, isolate it — but flagged stale; one older
    than ``forget_after_s`` is dropped with its node (use the membership reap time). Members are
    the nodes with a view plus those a fresh view hears.

    Views arrive one node at a time, so a split or a heal passes through passing shapes (the
    first node to hear the other side again is briefly a bridge; at start-up nobody has
    reported yet). A new shape is published only once it has held for ``settle_s``
    (2 x gossip_interval_s is enough); before the first publication the mesh counts as whole.
    """

    def __init__(self, node_id: str, *, stale_after_s: float, forget_after_s: float,
                 settle_s: float = 0.0, voters: Voters | None = None) -> None:
        if not 0 < stale_after_s <= forget_after_s:
            raise ValueError(f"stale_after_s = {stale_after_s!r}: must be > 0 and <= "
                             f"forget_after_s = {forget_after_s!r}")
        if not settle_s >= 0:
            raise ValueError(f"settle_s = {settle_s!r}: must be >= 0")
        self.node_id = node_id
        self.stale_after_s = stale_after_s
        self.forget_after_s = forget_after_s
        self.settle_s = settle_s
        self.voters = voters
        #: partitioned / healed, in order.
        self.events: EventQueue[PartitionEvent] = EventQueue()
        #: The last picture evaluated (None before the first evaluate), settled or not.
        self.picture: PartitionPicture | None = None
        #: The last picture published in an event (None: none yet, the mesh counts as whole).
        self.published: PartitionPicture | None = None
        self._pending: tuple[tuple, float] | None = None   # (shape, first seen at)
        self._views: dict[str, _Seen] = {}

    def observe(self, view: View, now_s: float) -> bool:
        """A View frame arrived; False (ignored) if older than the one held for its node."""
        seen = self._views.get(view.node_id)
        if seen is not None and view.incarnation < seen.incarnation:
            return False
        self._views[view.node_id] = _Seen(dict(view.reachable), now_s, view.incarnation)
        return True

    def update(self, node_id: str, reachable: Mapping[str, bool], now_s: float) -> None:
        """Set a node's view directly (our own, from ``Membership.reachable``)."""
        self._views[node_id] = _Seen(dict(reachable), now_s)

    def forget(self, node_id: str) -> None:
        self._views.pop(node_id, None)

    def evaluate(self, now_s: float, *, down: Iterable[str] = ()) -> PartitionPicture:
        """Analyse the views held at ``now_s``; publish an event if the picture changed."""
        for node in [n for n, s in self._views.items()
                     if n != self.node_id and now_s - s.at_s > self.forget_after_s]:
            del self._views[node]
        views = {n: s.reachable for n, s in self._views.items()}
        fresh_heard = {p for n, s in self._views.items() if now_s - s.at_s <= self.stale_after_s
                       for p, ok in s.reachable.items() if ok}
        members = set(views) | fresh_heard
        stale = [n for n, s in self._views.items() if now_s - s.at_s > self.stale_after_s]
        picture = analyze(views, members=members, voters=self.voters, stale=stale, down=down)
        self.picture = picture
        before = self.published
        if (before.shape if before is not None else None) == picture.shape or \
                (before is None and not picture.partitioned):
            self._pending = None
            if before is not None:
                self.published = picture  # same shape: keep details (asymmetry, stale) fresh
            return picture
        if self._pending is None or self._pending[0] != picture.shape:
            self._pending = (picture.shape, now_s)
        if now_s - self._pending[1] < self.settle_s:
            return picture
        self._pending = None
        self.published = picture
        if picture.partitioned:
            self.events.put(PartitionEvent("partitioned", now_s, picture, picture.summary()))
        elif before is not None and before.partitioned:
            self.events.put(PartitionEvent("healed", now_s, picture, picture.summary()))
        return picture
