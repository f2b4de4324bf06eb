"""The deployment spec: a YAML file the user edits, validated with clear errors, turned into
venue simulator processes and supervision trees (one tree per site).

    sites:
      - name: tokyo
        venues:   [{name: deribit, instruments: [BTC-PERPETUAL, ETH-PERPETUAL], seed: 1}]
        books:    [{name: main, instruments: [BTC-PERPETUAL, ETH-PERPETUAL]}]

Per site the tree is: ``site-<name>`` (one_for_one) → ``venues`` (one_for_one of per-venue
``rest_for_one`` subtrees: connector) · ``risk`` (one_for_one: books) · ``monitors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_SPEC = Path(__file__).with_name("deploy") / "bastion.yaml"


class DeploymentError(ValueError):
    """The deployment file is invalid; the message names the field and the value."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class VenueSpec(_Frozen):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9\-]*$")
    instruments: tuple[str, ...] = ("BTC-PERPETUAL", "ETH-PERPETUAL")
    port: int = Field(default=0, ge=0, le=65535)
    seed: int = 0
    synthetic: bool = False
    speedup: float = Field(default=60.0, gt=0)
    data: str | None = None
    client_id: str = "bastion"
    client_secret: str = "bastion-local-secret"  # simulator key, non-production only

    @field_validator("instruments")
    @classmethod
    def _non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one instrument")
        return v


class BookSpec(_Frozen):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9\-]*$")
    instruments: tuple[str, ...]
    limits: dict[str, float] = Field(default_factory=dict)  # actors.limits.Limits fields


class SiteSpec(_Frozen):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9\-]*$")
    venues: tuple[VenueSpec, ...] = ()
    books: tuple[BookSpec, ...] = ()
    monitors: bool = True
    #: MarketMaker kwargs (``actors.strategy``); null: no strategy, no router.
    strategy: dict[str, Any] | None = None


class Deployment(_Frozen):
    name: str = "bastion"
    environment: Literal["production", "non-production"] = "non-production"
    namespace: str = "bastion"
    store_url: str | None = None
    sites: tuple[SiteSpec, ...] = Field(min_length=1)

    @field_validator("sites")
    @classmethod
    def _unique_sites(cls, v: tuple[SiteSpec, ...]) -> tuple[SiteSpec, ...]:
        names = [s.name for s in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate site names {dupes}")
        return v


def load(path: str | Path | None = None) -> Deployment:
    """Read and validate a deployment file (default: ``cluster/deploy/bastion.yaml``)."""
    path = Path(path) if path else DEFAULT_SPEC
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DeploymentError(f"deployment file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise DeploymentError(f"{path}: not valid YAML: {exc}") from None
    return parse(raw, source=str(path))


def parse(raw: Any, source: str = "<deployment>") -> Deployment:
    if not isinstance(raw, dict):
        raise DeploymentError(f"{source}: expected a mapping at the top, got {type(raw).__name__}")
    try:
        return Deployment.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
            for err in exc.errors())
        raise DeploymentError(f"{source}: {problems}") from None


def site_tree(site: SiteSpec, venue_urls: dict[str, str], *, subscribers_ns: str = "") -> Any:
    """The supervision tree of one site, given the simulators' WebSocket URLs by venue name."""
    from supervisors import ChildSpec, Placement, SupervisorSpec
    from supervisors.spec import Backoff

    root = f"site-{site.name}"
    book_paths = [f"{root}/risk/{b.name}" for b in site.books]
    trading = site.strategy is not None and bool(site.books)
    router_path, maker_path = f"{root}/trading/router", f"{root}/trading/maker"
    subscribers = book_paths + ([router_path, maker_path] if trading else [])
    place = Placement(site=site.name)
    fast = Backoff(initial_s=0.05, max_s=2.0)
    venues = [
        SupervisorSpec(id=v.name, strategy="rest_for_one", intensity=20, period_s=30,
                       children=[ChildSpec(
                           id="connector", cls="actors.connector:VenueConnector",
                           kwargs={"venue": v.name, "ws_url": venue_urls[v.name],
                                   "client_id": v.client_id, "client_secret": v.client_secret,
                                   "instruments": list(v.instruments),
                                   "subscribers": subscribers},
                           placement=place, backoff=fast, shutdown_s=5.0)])
        for v in site.venues
    ]
    books = [ChildSpec(id=b.name, cls="actors.risk_book:RiskBook",
                       kwargs={"book_id": b.name, "instruments": list(b.instruments),
                               "limits": dict(b.limits)},
                       placement=Placement(site=site.name, anti_affinity=f"book-{b.name}"),
                       backoff=fast)
             for b in site.books]
    children: list[Any] = [
        SupervisorSpec(id="risk", strategy="one_for_one", intensity=20, period_s=30,
                       children=books)]
    if site.monitors:
        children.append(SupervisorSpec(id="monitors", strategy="one_for_one", children=[
            ChildSpec(id="counterparty", cls="actors.counterparty:CounterpartyMonitor",
                      kwargs={"monitor_id": f"{site.name}-counterparty",
                              "venues": {v.name: 5_000_000.0 for v in site.venues}},
                      placement=place, backoff=fast)]))
    children.append(SupervisorSpec(id="venues", strategy="one_for_one", intensity=20,
                                   period_s=30, children=venues))
    if trading:
        assert site.strategy is not None
        children.append(SupervisorSpec(id="trading", strategy="rest_for_one", intensity=20,
                                       period_s=30, children=[
            ChildSpec(id="router", cls="actors.router:OrderRouter",
                      kwargs={"venues": {v.name: f"{root}/venues/{v.name}/connector"
                                         for v in site.venues},
                              "risk_book": book_paths[0],
                              "counterparty": (f"{root}/monitors/counterparty"
                                               if site.monitors else None)},
                      placement=place, backoff=fast),
            ChildSpec(id="maker", cls="actors.strategy:MarketMaker",
                      kwargs={"router": router_path, "risk_book": book_paths[0],
                              **site.strategy},
                      placement=place, backoff=fast)]))
    return SupervisorSpec(id=root, strategy="one_for_one", intensity=10, period_s=30,
                          children=children)
