"""Fault injection that really happens: network partitions, loss and latency for tests and chaos.

* :mod:`cluster.chaos.netns` — :class:`NetLab`, Linux network namespaces joined by a bridge, with
  nftables drop rules for partitions (halves, one node, bridge, one-way) and random loss (root).
* :mod:`cluster.chaos.delay_proxy` — :class:`DelayProxy`, a user-space TCP proxy that adds
  latency, jitter and connection cuts (the kernel here has no netem; needs no root).
"""
