"""The deployment manifests in cluster/deploy/ are well formed (no cluster is started).

* ray-cluster.yaml: Ray's cluster-launcher config (validated against Ray's own schema);
* kuberay-raycluster.yaml: a KubeRay RayCluster plus the journal's Redis.

Both must label every worker with a ``site`` (at least two sites), tune Ray's health checks on
the head, and point ``BASTION_STORE_URL`` at Redis.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "cluster" / "deploy"
LAUNCHER = DEPLOY / "ray-cluster.yaml"
KUBERAY = DEPLOY / "kuberay-raycluster.yaml"

TUNED_HEALTH_CHECK_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}

# Ray node labels follow the Kubernetes label syntax; keys under ray.io/ are Ray's own.
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def check_labels(where: str, labels: Any) -> dict[str, str]:
    assert isinstance(labels, dict) and labels, f"{where}: no labels"
    for key, value in labels.items():
        assert isinstance(key, str) and isinstance(value, str), \
            f"{where}: label {key!r}={value!r} must be a string pair"
        assert not key.startswith("ray.io/"), f"{where}: {key!r} is reserved by Ray"
        assert _LABEL_NAME.fullmatch(key.rsplit("/", 1)[-1]), f"{where}: bad label key {key!r}"
        assert _LABEL_NAME.fullmatch(value), f"{where}: bad label value {value!r}"
    assert labels.get("site"), f"{where}: no `site` label"
    assert labels.get("zone"), f"{where}: no `zone` label"
    return labels


def check_redis_url(where: str, url: Any) -> Any:
    assert isinstance(url, str), f"{where}: BASTION_STORE_URL is {url!r}"
    parts = urlsplit(url)
    assert parts.scheme in ("redis", "rediss"), f"{where}: {url!r} is not a redis URL"
    assert parts.hostname, f"{where}: {url!r} names no host"
    assert parts.port == 6379, f"{where}: {url!r} is not on port 6379"
    assert parts.path.lstrip("/").isdigit(), f"{where}: {url!r} names no database number"
    return parts


def shell_assignments(command: str) -> dict[str, str]:
    """``NAME=value`` in a shell command line, also inside quotes (``echo 'export A=b'``)."""
    return dict(re.findall(r"(?:^|[\s'\"])([A-Za-z_][A-Za-z0-9_]*)=([^\s'\";]+)", command))


# ------------------------------------------------------------------------ cluster launcher
@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_matches_rays_schema(launcher: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher))  # jsonschema plus Ray's own consistency checks


def test_launcher_worker_types_are_labelled_by_site(launcher: dict[str, Any]) -> None:
    types = launcher["available_node_types"]
    head = launcher["head_node_type"]
    assert head in types
    workers = {name: spec for name, spec in types.items() if name != head}
    assert {"tokyo_worker", "london_worker"} <= set(workers)
    sites = {check_labels(name, spec.get("labels"))["site"] for name, spec in workers.items()}
    assert len(sites) >= 2, f"worker node types span only {sites}"
    assert workers["tokyo_worker"]["labels"]["site"] == "tokyo"
    assert workers["london_worker"]["labels"]["site"] == "london"
    for name, spec in workers.items():
        assert spec.get("min_workers", 0) >= 1, f"{name}: no node of this site is kept up"
        assert spec["max_workers"] > spec["min_workers"], f"{name}: the autoscaler cannot grow it"
    assert launcher["max_workers"] >= sum(s["max_workers"] for s in workers.values())
    # Labels reach `ray start` through RAY_OVERRIDE_LABELS, which the launcher skips for the
    # on-premise provider: per-type labels need a cloud provider.
    assert launcher["provider"]["type"] != "local"


def test_launcher_head_has_tuned_health_checks(launcher: dict[str, Any]) -> None:
    env: dict[str, str] = {}
    for command in launcher["head_start_ray_commands"]:
        env.update(shell_assignments(command))
    assert {k: env.get(k) for k in TUNED_HEALTH_CHECK_ENV} == TUNED_HEALTH_CHECK_ENV
    start = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    assert start and "--head" in start[-1]


def test_launcher_sets_a_redis_store_url_on_every_node(launcher: dict[str, Any]) -> None:
    urls = [value for command in launcher["setup_commands"]
            for name, value in shell_assignments(command).items()
            if name == "BASTION_STORE_URL"]
    assert len(urls) == 1, f"BASTION_STORE_URL set {len(urls)} times in setup_commands"
    check_redis_url("setup_commands", urls[0])


def test_launcher_installs_the_project_and_enables_token_auth(launcher: dict[str, Any]) -> None:
    setup = " ".join(launcher["setup_commands"])
    assert re.search(r"pip install\b[^;&|]*~/bastion\b", setup), "the project is not installed"
    assert "~/bastion" in launcher["file_mounts"]
    assert shell_assignments(setup).get("RAY_AUTH_MODE") == "token"
    assert "~/.ray/auth_token" in launcher["file_mounts"]


# ------------------------------------------------------------------------ KubeRay
@pytest.fixture(scope="module")
def kuberay_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(KUBERAY.read_text()) if d is not None]


@pytest.fixture(scope="module")
def raycluster(kuberay_docs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [d for d in kuberay_docs if d.get("kind") == "RayCluster"]
    assert len(found) == 1, f"expected one RayCluster, found {len(found)}"
    return found[0]


def groups(raycluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", raycluster["spec"]["headGroupSpec"]
    for group in raycluster["spec"]["workerGroupSpecs"]:
        yield group["groupName"], group


def containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def plain_env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env", []) if "value" in e}


def test_kuberay_kind_and_api_version(raycluster: dict[str, Any]) -> None:
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["kind"] == "RayCluster"
    assert raycluster["metadata"]["name"]
    assert isinstance(raycluster["spec"]["rayVersion"], str)


def test_kuberay_worker_groups_are_labelled_by_site(raycluster: dict[str, Any]) -> None:
    workers = dict(list(groups(raycluster))[1:])
    assert {"tokyo", "london"} <= set(workers)
    sites = {check_labels(name, g.get("labels"))["site"] for name, g in workers.items()}
    assert len(sites) >= 2, f"worker groups span only {sites}"
    assert workers["tokyo"]["labels"]["site"] == "tokyo"
    assert workers["london"]["labels"]["site"] == "london"
    for name, group in workers.items():
        assert group["replicas"] >= 1, f"{name}: no replicas"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"], "the autoscaler cannot grow a site"
    assert raycluster["spec"]["enableInTreeAutoscaling"] is True  # the autoscaler sidecar


def test_kuberay_groups_are_well_formed(raycluster: dict[str, Any]) -> None:
    for name, group in groups(raycluster):
        params = group.get("rayStartParams", {})
        # KubeRay >= 1.5 rejects labels here; they belong in the group's `labels` field.
        assert "labels" not in params, f"{name}: labels in rayStartParams"
        assert all(isinstance(v, str) for v in params.values()), f"{name}: non-string params"
        check_labels(name, group.get("labels"))
        for container in containers(group):
            where = f"{name}/{container['name']}"
            requests = container.get("resources", {}).get("requests", {})
            assert requests.get("cpu") and requests.get("memory"), f"{where}: no requests"
            for entry in container.get("env", []):
                assert ("value" in entry) != ("valueFrom" in entry), f"{where}: {entry}"
                if "value" in entry:  # Kubernetes rejects non-string env values
                    assert isinstance(entry["value"], str), f"{where}: {entry}"


def test_kuberay_head_has_tuned_health_checks(raycluster: dict[str, Any]) -> None:
    (head,) = containers(raycluster["spec"]["headGroupSpec"])
    env = plain_env(head)
    assert {k: env.get(k) for k in TUNED_HEALTH_CHECK_ENV} == TUNED_HEALTH_CHECK_ENV


def test_kuberay_store_url_points_at_the_redis_service(
        raycluster: dict[str, Any], kuberay_docs: list[dict[str, Any]]) -> None:
    services = {d["metadata"]["name"]: d for d in kuberay_docs if d.get("kind") == "Service"}
    for name, group in groups(raycluster):
        for container in containers(group):
            where = f"{name}/{container['name']}"
            env = plain_env(container)
            parts = check_redis_url(where, env.get("BASTION_STORE_URL"))
            assert env.get("RAY_AUTH_MODE") == "token", f"{where}: token auth is off"
            if services:  # the Redis in this file: the URL must name its Service and port
                assert parts.hostname in services, f"{where}: no Service {parts.hostname!r}"
                ports = [p["port"] for p in services[parts.hostname]["spec"]["ports"]]
                assert parts.port in ports


def test_kuberay_redis_fsyncs_every_write(kuberay_docs: list[dict[str, Any]]) -> None:
    deployments = [d for d in kuberay_docs if d.get("kind") == "Deployment"]
    if not deployments:
        pytest.skip("no in-file Redis (a managed Redis is used)")
    (redis,) = deployments
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    argv = [str(a) for a in container.get("command", []) + container.get("args", [])]
    assert all(isinstance(a, str) for a in container.get("args", [])), "args must be strings"
    assert "--appendonly" in argv and argv[argv.index("--appendonly") + 1] == "yes"
    assert "--appendfsync" in argv and argv[argv.index("--appendfsync") + 1] == "always"
    assert redis["spec"]["replicas"] == 1
    assert redis["spec"]["strategy"]["type"] == "Recreate"


def test_both_manifests_agree_on_sites() -> None:
    launcher = yaml.safe_load(LAUNCHER.read_text())
    (cluster,) = [d for d in yaml.safe_load_all(KUBERAY.read_text())
                  if d and d.get("kind") == "RayCluster"]
    launcher_sites = {t["labels"]["site"] for t in launcher["available_node_types"].values()}
    kuberay_sites = {g["labels"]["site"] for _, g in groups(cluster)}
    assert launcher_sites == kuberay_sites, json.dumps(
        {"launcher": sorted(launcher_sites), "kuberay": sorted(kuberay_sites)})
