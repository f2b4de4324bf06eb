"""State exported as Ray metrics and scraped, as Prometheus does, from the nodes' real
metrics endpoints (``MetricsExportPort`` of each node in Ray's state API)."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from pathlib import Path

import pytest

from supervisors import ChildSpec, SupervisorSpec, start_tree
from supervisors.spec import Backoff
from tests.conftest import wait_until

COUNTER = "supervisors.examples:Counter"


def scrape() -> str:
    """Every alive node's Prometheus text, concatenated."""
    import ray

    out = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node["Alive"] or not port:
            continue
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                out.append(r.read().decode())
        except OSError:
            continue
    return "\n".join(out)


def sample(text: str, name: str, **tags: str) -> float | None:
    """The value of ``ray_<name>{...}`` whose tags include ``tags`` (the last one found)."""
    found = None
    for line in text.splitlines():
        if not line.startswith(f"ray_{name}{{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}") + 1]))
        if all(labels.get(k) == v for k, v in tags.items()):
            found = float(line.rsplit(" ", 1)[1])
    return found


@pytest.mark.slow
def test_metrics_when_child_restarts_then_up_and_restarts_appear_on_the_nodes_endpoint(
        namespace: str, store_url: str, trees: list) -> None:
    import ray

    spec = SupervisorSpec(id="root", children=[
        ChildSpec(id="c", cls=COUNTER, backoff=Backoff(initial_s=0.0))])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    pid = tree.child("root/c").pid
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: (c := tree.child("root/c")).status == "running" and c.pid != pid, 30,
               "restarted")
    text = wait_until(lambda: (t := scrape()) and sample(
        t, "bastion_child_restarts", path="root/c", tree="root") == 1.0 and t, 90,
                      "bastion_child_restarts = 1 scraped")
    assert sample(text, "bastion_child_up", path="root/c", supervisor="root") == 1.0
    started = sample(text, "bastion_child_start_time_seconds", path="root/c")
    info = tree.child("root/c")
    assert started is not None and abs(started - info.started_at) < 1.0
    assert sample(text, "bastion_supervisor_intensity", path="root") is not None
    # Ray's own actor table (GCS) agrees on who is alive, and where.
    entry = ray._private.state.actors(ray.get_actor("root/c", namespace=namespace)._actor_id.hex())
    assert entry["State"] == "ALIVE" and entry["Pid"] == info.pid, entry


@pytest.mark.slow
def test_metrics_when_risk_book_fills_then_position_and_trading_state_scraped(
        namespace: str, store_url: str, trees: list, tmp_path: Path) -> None:
    spec = SupervisorSpec(id="desk", children=[
        ChildSpec(id="book", cls="actors.risk_book:RiskBook",
                  kwargs={"book_id": f"m-{namespace}", "limits": {}, "instruments": None})])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    book = tree.actor("desk/book")
    import ray

    fill = {"trade_id": "t1", "trade_seq": 1, "instrument_name": "BTC-PERPETUAL",
            "direction": "buy", "amount": 30.0, "price": 50000.0, "fee": 0.0,
            "timestamp": 1_700_000_000_000, "order_id": "o1", "label": "x.1"}
    result = ray.get(book.on_fills.remote([fill]), timeout=30)
    assert result["applied"] == 1, json.dumps(result)
    wait_until(lambda: sample(scrape(), "bastion_position", source="risk_book",
                              owner=f"m-{namespace}", instrument="BTC-PERPETUAL") == 30.0, 90,
               "risk book position scraped")
    text = scrape()
    assert sample(text, "bastion_trading_state", book=f"m-{namespace}") == 0.0  # ACTIVE


def test_grafana_dashboard_when_loaded_then_every_metric_it_plots_is_exported() -> None:
    from actors import metrics as actor_metrics
    from supervisors import metrics as tree_metrics
    from topology import mesh_metrics

    exported = {*tree_metrics._TREE_GAUGES, *actor_metrics._GAUGES, *mesh_metrics._SPECS}
    dash = json.loads((Path(__file__).parents[1] / "cluster/deploy/grafana/bastion.json")
                      .read_text())
    plotted = {m for p in dash["panels"] for t in p["targets"]
               for m in re.findall(r"ray_(bastion_\w+)", t["expr"])}
    assert plotted and plotted <= exported, plotted - exported
