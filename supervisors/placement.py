"""Choosing a node for a child: site, labels, anti-affinity, preference, spread. Pure Python."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .spec import Placement


class PlacementError(RuntimeError):
    """No alive node satisfies a child's placement; the message says what was asked."""


@dataclass(frozen=True)
class Candidate:
    node_id: str
    name: str
    is_head: bool
    labels: Mapping[str, str]
    resources: Mapping[str, float]


def choose_node(
    path: str,
    placement: Placement,
    nodes: Iterable[Candidate],
    *,
    excluded: set[str],
    group_nodes: set[str],
    load: Mapping[str, int],
    need: Mapping[str, float],
) -> str:
    """Pick a node id for ``path`` or raise :class:`PlacementError`.

    ``excluded``: nodes known down; ``group_nodes``: nodes already holding a member of the
    child's anti-affinity group; ``load``: how many of the tree's children each node holds;
    ``need``: resources the child asks for (checked against the node's totals).
    Worker nodes are preferred to the head; then preferred nodes; then the least loaded.
    """
    ok = []
    for node in nodes:
        if node.node_id in excluded:
            continue
        if placement.site is not None and node.labels.get("site") != placement.site:
            continue
        if any(node.labels.get(k) != v for k, v in placement.labels.items()):
            continue
        if placement.anti_affinity and node.node_id in group_nodes:
            continue
        if any(node.resources.get(r, 0.0) < amount for r, amount in need.items() if amount > 0):
            continue
        ok.append(node)
    if not ok:
        raise PlacementError(
            f"{path}: no alive node satisfies placement site={placement.site!r} "
            f"labels={dict(placement.labels)} anti_affinity={placement.anti_affinity!r} "
            f"need={dict(need)} (excluded {len(excluded)} down node(s))")
    preferred = set(placement.preferred_nodes)

    def rank(node: Candidate) -> tuple[int, int, int, str]:
        is_pref = node.name in preferred or node.node_id in preferred
        return (int(node.is_head), int(not is_pref), load.get(node.node_id, 0), node.name)

    return min(ok, key=rank).node_id
