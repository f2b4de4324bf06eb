"""The witness: a tiny mesh member in a third place that only votes, so two sites can break
ties. It is an agent process with ``voter_only`` and a :class:`~topology.lease.LeaseVoter`
answering lease requests that ride the mesh as payloads of kind :data:`LEASE_KIND`::

    python -m topology.witness --config witness.json
    # same config as topology.agent, plus
    #   "lease_voter": {"store": "witness-promises.json", "preset": "local"}

Give the witness a site of its own (e.g. ``"site": "witness"``): the partition picture then
counts it as one more vote. :func:`serve_lease_voter` attaches a voter to any agent (each site's
agent hosts one too).
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from topology.agent import MeshAgent
from topology.lease import (
    FilePromiseStore,
    LeaseConfig,
    LeaseMessageError,
    LeaseVoter,
    decode_lease_message,
)

__all__ = ["LEASE_KIND", "LeaseVoterService", "main", "serve_lease_voter"]

log = logging.getLogger(__name__)

#: Payload kind of lease traffic on the mesh (requests, replies, releases, handoffs).
LEASE_KIND = "lease"


class LeaseVoterService:
    """Feeds lease payloads arriving at ``agent`` to ``voter`` and sends its replies back to
    the node that asked. Runs on the agent's payload thread (one message at a time)."""

    def __init__(self, agent: MeshAgent, voter: LeaseVoter) -> None:
        self.agent = agent
        self.voter = voter
        #: Messages handled, replies sent, bodies refused as malformed.
        self.counts: Counter[str] = Counter()
        agent.on_payload(LEASE_KIND, self._on_payload)

    def _on_payload(self, from_node: str, body: Mapping[str, Any]) -> None:
        try:
            msg = decode_lease_message(body)
        except LeaseMessageError as exc:
            self.counts["malformed"] += 1
            log.warning("%s: malformed lease message from %s: %s", self.agent.node_id,
                        from_node, exc)
            return
        self.counts["handled"] += 1
        reply = self.voter.handle(msg, self.agent.clock.now_s())
        if reply is not None:
            self.agent.send_payload(from_node, LEASE_KIND, reply.to_body())
            self.counts["replied"] += 1

    def __repr__(self) -> str:
        return f"LeaseVoterService(voter={self.voter.voter_id!r}, counts={dict(self.counts)})"


def serve_lease_voter(agent: MeshAgent, spec: Mapping[str, Any], base: Path) -> LeaseVoterService:
    """A voter named after the agent's node, its promises in ``spec["store"]`` (relative to
    ``base``), timing from ``spec["preset"]`` (default ``local``) and ``spec["overrides"]``.

    Raises:
        ValueError: ``store`` missing, or the lease config invalid.
    """
    unknown = set(spec) - {"store", "preset", "overrides"}
    if unknown or "store" not in spec:
        raise ValueError(f"lease_voter = {dict(spec)!r}: needs 'store', may have 'preset' and "
                         f"'overrides' (unknown: {sorted(unknown)})")
    store = Path(spec["store"])
    config = LeaseConfig.preset(spec.get("preset", "local"), **spec.get("overrides", {}))
    voter = LeaseVoter(agent.node_id, config,
                       FilePromiseStore(store if store.is_absolute() else base / store),
                       agent.clock.now_s())
    return LeaseVoterService(agent, voter)


def main(argv: list[str] | None = None) -> int:
    """``python -m topology.witness --config FILE``: an agent process with ``voter_only``."""
    from topology.agent_process import main as agent_main

    return agent_main(argv, voter_only=True)


if __name__ == "__main__":
    sys.exit(main())
