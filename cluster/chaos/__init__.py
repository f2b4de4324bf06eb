"""Fault injection that really happens, for tests and chaos runs.

* :mod:`cluster.chaos.faults` — one injector per fault kind (kill an actor, a supervisor, a
  node; pause a process or a node; partitions, loss and delay on links; a clock jump; venue
  faults; a corrupt journal record), each verified by its effect, with its undo.
* :mod:`cluster.chaos.context` — :class:`~cluster.chaos.context.ChaosContext` and
  :class:`~cluster.chaos.context.LiveSystem`, the adapter on a running system (with
  :mod:`cluster.chaos.links`, the only chaos code that calls Ray); chaos refuses a system not
  marked non-production.
* :mod:`cluster.chaos.scenario` — seeded YAML scenarios, their plan and the runner that
  records into a run history; :mod:`cluster.chaos.command` is ``bastion chaos``.
* :mod:`cluster.chaos.netns` — :class:`NetLab`, Linux network namespaces joined by a bridge, with
  nftables drop rules for partitions (halves, one node, bridge, one-way) and random loss (root).
* :mod:`cluster.chaos.delay_proxy` — :class:`DelayProxy`, a user-space TCP proxy that adds
  latency, jitter and connection cuts (the kernel here has no netem; needs no root).
"""
