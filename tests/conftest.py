"""Shared fixtures: one real multi-node Ray cluster per session, a namespace and a journal per
test, and a check that nothing is left running afterwards."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # must precede `import ray`

import contextlib
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from cluster.local import LocalCluster, NodeConfig


def wait_until(fn: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition",
               interval_s: float = 0.02) -> Any:
    """Poll ``fn`` until it returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            last_exc = None
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last error
            last_exc = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}; "
                         f"last value {last!r}; last error {last_exc!r}")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


CLUSTER_NODES = [
    NodeConfig("head", site="tokyo", zone="a", num_cpus=0),
    NodeConfig("tokyo-1", site="tokyo", zone="a", num_cpus=4),
    NodeConfig("tokyo-2", site="tokyo", zone="b", num_cpus=4),
    NodeConfig("london-1", site="london", zone="a", num_cpus=4),
]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real 4-node Ray cluster (head + tokyo-1, tokyo-2, london-1) for the whole session.

    Tests that crash nodes add their own nodes to it and crash those."""
    import ray

    work_dir = Path(f"/tmp/bt-{uuid.uuid4().hex[:8]}")
    cluster = LocalCluster.start(CLUSTER_NODES, work_dir=work_dir)
    try:
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        ours = cluster.pids()
        cluster.shutdown()
        shutil.rmtree(work_dir, ignore_errors=True)
    # Nothing of this cluster may outlive it (checked by PID: other Ray clusters on the
    # machine, e.g. a benchmark, are not ours to judge).
    wait_until(lambda: not [p for p in ours if _alive(p)], 15.0, "cluster processes to exit")


@pytest.fixture
def namespace(ray_cluster: LocalCluster) -> Iterator[str]:
    """A fresh namespace; afterwards no named actor may be left in it."""
    import ray

    ns = f"t-{uuid.uuid4().hex[:8]}"
    yield ns
    from supervisors import _ray as sray

    leftovers = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == ns]
    for actor in leftovers:  # clean up so later tests are not affected, then fail loudly
        handle = sray.get_named(actor["name"], ns)
        if handle is not None:
            sray.kill(handle)
    assert not leftovers, f"actors left alive in {ns}: {leftovers}"


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on loopback for the session (skipped, or failed under
    BASTION_REQUIRE_REDIS=1, where the binary is missing)."""
    from tests.redis_server import redis_server, redis_server_binary_or_skip

    redis_server_binary_or_skip()
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path / 'journal'}"


@pytest.fixture
def trees(namespace: str) -> Iterator[list]:
    """Trees registered here are stopped after the test even if it fails."""
    started: list = []
    yield started
    for tree in started:
        with contextlib.suppress(Exception):
            tree.stop()
