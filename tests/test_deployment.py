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
    venue = tree.children[2].children[0]
    assert venue.strategy == "rest_for_one"
    assert [c.id for c in venue.children] == ["handle", "connector"]  # handle first
    handle, connector = venue.children
    assert handle.kwargs["http_url"] == "http://127.0.0.1:1"  # derived from the WebSocket URL
    assert connector.kwargs["options"] == {"currency": "BTC", "expiries": 2, "strikes": 2,
                                           "min_expiry_s": 3600.0}
    assert "site-tokyo/trading/options" in connector.kwargs["subscribers"]
    trading = tree.children[3]
    assert [c.id for c in trading.children] == ["router", "maker", "options"]
    quoter = trading.children[2]
    assert quoter.cls == "actors.option_quoter:OptionQuoter"
    assert quoter.kwargs["router"] == "site-tokyo/trading/router"
    assert tree.children[0].children[0].kwargs["instruments"] is None
    explicit = site_tree(dep.sites[0], {"deribit": "ws://127.0.0.1:1/ws/api/v2"},
                         http_urls={"deribit": "http://10.0.0.1:2"})
    assert explicit.children[2].children[0].children[0].kwargs["http_url"] == \
        "http://10.0.0.1:2"


OPTIONS_SITE = {"name": "t", "venues": [{"name": "d", "options": True}],
                "books": [{"name": "b", "instruments": None}],
                "strategy": {"quote_size": 10, "options": {"expiries": 2}}}


def with_site(**changes: object) -> dict:
    """A deployment of one options site, with ``venue`` / ``book`` / ``strategy`` /
    ``options`` fields changed."""
    site = {**OPTIONS_SITE, "venues": [{**OPTIONS_SITE["venues"][0], **changes.get("venue", {})}],
            "books": [{**OPTIONS_SITE["books"][0], **changes.get("book", {})}],
            "strategy": {**OPTIONS_SITE["strategy"], **changes.get("strategy", {}),
                         "options": {**OPTIONS_SITE["strategy"]["options"],
                                     **changes.get("options", {})}}}
    return {"sites": [site]}


def test_options_deployment_when_valid_then_builds_and_when_bad_then_error_names_field(
        ) -> None:
    site = parse(with_site()).sites[0]
    validate(site_tree(site, {"d": "ws://127.0.0.1:1/ws/api/v2"}))
    for raw, needle in [
        (with_site(options={"expiries": 0}), "expiries"),
        (with_site(options={"colour": 1}), "options.colour"),
        (with_site(options={"config": {"pause_iv_jump": 0.01}}), "widen_iv_jump"),
        (with_site(options={"config": {"min_expiry_s": 5}}), "min_expiry_s"),
        (with_site(options={"currency": "btc"}), "currency"),
        (with_site(venue={"options": False}), "venues.0.options"),
        (with_site(book={"instruments": ["BTC-PERPETUAL"]}), "books.0.instruments"),
        (with_site(strategy={"colour": "red"}), "colour"),
        (with_site(strategy={"quote_size": 15}), "quote_size"),
    ]:
        with pytest.raises(DeploymentError, match=needle):
            parse(raw)


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
