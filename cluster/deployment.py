"""The deployment spec: a YAML file the user edits, validated with clear errors, turned into
venue simulator processes and supervision trees (one tree per site).

    sites:
      - name: tokyo
        venues:   [{name: deribit, instruments: [BTC-PERPETUAL, ETH-PERPETUAL], seed: 1,
                    options: true}]
        books:    [{name: main, instruments: null}]
        strategy: {quote_size: 10, options: {expiries: 2, strikes: 2, max_options: 4}}

Per site the tree is: ``site-<name>`` (one_for_one) → ``risk`` (one_for_one: books) ·
``monitors`` · ``venues`` (one_for_one of per-venue ``rest_for_one`` subtrees: ``handle``, then
``connector``) · ``trading`` (``rest_for_one``: ``router``, ``maker``, then ``options``).

The venue handle (``actors.venue_handle``) comes first in its subtree: it stands for the
simulator process, and a restart of it restarts the connector after it, which is harmless
because a connector reconciles with its venue on every start before it takes an order.
``strategy`` holds the market maker's keywords and, optionally, ``options``: the option quoter
(``actors.option_quoter``) and the options each connector of the site resolves for it at
connect time (``actors.connector.OptionSelector``); option names depend on the date, so with
options the site's venues must list a chain (``options: true``) and its first book must take
any instrument (``instruments: null``).

``failover`` (optional, :class:`FailoverSpec`): a geographically redundant deployment
(``cluster.sites_deploy``): each site its own Ray cluster, one lease per *shared* venue (one
simulator every site reaches), the site holding it trades there; each site's connector to a
shared venue is role-gated and imports the replicated journal of the site it replaces.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    options: bool = False  # the simulator lists a BTC option chain (needed by strategy.options)

    @field_validator("instruments")
    @classmethod
    def _non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one instrument")
        return v


class BookSpec(_Frozen):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9\-]*$")
    instruments: tuple[str, ...] | None  # null: any Deribit instrument
    limits: dict[str, float] = Field(default_factory=dict)  # actors.limits.Limits fields


def _config_problem(build: Any) -> None:
    """Run a config constructor; its error (which names the field) as a ValueError."""
    from actors.connector import OptionSelectorError
    from actors.option_quoter import QuoterConfigError
    from actors.strategy import MakerConfigError

    try:
        build()
    except (MakerConfigError, QuoterConfigError, OptionSelectorError) as exc:
        raise ValueError(str(exc)) from None


class OptionsSpec(_Frozen):
    """The site's option quoter (``actors.option_quoter.OptionQuoter``) and which options each
    connector resolves for it at connect time: the ``expiries`` nearest expiries at least
    ``min_expiry_s`` away, ``strikes`` strikes nearest the index in each, calls and puts.
    ``config``: any other ``QuoterConfig`` field."""

    currency: str = "BTC"
    expiries: int = 2
    strikes: int = 2
    min_expiry_s: float = 3600.0
    max_options: int = 4
    quote_size: float = 0.1
    interval_s: float = 0.5
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _valid(self) -> OptionsSpec:
        from actors.connector import OptionSelector
        from actors.option_quoter import QuoterConfig, QuoterConfigError
        from actors.strategy import config_from

        _config_problem(lambda: OptionSelector.from_config(self.selector()))
        _config_problem(lambda: config_from(QuoterConfig, QuoterConfigError, self.config,
                                            **self.quoter_settings()))
        return self

    def selector(self) -> dict[str, Any]:
        """The connector's ``options`` keyword."""
        return {"currency": self.currency, "expiries": self.expiries, "strikes": self.strikes,
                "min_expiry_s": self.min_expiry_s}

    def quoter_settings(self) -> dict[str, Any]:
        return {"underlying": f"{self.currency}-PERPETUAL", "max_options": self.max_options,
                "quote_size": self.quote_size, "interval_s": self.interval_s,
                "min_expiry_s": self.min_expiry_s}

    def quoter_kwargs(self) -> dict[str, Any]:
        """The quoter's keywords (without ``router`` and ``risk_book``)."""
        own = self.quoter_settings()
        min_expiry_s = own.pop("min_expiry_s")
        return {**own, "config": {**self.config, "min_expiry_s": min_expiry_s}}


