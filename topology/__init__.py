"""Generic cluster topology: the ZeroMQ heartbeat mesh, failure detection, partitions and
site failover (issue 4). Knows nothing of trading."""
