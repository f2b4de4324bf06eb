"""The deployment file: the shipped one is valid; bad ones are refused naming the field."""

from __future__ import annotations

import pytest

from cluster.deployment import DeploymentError, load, parse, site_tree
from supervisors.spec import validate


def test_default_deployment_when_loaded_then_valid_and_builds_a_tree() -> None:
    dep = load()
    assert dep.environment == "non-production" and dep.sites[0].name == "tokyo"
    tree = site_tree(dep.sites[0], {"deribit": "ws://127.0.0.1:1/ws/api/v2"})
    validate(tree)  # classes import and the kwargs fit their constructors
    assert [c.id for c in tree.children] == ["risk", "monitors", "venues", "trading"]


@pytest.mark.parametrize(("raw", "needle"), [
    ({"sites": []}, "sites"),
    ({"sites": [{"name": "Tokyo!"}]}, "sites.0.name"),
    ({"sites": [{"name": "t", "venues": [{"name": "d", "port": 70000}]}]}, "port"),
    ({"sites": [{"name": "t", "venues": [{"name": "d", "speedup": 0}]}]}, "speedup"),
    ({"sites": [{"name": "t"}, {"name": "t"}]}, "duplicate site"),
    ({"sites": [{"name": "t"}], "environment": "prod"}, "environment"),
    ({"sites": [{"name": "t"}], "colour": "red"}, "colour"),
    ([1, 2], "mapping"),
])
def test_deployment_when_invalid_then_error_names_field(raw: object, needle: str) -> None:
    with pytest.raises(DeploymentError, match=needle):
        parse(raw)


def test_deployment_when_file_missing_or_not_yaml_then_clear_error(tmp_path) -> None:
    with pytest.raises(DeploymentError, match="does not exist"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sites: [unclosed")
    with pytest.raises(DeploymentError, match="not valid YAML"):
        load(bad)