class StrategySpec(BaseModel):
    """The market maker's keywords (``actors.strategy.MarketMaker``: ``instrument``,
    ``quote_size``, ``base_spread_bps``, ``max_inventory``, ``interval_s``, ``config``) and,
    optionally, ``options`` (:class:`OptionsSpec`)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    options: OptionsSpec | None = None

    @model_validator(mode="after")
    def _valid(self) -> StrategySpec:
        from actors.strategy import MakerConfig, MakerConfigError, config_from

        kwargs = self.maker_kwargs()
        allowed = {"instrument", "quote_size", "base_spread_bps", "max_inventory",
                   "interval_s", "config"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ValueError(f"unknown market-maker setting(s) {unknown}; known: "
                             f"{sorted(allowed | {'options'})}")
        config = kwargs.pop("config", None)
        _config_problem(lambda: config_from(MakerConfig, MakerConfigError, config, **kwargs))
        return self

    def maker_kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SiteSpec(_Frozen):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9\-]*$")
    venues: tuple[VenueSpec, ...] = ()
    books: tuple[BookSpec, ...] = ()
    monitors: bool = True
    #: The market maker and, optionally, the option quoter; null: no strategy, no router.
    strategy: StrategySpec | None = None

    @model_validator(mode="after")
    def _options_fit(self) -> SiteSpec:
        if self.strategy is None or self.strategy.options is None:
            return self
        for i, venue in enumerate(self.venues):
            if not venue.options:
                raise ValueError(f"venues.{i}.options must be true when strategy.options is "
                                 f"set (venue {venue.name!r} would list no option chain)")
        if self.books and self.books[0].instruments is not None:
            raise ValueError("books.0.instruments must be null (any instrument) when "
                             "strategy.options is set: option names depend on the date")
        return self


class FailoverSpec(_Frozen):
    """Which venues the sites share and how the lease on each is run.

    ``venues``: the shared venues (one simulator each; every site declares each of them, the
    same way). ``preferred``: venue -> the site active when all is well (default: the first
    site). ``witness``: a third voter, so that two sites break ties. ``mesh``: the
    ``topology.config.MeshConfig`` preset. ``lease``: ``topology.lease.LeaseConfig`` fields
    over the preset named by ``lease.preset`` (default: the mesh's). ``nodes_per_site``: worker
    nodes per site (each site also has a head)."""

    venues: tuple[str, ...] = Field(min_length=1)
    preferred: dict[str, str] = Field(default_factory=dict)
    witness: bool = True
    mesh: Literal["local", "lan", "wan"] = "local"
    lease: dict[str, Any] = Field(default_factory=dict)
    nodes_per_site: int = Field(default=1, ge=1, le=8)

    @field_validator("venues")
    @classmethod
    def _distinct(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        dupes = sorted({n for n in v if v.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate venues {dupes}")
        return v

    @model_validator(mode="after")
    def _lease_valid(self) -> FailoverSpec:
        self.lease_fields()
        return self

    def lease_fields(self) -> dict[str, float]:
        """The full lease config (every field), for ``MultiSite.start(lease=...)``."""
        from topology.lease import LEASE_PRESETS, LeaseConfig

        overrides = dict(self.lease)
        preset = overrides.pop("preset", self.mesh)
        if preset not in LEASE_PRESETS:
            raise ValueError(f"lease.preset = {preset!r}: unknown (known: "
                             f"{sorted(LEASE_PRESETS)})")
        try:
            return LeaseConfig.preset(preset, **overrides).model_dump()
        except ValidationError as exc:
            raise ValueError("; ".join(
                f"{'.'.join(['lease', *(str(p) for p in e['loc'])])}: "
                f"{e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors())) from None
        except TypeError as exc:
            raise ValueError(f"lease = {self.lease!r}: {exc}") from None


class Deployment(_Frozen):
    name: str = "bastion"
    environment: Literal["production", "non-production"] = "non-production"
    namespace: str = "bastion"
    #: with ``failover``: each site's own store, ``{site}`` in the URL (default: SQLite under
    #: the work dir, ``site-<name>/journal``)
    store_url: str | None = None
    sites: tuple[SiteSpec, ...] = Field(min_length=1)
    failover: FailoverSpec | None = None

    @field_validator("sites")
    @classmethod
    def _unique_sites(cls, v: tuple[SiteSpec, ...]) -> tuple[SiteSpec, ...]:
        names = [s.name for s in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate site names {dupes}")
        return v

    @model_validator(mode="after")
    def _failover_fits(self) -> Deployment:
        f = self.failover
        if f is None:
            return self
        names = [s.name for s in self.sites]
        if len(names) < 2:
            raise ValueError(f"failover: needs at least two sites, got {names}")
        for i, site in enumerate(self.sites):
            if not re.fullmatch(r"[a-z0-9]+", site.name):
                raise ValueError(f"sites.{i}.name = {site.name!r}: a failover site's name must "
                                 f"be [a-z0-9]+ (order labels carry it: e<epoch>.site-<name>-)")
        for venue in f.venues:
            specs = {}
            for i, site in enumerate(self.sites):
                spec = next((v for v in site.venues if v.name == venue), None)
                if spec is None:
                    raise ValueError(
                        f"failover.venues: {venue!r} is not declared in sites.{i}.venues (site "
                        f"{site.name!r}); every site trades each shared venue")
                specs[i] = spec
            first = specs[0]
            for i, spec in specs.items():
                differ = sorted(k for k in type(spec).model_fields
                                if getattr(spec, k) != getattr(first, k))
                if differ:
                    raise ValueError(
                        f"failover.venues: {venue!r} differs between sites.0 and sites.{i} in "
                        f"{differ}: a shared venue is one simulator, declared the same in every "
                        f"site")
        for venue, site in f.preferred.items():
            if venue not in f.venues:
                raise ValueError(f"failover.preferred: {venue!r} is not a shared venue "
                                 f"(failover.venues: {list(f.venues)})")
            if site not in names:
                raise ValueError(f"failover.preferred.{venue}: site {site!r} does not exist "
                                 f"(sites: {names})")
        if self.store_url is not None and "{site}" not in self.store_url:
            raise ValueError(f"store_url = {self.store_url!r}: with failover every site needs "
                             f"its own journal store; put '{{site}}' in the URL")
        return self

    def preferred_sites(self) -> dict[str, str]:
        """Shared venue -> its preferred site (the first site unless ``failover.preferred``
        says otherwise)."""
        f = self.failover
        if f is None:
            return {}
        return {v: f.preferred.get(v, self.sites[0].name) for v in f.venues}


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
        def one(err: Any) -> str:
            msg = err["msg"].removeprefix("Value error, ")
            if not err["loc"]:  # a check across fields: the message names them
                return msg
            return f"{'.'.join(str(p) for p in err['loc'])}: {msg} (got {err.get('input')!r})"

        problems = "; ".join(one(err) for err in exc.errors())
        raise DeploymentError(f"{source}: {problems}") from None


def http_url_of(ws_url: str) -> str:
    """The simulator's HTTP base URL from its WebSocket URL (``ws://h:p/ws/api/v2``)."""
    scheme, _, rest = ws_url.partition("://")
    return f"{'https' if scheme == 'wss' else 'http'}://{rest.split('/', 1)[0]}"


def venue_subtree(site: SiteSpec, venue: VenueSpec, ws_url: str, http_url: str,
                  subscribers: list[str], *, gated: bool = False) -> Any:
    """One venue's ``rest_for_one`` subtree: its handle, then its connector. ``gated``: a
    shared venue under failover: the connector orders only while its site holds the venue's
    lease and imports the replicated journal (``replica/<venue>/<venue>``) on promotion."""
    from supervisors import ChildSpec, Placement, SupervisorSpec
    from supervisors.spec import Backoff

    place, fast = Placement(site=site.name), Backoff(initial_s=0.05, max_s=2.0)
    key = {"client_id": venue.client_id, "client_secret": venue.client_secret}
    options = site.strategy.options if site.strategy is not None else None
    connector = {"venue": venue.name, "ws_url": ws_url, **key,
                 "instruments": list(venue.instruments), "subscribers": subscribers}
    if options is not None:
        connector["options"] = options.selector()
    if gated:
        connector.update(role_gated=True, replica=f"replica/{venue.name}/{venue.name}")
    return SupervisorSpec(id=venue.name, strategy="rest_for_one", intensity=20, period_s=30,
                          children=[
        ChildSpec(id="handle", cls="actors.venue_handle:VenueHandle",
                  kwargs={"venue": venue.name, "ws_url": ws_url, "http_url": http_url, **key},
                  placement=place, backoff=fast, shutdown_s=2.0),
        ChildSpec(id="connector", cls="actors.connector:VenueConnector", kwargs=connector,
                  placement=place, backoff=fast, shutdown_s=5.0)])


def site_tree(site: SiteSpec, venue_urls: dict[str, str], *,
              http_urls: dict[str, str] | None = None, subscribers_ns: str = "",
              gated: Collection[str] = ()) -> Any:
    """The supervision tree of one site, given the simulators' WebSocket URLs by venue name
    (and their HTTP URLs; by default derived from the WebSocket ones). ``gated``: the shared
    venues of a failover deployment (see :func:`venue_subtree`)."""
    from supervisors import ChildSpec, Placement, SupervisorSpec
    from supervisors.spec import Backoff

    root = f"site-{site.name}"
    book_paths = [f"{root}/risk/{b.name}" for b in site.books]
    strategy = site.strategy if site.books else None
    trading = f"{root}/trading"
    strategies = [] if strategy is None else [f"{trading}/maker"] + (
        [f"{trading}/options"] if strategy.options is not None else [])
    subscribers = book_paths + ([f"{trading}/router", *strategies] if strategy else [])
    place = Placement(site=site.name)
    fast = Backoff(initial_s=0.05, max_s=2.0)
    http = http_urls or {}
    venues = [venue_subtree(site, v, venue_urls[v.name],
                            http.get(v.name) or http_url_of(venue_urls[v.name]), subscribers,
                            gated=v.name in gated)
              for v in site.venues]
    books = [ChildSpec(id=b.name, cls="actors.risk_book:RiskBook",
                       kwargs={"book_id": b.name, "limits": dict(b.limits),
                               "instruments": None if b.instruments is None
                               else list(b.instruments)},
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
    if strategy is not None:
        desk = {"router": f"{trading}/router", "risk_book": book_paths[0]}
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
                      kwargs={**desk, **strategy.maker_kwargs()},
                      placement=place, backoff=fast),
            *([] if strategy.options is None else [
                ChildSpec(id="options", cls="actors.option_quoter:OptionQuoter",
                          kwargs={**desk, **strategy.options.quoter_kwargs()},
                          placement=place, backoff=fast)])]))
    return SupervisorSpec(id=root, strategy="one_for_one", intensity=10, period_s=30,
                          children=children)
