"""Tests for topology.config: MeshConfig fields, presets, validation messages, loading."""

import pytest

from topology.config import LAN, LOCAL, WAN, MeshConfig, MeshConfigError
from topology.phi import elapsed_for_phi


def test_preset_when_named_then_returns_the_matching_constant():
    assert MeshConfig.preset("local") == LOCAL
    assert MeshConfig.preset("LAN") == LAN
    assert MeshConfig.preset("wan") == WAN
    assert LOCAL.heartbeat_interval_s == 0.05


def test_preset_when_overrides_given_then_applied_and_rest_kept():
    cfg = MeshConfig.preset("lan", heartbeat_interval_s=0.05, tick_interval_s=0.01)
    assert cfg.heartbeat_interval_s == 0.05
    assert cfg.phi_threshold == LAN.phi_threshold


def test_preset_when_unknown_name_then_error_lists_known_presets():
    with pytest.raises(MeshConfigError, match=r"mesh.preset = 'metro': unknown preset .*'lan'"):
        MeshConfig.preset("metro")


def test_construct_when_negative_interval_then_error_names_field_and_value():
    with pytest.raises(MeshConfigError) as info:
        MeshConfig(heartbeat_interval_s=-1.0)
    assert str(info.value) == "mesh.heartbeat_interval_s = -1.0: must be > 0"


@pytest.mark.parametrize("field,value,message", [
    ("phi_threshold", float("nan"), "mesh.phi_threshold = nan: must be a finite number"),
    ("probe_timeout_s", float("inf"), "mesh.probe_timeout_s = inf: must be a finite number"),
    ("heartbeat_interval_s", "fast", "mesh.heartbeat_interval_s = 'fast': must be a number"),
    ("max_sample_size", 1, "mesh.max_sample_size = 1: must be >= 2"),
    ("max_sample_size", 2.5, "mesh.max_sample_size = 2.5: must be an integer"),
    ("indirect_probes", True, "mesh.indirect_probes = True: must be an integer"),
    ("acceptable_heartbeat_pause_s", -0.1,
     "mesh.acceptable_heartbeat_pause_s = -0.1: must be >= 0"),
    ("max_frame_bytes", 100, "mesh.max_frame_bytes = 100: must be >= 512"),
    ("bogus_s", 1.0, "mesh.bogus_s = 1.0: unknown field (known: heartbeat_interval_s"),
])
def test_construct_when_field_invalid_then_error_names_field_and_value(field, value, message):
    with pytest.raises(MeshConfigError) as info:
        MeshConfig.preset("lan", **{field: value})
    assert message in str(info.value)


@pytest.mark.parametrize("overrides,message", [
    (dict(probe_timeout_s=0.6), "mesh.probe_timeout_s = 0.6: must be < suspicion_min_s = 0.5"),
    (dict(probe_timeout_s=0.05), "mesh.probe_timeout_s = 0.05: must be > heartbeat_interval_s"),
    (dict(suspicion_min_s=3.0), "mesh.suspicion_min_s = 3.0: must be <= suspicion_max_s = 2.0"),
    (dict(dead_node_reap_s=1.0), "mesh.dead_node_reap_s = 1.0: must be > suspicion_max_s"),
    (dict(tick_interval_s=0.5), "mesh.tick_interval_s = 0.5: must be <= heartbeat_interval_s"),
])
def test_construct_when_cross_field_bound_broken_then_error_names_both(overrides, message):
    with pytest.raises(MeshConfigError) as info:
        MeshConfig.preset("lan", **overrides)
    assert message in str(info.value)


def test_construct_when_several_problems_then_all_reported():
    with pytest.raises(MeshConfigError) as info:
        MeshConfig(heartbeat_interval_s=0.0, phi_threshold=-2.0)
    text = str(info.value)
    assert "mesh.heartbeat_interval_s = 0.0" in text and "mesh.phi_threshold = -2.0" in text


def test_config_when_frozen_then_assignment_refused():
    with pytest.raises(Exception, match="frozen"):
        LOCAL.heartbeat_interval_s = 1.0  # type: ignore[misc]


def test_replace_when_invalid_override_then_validated_again():
    assert LOCAL.replace(phi_threshold=10.0).phi_threshold == 10.0
    with pytest.raises(MeshConfigError, match="mesh.phi_threshold = 0.0"):
        LOCAL.replace(phi_threshold=0.0)


def test_from_mapping_when_preset_and_overrides_then_merged():
    cfg = MeshConfig.from_mapping({"preset": "wan", "probe_timeout_s": 1.5})
    assert cfg.probe_timeout_s == 1.5 and cfg.heartbeat_interval_s == WAN.heartbeat_interval_s
    assert MeshConfig.from_mapping({}) == MeshConfig()


def test_from_yaml_when_nested_under_mesh_then_read():
    cfg = MeshConfig.from_yaml("mesh:\n  preset: local\n  heartbeat_interval_s: 0.04\n")
    assert cfg.heartbeat_interval_s == 0.04 and cfg.probe_timeout_s == LOCAL.probe_timeout_s


def test_from_yaml_when_not_a_mapping_or_bad_yaml_then_mesh_config_error():
    with pytest.raises(MeshConfigError, match="expected a mapping"):
        MeshConfig.from_yaml("- 1\n- 2\n")
    with pytest.raises(MeshConfigError, match="not valid YAML"):
        MeshConfig.from_yaml("a: [1, 2\n")


def test_load_when_file_given_then_read_and_missing_file_named(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text("preset: lan\nindirect_probes: 5\n")
    assert MeshConfig.load(path).indirect_probes == 5
    with pytest.raises(MeshConfigError, match="cannot read"):
        MeshConfig.load(tmp_path / "absent.yaml")


@pytest.mark.parametrize("cfg", [LOCAL, LAN, WAN], ids=["local", "lan", "wan"])
def test_presets_when_timing_read_then_phi_crossing_leaves_room_for_probe(cfg):
    # Steady state: intervals equal to the heartbeat interval, std at its floor.
    t_phi = elapsed_for_phi(cfg.phi_threshold,
                            cfg.heartbeat_interval_s + cfg.acceptable_heartbeat_pause_s,
                            cfg.min_std_deviation_s)
    assert t_phi > 2 * cfg.heartbeat_interval_s  # one lost heartbeat never probes
    assert cfg.probe_timeout_s > cfg.heartbeat_interval_s


def test_local_preset_when_budget_summed_then_crash_declared_within_half_a_second():
    cfg = LOCAL
    t_phi = elapsed_for_phi(cfg.phi_threshold,
                            cfg.heartbeat_interval_s + cfg.acceptable_heartbeat_pause_s,
                            cfg.min_std_deviation_s)
    budget = t_phi + cfg.probe_timeout_s + cfg.suspicion_min_s + 3 * cfg.tick_interval_s
    assert budget <= 0.5
