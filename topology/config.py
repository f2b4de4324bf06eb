"""Mesh configuration: every interval, threshold and bound of the heartbeat mesh, with units.

One frozen model, :class:`MeshConfig`, checked as a whole when it is made: a bad value fails with
:class:`MeshConfigError` naming the field and the value (``mesh.heartbeat_interval_s = -1.0:
must be > 0``). Three presets, as in memberlist's ``DefaultLANConfig`` / ``DefaultWANConfig`` /
``DefaultLocalConfig``::

    MeshConfig.preset("local")                          # one machine, 50 ms heartbeats
    MeshConfig.preset("lan", heartbeat_interval_s=0.2)  # a preset with overrides
    MeshConfig.load("mesh.yaml")                        # {preset: wan, probe_timeout_s: 1.5}

How long detection takes (phi-accrual, then SWIM suspicion), from the last heartbeat heard::

    t_phi     = mean_interval + acceptable_heartbeat_pause_s + y(phi_threshold) * std_eff
                (std_eff = max(observed std, min_std_deviation_s); y(8) ~ 5.23, y(10) ~ 5.80)
    t_suspect = t_phi + probe_timeout_s * (1 + local_health)
    t_dead    = t_suspect + suspicion_timeout(confirmations) * (1 + local_health)
    suspicion_timeout(C) = max(suspicion_min_s,
                               suspicion_max_s - (suspicion_max_s - suspicion_min_s)
                                                 * log(C + 1) / log(K + 1))
                (K = min(suspicion_confirmations, peers that could confirm))

With ``LOCAL`` (50 ms heartbeats, loopback jitter well under ``min_std_deviation_s``) a crashed or
hung node is declared dead at most ~0.45 s after its last heartbeat when at least K other nodes
confirm: 0.05 + 0.08 + 5.23 * 0.02 = 0.235 s to phi 8, + 0.08 s probe, + 0.1 s suspicion, plus
one ``tick_interval_s`` of slack per stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["LAN", "LOCAL", "WAN", "MeshConfig", "MeshConfigError"]

_PREFIX = "mesh"


class MeshConfigError(ValueError):
    """Raised when a mesh configuration is invalid: an out-of-range or mistyped value, an unknown
    field, a cross-field bound broken, an unknown preset, or an unreadable file. The message
    names each bad field and its value, one problem per ``;``-separated part."""


class MeshConfig(BaseModel):
    """Every tunable of the heartbeat mesh. Frozen; all durations are float seconds."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    #: Each agent sends a Heartbeat to every peer this often. Detection time scales with it
    #: (see the module docstring); mesh traffic is n * (n - 1) / heartbeat_interval_s frames/s.
    heartbeat_interval_s: float = Field(default=0.1, gt=0)

    #: A peer whose phi reaches this is no longer "heard" and is probed indirectly.
    #: phi = -log10(P(a silence this long | recent intervals)); 8 means the model gives such a
    #: silence a 1e-8 chance. Akka's default is 8; each +1 adds ~0.3 std_eff to t_phi.
    phi_threshold: float = Field(default=8.0, gt=0)

    #: Silence tolerated on top of the mean interval before phi rises: added to the mean of the
    #: interval history (Akka's acceptable-heartbeat-pause). Covers GC pauses and scheduling.
    acceptable_heartbeat_pause_s: float = Field(default=0.3, ge=0)

    #: Floor of the interval standard deviation used by phi, so a very regular peer (loopback:
    #: std ~1 ms) does not make phi explode at the first late heartbeat.
    min_std_deviation_s: float = Field(default=0.05, gt=0)

    #: Heartbeat intervals kept per peer (a sliding window); mean and std come from these.
    #: The window covers max_sample_size * heartbeat_interval_s seconds of history.
    max_sample_size: int = Field(default=1000, ge=2)

    #: Interval assumed before any real one is measured: the history starts as
    #: [estimate - estimate/4, estimate + estimate/4] (mean = estimate, std = estimate/4).
    first_heartbeat_estimate_s: float = Field(default=0.1, gt=0)

    #: k, the helpers asked to vouch for a peer whose phi crossed the threshold (SWIM indirect
    #: probe). One broken link is not taken for a dead node as long as one helper hears the
    #: peer. 0 disables indirect probing (then any broken link leads to suspicion).
    indirect_probes: int = Field(default=3, ge=0)

    #: How long a probe waits for a helper's Ack (or a direct heartbeat) before the peer is
    #: suspected; scaled by (1 + local_health). Must exceed heartbeat_interval_s, since a helper
    #: vouches for a peer only on a heartbeat heard after the request (or one interval before).
    #: Helpers give up and send a negative Ack after 0.8 * probe_timeout_s.
    probe_timeout_s: float = Field(default=0.25, gt=0)

    #: Lifeguard suspicion timeout bounds: a suspicion nobody confirms lasts suspicion_max_s;
    #: with K independent confirmations it shrinks to suspicion_min_s (formula above). A suspected
    #: node has this long to refute by announcing a higher incarnation.
    suspicion_min_s: float = Field(default=0.5, gt=0)
    suspicion_max_s: float = Field(default=2.0, gt=0)

    #: K, the independent confirmations after which the suspicion timeout reaches its minimum.
    #: Capped at runtime by the number of peers that could confirm (members - 2).
    suspicion_confirmations: int = Field(default=3, ge=1)

    #: Each agent broadcasts its reachability View this often, and at once when it changes.
    gossip_interval_s: float = Field(default=0.2, gt=0)

    #: A DEAD or LEFT member is forgotten this long after it entered that state (memberlist's
    #: GossipToTheDeadTime). Until then stale claims about it are recognised and dropped.
    dead_node_reap_s: float = Field(default=60.0, gt=0)

    #: Frames larger than this are refused on encode and dropped on decode, in bytes.
    max_frame_bytes: int = Field(default=65536, ge=512, le=16 * 1024 * 1024)

    #: Lifeguard local health: the score (0..max_local_health) multiplies our probe and
    #: suspicion timeouts by (1 + score). +1 when a probe gets no answer at all from a helper we
    #: believed alive, +1 when we must refute a suspicion of ourselves; -1 when every helper
    #: answered, and -1 per suspicion_max_s without an increase. 0 disables it.
    max_local_health: int = Field(default=8, ge=0)

    #: How often the I/O agent should call Membership.tick(); the granularity of every timer
    #: above. Must not exceed heartbeat_interval_s.
    tick_interval_s: float = Field(default=0.02, gt=0)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise MeshConfigError(_describe(exc)) from None

    @model_validator(mode="after")
    def _cross_field(self) -> MeshConfig:
        problems = []

        def need(ok: bool, field: str, rule: str) -> None:
            if not ok:
                problems.append(f"{_PREFIX}.{field} = {getattr(self, field)!r}: {rule}")

        need(self.probe_timeout_s > self.heartbeat_interval_s, "probe_timeout_s",
             f"must be > heartbeat_interval_s = {self.heartbeat_interval_s!r} (a helper needs "
             "to hear one fresh heartbeat within the probe)")
        need(self.probe_timeout_s < self.suspicion_min_s, "probe_timeout_s",
             f"must be < suspicion_min_s = {self.suspicion_min_s!r}")
        need(self.suspicion_min_s <= self.suspicion_max_s, "suspicion_min_s",
             f"must be <= suspicion_max_s = {self.suspicion_max_s!r}")
        need(self.dead_node_reap_s > self.suspicion_max_s, "dead_node_reap_s",
             f"must be > suspicion_max_s = {self.suspicion_max_s!r}")
        need(self.tick_interval_s <= self.heartbeat_interval_s, "tick_interval_s",
             f"must be <= heartbeat_interval_s = {self.heartbeat_interval_s!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ----------------------------------------------------------------------------------------
    # Presets and loading

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MeshConfig:
        """The preset ``"lan"``, ``"wan"`` or ``"local"`` with ``overrides`` applied.

        Raises:
            MeshConfigError: unknown preset name, or the overrides make the config invalid.
        """
        key = name.lower() if isinstance(name, str) else name
        if key not in _PRESET_VALUES:
            raise MeshConfigError(
                f"{_PREFIX}.preset = {name!r}: unknown preset (known: {sorted(_PRESET_VALUES)})")
        return cls(**{**_PRESET_VALUES[key], **overrides})

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> MeshConfig:
        """A config from a mapping: field values, optionally ``preset: lan|wan|local`` to start
        from (default: the model defaults), optionally nested under a top-level ``mesh`` key.

        Raises:
            MeshConfigError: not a mapping, or any field invalid.
        """
        if isinstance(data, Mapping) and set(data) == {_PREFIX}:
            data = data[_PREFIX]
        if not isinstance(data, Mapping):
            raise MeshConfigError(
                f"{_PREFIX}: expected a mapping of fields, got {type(data).__name__}")
        fields = {str(k): v for k, v in data.items()}
        preset = fields.pop("preset", None)
        if preset is None:
            return cls(**fields)
        return cls.preset(preset, **fields)

    @classmethod
    def from_yaml(cls, text: str) -> MeshConfig:
        """A config from YAML text (same layout as :meth:`from_mapping`).

        Raises:
            MeshConfigError: invalid YAML or invalid fields.
        """
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise MeshConfigError(f"{_PREFIX}: not valid YAML: {exc}") from None
        return cls.from_mapping(raw if raw is not None else {})

    @classmethod
    def load(cls, path: str | Path) -> MeshConfig:
        """A config from a YAML file.

        Raises:
            MeshConfigError: missing file, invalid YAML or invalid fields.
        """
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise MeshConfigError(f"{_PREFIX}: cannot read {path}: {exc.strerror}") from None
        return cls.from_yaml(text)

    def replace(self, **overrides: Any) -> MeshConfig:
        """A copy with ``overrides``, validated again (``model_copy`` would skip validation)."""
        return type(self)(**{**self.model_dump(), **overrides})


def _describe(exc: ValidationError) -> str:
    """One readable ``mesh.<field> = <value>: <rule>`` per pydantic error."""
    parts = []
    for err in exc.errors():
        kind, ctx = err["type"], err.get("ctx") or {}
        field = ".".join(str(p) for p in err["loc"])
        if kind == "value_error" and not field:  # our cross-field checks: already formatted
            parts.append(str(ctx.get("error", err["msg"])))
            continue
        value = err.get("input")
        rule = {
            "greater_than": f"must be > {_num(ctx.get('gt'))}",
            "greater_than_equal": f"must be >= {_num(ctx.get('ge'))}",
            "less_than": f"must be < {_num(ctx.get('lt'))}",
            "less_than_equal": f"must be <= {_num(ctx.get('le'))}",
            "finite_number": "must be a finite number",
            "float_type": "must be a number (seconds)",
            "int_type": "must be an integer",
            "extra_forbidden": f"unknown field (known: {', '.join(MeshConfig.model_fields)})",
        }.get(kind, err["msg"])
        parts.append(f"{_PREFIX}.{field} = {value!r}: {rule}")
    return "; ".join(parts)


def _num(x: Any) -> str:
    """``0`` rather than ``0.0`` for a bound pydantic reports as a whole float."""
    return str(int(x)) if isinstance(x, float) and x.is_integer() else repr(x)


_PRESET_VALUES: dict[str, dict[str, Any]] = {
    # One machine, loopback: 50 ms heartbeats, crash/hang declared dead in <= ~0.45 s
    # (module docstring), reaped after 30 s.
    "local": dict(
        heartbeat_interval_s=0.05, phi_threshold=8.0, acceptable_heartbeat_pause_s=0.08,
        min_std_deviation_s=0.02, max_sample_size=200, first_heartbeat_estimate_s=0.05,
        indirect_probes=3, probe_timeout_s=0.08, suspicion_min_s=0.1, suspicion_max_s=0.4,
        suspicion_confirmations=3, gossip_interval_s=0.1, dead_node_reap_s=30.0,
        max_frame_bytes=65536, max_local_health=4, tick_interval_s=0.01),
    # One data centre: 100 ms heartbeats; t_phi ~ 0.1 + 0.3 + 5.23 * 0.05 = 0.66 s, dead after
    # ~1.4 s with confirmations, ~2.9 s without.
    "lan": dict(
        heartbeat_interval_s=0.1, phi_threshold=8.0, acceptable_heartbeat_pause_s=0.3,
        min_std_deviation_s=0.05, max_sample_size=1000, first_heartbeat_estimate_s=0.1,
        indirect_probes=3, probe_timeout_s=0.25, suspicion_min_s=0.5, suspicion_max_s=2.0,
        suspicion_confirmations=3, gossip_interval_s=0.2, dead_node_reap_s=60.0,
        max_frame_bytes=65536, max_local_health=8, tick_interval_s=0.02),
    # Between regions: 500 ms heartbeats, phi 10 and a 1.5 s pause for WAN jitter;
    # t_phi ~ 0.5 + 1.5 + 5.8 * 0.1 = 2.6 s, dead after ~5.6 s with confirmations.
    "wan": dict(
        heartbeat_interval_s=0.5, phi_threshold=10.0, acceptable_heartbeat_pause_s=1.5,
        min_std_deviation_s=0.1, max_sample_size=1000, first_heartbeat_estimate_s=0.5,
        indirect_probes=3, probe_timeout_s=1.0, suspicion_min_s=2.0, suspicion_max_s=10.0,
        suspicion_confirmations=3, gossip_interval_s=1.0, dead_node_reap_s=300.0,
        max_frame_bytes=262144, max_local_health=8, tick_interval_s=0.05),
}

LOCAL: MeshConfig = MeshConfig.preset("local")
LAN: MeshConfig = MeshConfig.preset("lan")
WAN: MeshConfig = MeshConfig.preset("wan")
