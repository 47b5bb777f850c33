from pathlib import Path

import pytest
import yaml

from pipeline.cli import EXIT_CONFIG, EXIT_OK, main
from pipeline.config import ConfigError, check_paths, config_hash, load_config, load_config_dict

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("**/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.models.root  # resolved, env defaults applied
    assert "${" not in cfg.models.root


def test_shipped_configs_found():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "paper.yaml"}


def test_unknown_key_wrong_type_out_of_range_reported_together(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "run": {"seed": "abc", "colour": "blue"},
        "build": {"rules": {"clip_t_min": 1.7}},
    }))
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    msg = str(info.value)
    assert str(bad) in msg
    assert len(info.value.errors) == 3
    assert 'run.colour = "blue": unknown key' in msg and "allowed keys here: name, seed" in msg
    assert 'run.seed = "abc"' in msg and "valid integer" in msg
    assert "build.rules.clip_t_min = 1.7" in msg and "less than or equal to 1" in msg


def test_cli_validate_exit_codes(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ray: {num_cpus: 0}\n")
    assert main(["config", "validate", *map(str, CONFIGS)]) == EXIT_OK
    assert main(["config", "validate", str(CONFIGS[0]), str(bad)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "ray.num_cpus = 0" in err and "greater than or equal to 1" in err


def test_overrides_apply_with_yaml_types():
    cfg = load_config_dict({}, overrides=["build.profusion.s1=3.5", "build.instructions.phrases=[a b, c d]",
                                          "ray.address=null", "run.name=x1"])
    assert cfg.build.profusion.s1 == 3.5
    assert cfg.build.instructions.phrases == ["a b", "c d"]
    assert cfg.ray.address is None and cfg.run.name == "x1"


@pytest.mark.parametrize("override, needle", [
    ("build.nope=1", "build.nope = 1: unknown key"),
    ("run.seed.x=1", "run.seed is a int, not a section"),  # run.seed set in the file below
    ("novalue", "expected KEY.PATH=VALUE"),
    ("build.profusion.refine_eta=2", "build.profusion.refine_eta = 2"),
])
def test_bad_overrides_are_config_errors(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config_dict({"run": {"seed": 1}}, overrides=[override])
    assert needle in str(info.value)


def test_cross_field_rule_reported():
    with pytest.raises(ConfigError) as info:
        load_config_dict({"build": {"instructions": {"phrases": ["x"], "per_source": 2}}})
    assert "per_source=2 exceeds the 1 configured phrases" in str(info.value)


def test_env_interpolation(monkeypatch):
    monkeypatch.setenv("CAFE_MODELS_ROOT", "/somewhere/models")
    assert load_config(CONFIGS[-1] if CONFIGS[-1].name == "tiny.yaml" else
                       [p for p in CONFIGS if p.name == "tiny.yaml"][0]).models.root == "/somewhere/models"
    with pytest.raises(ConfigError) as info:
        load_config_dict({"models": {"root": "${CAFE_SURELY_UNSET_VAR}"}})
    assert "CAFE_SURELY_UNSET_VAR is not set" in str(info.value)


def test_check_paths_and_hash(tmp_path):
    cfg = load_config_dict({"models": {"root": str(tmp_path)}})
    assert len(check_paths(cfg)) == 8
    (tmp_path / "t2i").mkdir()
    assert not any("models.t2i." in m for m in check_paths(cfg))
    assert config_hash(cfg) == config_hash(load_config_dict({"models": {"root": str(tmp_path)}}))
    assert config_hash(cfg) != config_hash(load_config_dict({"models": {"root": str(tmp_path / "x")}}))


def test_show_prints_resolved_config(capsys):
    tiny = [p for p in CONFIGS if p.name == "tiny.yaml"][0]
    assert main(["config", "show", str(tiny), "--set", "build.profusion.s2=1.25"]) == EXIT_OK
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["build"]["profusion"]["s2"] == 1.25
    assert shown["build"]["profusion"]["gamma"] == 0.6  # default filled in
