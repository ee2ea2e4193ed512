from __future__ import annotations

import pytest

from phaseid_hpc.config import RunConfig, config_fingerprint, load_config
from phaseid_hpc.errors import ConfigError


def test_defaults_match_default_toml(tmp_path):
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / "default.toml", environ={})
    assert cfg == RunConfig()


def test_unknown_key_names_the_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[phase]\nconfidence = 0.9\n")
    with pytest.raises(ConfigError, match=r"phase\.confidence"):
        load_config(p, environ={})


def test_wrong_type_and_literal_are_rejected(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[job]\ndevice = 'tpu'\n")
    with pytest.raises(ConfigError, match=r"job\.device.*cpu"):
        load_config(p, environ={})
    p.write_text("[quality]\nmax_interp_gap = 'three'\n")
    with pytest.raises(ConfigError, match=r"quality\.max_interp_gap"):
        load_config(p, environ={})


def test_thresholds_must_be_ordered():
    with pytest.raises(ConfigError, match="suspect_threshold"):
        load_config(overrides={"phase": {"suspect_threshold": 0.9, "confident_threshold": 0.8}}, environ={})


def test_yaml_and_env_override(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("quality:\n  max_interp_gap: 5\n")
    cfg = load_config(p, environ={"PHASEID__JOB__BLOCK_BYTES": "1000", "OTHER": "x"})
    assert cfg.quality.max_interp_gap == 5
    assert cfg.job.block_bytes == 1000


def test_fingerprint_changes_with_config():
    a = config_fingerprint(RunConfig())
    b = config_fingerprint(load_config(overrides={"phase": {"random_state": 1}}, environ={}))
    assert a == config_fingerprint(RunConfig()) and a != b


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
