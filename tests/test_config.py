import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.build_config import MAX_ACTORS, MAX_BATCH_SIZE, MAX_CPUS_PER_ACTOR, MAX_GPUS_PER_ACTOR
from pipeline.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from pipeline.config import (MAX_LOCAL_CPUS, MAX_LOCAL_GPUS, ConfigError, check_paths, config_hash, load_config,
                             load_config_dict)

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


# ------------------------------------------------------------------------------------------ strict types, bounds


def test_no_coercion_every_error_reported_together(tmp_path):
    """``true`` is not a number, ``"3"`` is not an int, ``1`` is not a bool: one line each, all at once."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("ray: {num_cpus: true}\n"
                   "run: {seed: '3'}\n"
                   "build:\n"
                   "  profusion: {s1: true, finetune: 1}\n"
                   "  scoring: {batch_size: 16.0}\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    errors = info.value.errors
    assert len(errors) == 5, errors
    msg = str(info.value)
    assert msg.startswith(f"{bad}: 5 error(s)")
    assert "ray.num_cpus = true: Input should be a valid integer" in msg
    assert 'run.seed = "3": Input should be a valid integer' in msg
    assert "build.profusion.s1 = true: Input should be a valid number" in msg
    assert "build.profusion.finetune = 1: Input should be a valid boolean" in msg
    assert "build.scoring.batch_size = 16.0: Input should be a valid integer" in msg


def test_int_is_accepted_where_a_float_is_expected():
    cfg = load_config_dict({}, overrides=["build.profusion.s1=3", "build.scoring.num_gpus_per_actor=1"])
    assert cfg.build.profusion.s1 == 3.0 and isinstance(cfg.build.profusion.s1, float)
    assert cfg.build.scoring.num_gpus_per_actor == 1.0


def test_inf_and_nan_are_refused(tmp_path):
    bad = tmp_path / "inf.yaml"
    bad.write_text("build:\n"
                   "  sources: {max_file_mb: .inf}\n"
                   "  profusion: {finetune_lr: .nan, s2: -.inf}\n"
                   "  dialogue: {openai: {timeout_s: .inf}}\n"
                   "  rules: {clip_t_min: .nan}\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    lines = info.value.errors
    assert len(lines) == 5, lines
    for key in ("build.sources.max_file_mb", "build.profusion.finetune_lr", "build.profusion.s2",
                "build.dialogue.openai.timeout_s", "build.rules.clip_t_min"):
        assert any(line.startswith(f"{key} = ") and line.endswith("Input should be a finite number")
                   for line in lines), (key, lines)


@pytest.mark.parametrize("override, needle", [
    ("build.scoring.num_actors=1000000000000", "build.scoring.num_actors = 1000000000000: Input should be less than "
                                               f"or equal to {MAX_ACTORS}"),
    ("build.profusion.num_actors=1000000000000", f"less than or equal to {MAX_ACTORS}"),
    ("build.scoring.num_gpus_per_actor=64", f"less than or equal to {MAX_GPUS_PER_ACTOR}"),
    ("build.sources.num_cpus_per_actor=100000", f"less than or equal to {MAX_CPUS_PER_ACTOR}"),
    ("build.scoring.batch_size=100000000", f"less than or equal to {MAX_BATCH_SIZE}"),
    ("ray.num_cpus=1000000", f"less than or equal to {MAX_LOCAL_CPUS}"),
    ("ray.num_gpus=100000", f"less than or equal to {MAX_LOCAL_GPUS}"),
])
def test_absurd_resources_are_refused(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config_dict({}, overrides=[override])
    assert needle in str(info.value)


@pytest.mark.parametrize("override", [
    "build.profusion.s1=1000000000000", "build.profusion.s2=1000000000000", "build.profusion.w_r=1000000000000",
    "build.profusion.finetune_steps=1000000000000", "build.profusion.finetune_lr=1000000000000",
    "build.profusion.finetune_weight_decay=1000000000000", "build.profusion.num_augmentations=1000000000000",
    "build.dialogue.openai.timeout_s=1000000000000", "build.dialogue.openai.backoff_s=1000000000000",
    "build.dialogue.openai.max_tokens=1000000000000", "build.dialogue.transformers.max_new_tokens=1000000000000",
    "build.dialogue.max_chars=1000000000000",
])
def test_absurd_numbers_are_refused(override):
    with pytest.raises(ConfigError) as info:
        load_config_dict({}, overrides=[override])
    assert f"{override.replace('=', ' = ')}: Input should be less than or equal to" in str(info.value)


@pytest.mark.parametrize("override, needle", [
    ("ray.address=s3://bucket", "ray.address"), ("ray.address='$(touch pwned)'", "ray.address"),
    ("ray.address=http://head:8265", "ray.address"),  # the dashboard's address is `cafe submit --address`'s
    ("models.root=''", "models.root"), ("train.data.datasets=['']", "train.data.datasets[0]"),
    (f"build.instructions.phrases=[{'x' * 5000}]", "at most 200"),
])
def test_malformed_addresses_roots_and_phrases_are_refused(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config_dict({}, overrides=[override])
    assert needle in str(info.value)


@pytest.mark.parametrize("address", ["auto", "127.0.0.1:6379", "head-svc.cafe.svc.cluster.local:6379",
                                     "ray://10.0.0.4:10001", "[::1]:6379"])
def test_real_ray_addresses_validate(address):
    assert load_config_dict({}, overrides=[f"ray.address='{address}'"]).ray.address == address


def test_paper_scale_resources_still_validate():
    cfg = load_config_dict({}, overrides=["build.profusion.num_actors=64", "build.scoring.num_actors=64",
                                          "build.scoring.num_gpus_per_actor=0.5", "build.scoring.batch_size=512",
                                          "ray.num_cpus=256", "ray.num_gpus=8"])
    assert cfg.build.scoring.num_actors == 64 and cfg.ray.num_gpus == 8


# ------------------------------------------------------------------------------------------ merging into defaults


def test_role_override_merges_into_default_path():
    cfg = load_config_dict({"models": {"root": "/m"}}, overrides=["models.t2i.dtype=float16"])
    assert cfg.models.t2i.path == "t2i" and cfg.models.t2i.dtype == "float16"
    assert str(cfg.models.role_dir("t2i")) == "/m/t2i"
    cfg = load_config_dict({"models": {"llm": {"device": "auto"}, "clip_cond": {"path": "/abs/clip"}}})
    assert cfg.models.llm.path == "llm" and cfg.models.llm.device == "auto"
    assert cfg.models.clip_cond.path == "/abs/clip"
    # the resolved dump round-trips (manifests re-validate it)
    again = load_config_dict(cfg.model_dump(mode="json"))
    assert config_hash(again) == config_hash(cfg)


def test_role_override_on_shipped_config():
    tiny = [p for p in CONFIGS if p.name == "tiny.yaml"][0]
    cfg = load_config(tiny, overrides=["models.t2i.dtype=float16", "models.dino_filter.device=cpu"])
    assert cfg.models.t2i.path == "t2i" and cfg.models.t2i.dtype == "float16"
    assert cfg.models.dino_filter.path == "dino_filter"


def test_explicit_empty_role_path_is_still_an_error():
    with pytest.raises(ConfigError) as info:
        load_config_dict({"models": {"t2i": {"path": ""}}})
    assert 'models.t2i.path = "": String should have at least 1 character' in str(info.value)


# ------------------------------------------------------------------------------------------ instructions, ray


@pytest.mark.parametrize("phrases, needle", [
    (["on the beach", "in the snow", "on the beach"], "phrases[2] 'on the beach' repeats phrases[0] 'on the beach'"),
    (["on the beach", "On  the beach"], "phrases[1] 'On  the beach' repeats phrases[0] 'on the beach'"),
    (["on the beach", "  "], "phrases[1] is blank"),
])
def test_duplicate_or_blank_phrases_are_refused(phrases, needle):
    with pytest.raises(ConfigError) as info:
        load_config_dict({"build": {"instructions": {"phrases": phrases, "per_source": 1}}})
    [line] = info.value.errors
    assert line.startswith("build.instructions.phrases = ") and needle in line


def test_forward_env_takes_names_only():
    cfg = load_config_dict({}, overrides=["ray.forward_env=[HF_HOME, MY_VAR_2]"])
    assert cfg.ray.forward_env == ["HF_HOME", "MY_VAR_2"]
    assert load_config_dict({}).ray.forward_env == ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
                                                    "DIFFUSERS_OFFLINE", "HF_HOME", "HF_HUB_DISABLE_PROGRESS_BARS"]
    with pytest.raises(ConfigError) as info:
        load_config_dict({}, overrides=["ray.forward_env=[HF_HOME, 'HF_TOKEN=hf_abc']"])
    assert "forward_env[1] = 'HF_TOKEN=hf_abc' is not an environment variable name" in str(info.value)


# ------------------------------------------------------------------------------------------ CLI: file-system errors


def _tiny_yaml() -> str:
    return str([p for p in CONFIGS if p.name == "tiny.yaml"][0])


def test_build_out_naming_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "taken.txt"
    target.write_text("x")
    assert main(["build", _tiny_yaml(), "--out", str(target)]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.err == f"cafe: error: {target}: exists and is not a directory\n"
    assert target.read_text() == "x"


def test_build_out_below_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "taken.txt"
    target.write_text("x")
    assert main(["build", _tiny_yaml(), "--out", str(target / "sub" / "out")]) == EXIT_USAGE
    assert capsys.readouterr().err == f"cafe: error: {target}: Not a directory\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only-mode directory")
def test_build_out_in_read_only_directory_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert main(["build", _tiny_yaml(), "--out", str(ro / "out")]) == EXIT_USAGE
    assert capsys.readouterr().err == f"cafe: error: {ro}: Permission denied\n"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_os_error_at_run_time_is_one_line(tmp_path, capsys, monkeypatch, code):
    """A full or read-only disk while a command runs: one line naming the path, exit 1, no traceback."""
    import pipeline.report

    victim = tmp_path / "ds" / "report" / "funnel.png"

    def write_report(dataset, **kw):
        raise OSError(code, os.strerror(code), str(victim))

    monkeypatch.setattr(pipeline.report, "write_report", write_report)
    assert main(["report", str(tmp_path / "ds")]) == EXIT_FAILURE
    captured = capsys.readouterr()
    assert captured.err == f"cafe: error: {victim}: {os.strerror(code)}\n"
    assert "Traceback" not in captured.out + captured.err


def test_os_error_wrapped_in_another_exception_is_one_line(tmp_path, capsys, monkeypatch):
    """Ray wraps a worker's OSError; the cause is what gets printed."""
    import pipeline.report

    def write_report(dataset, **kw):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/part-0.arrow")
        except OSError as exc:
            raise RuntimeError("task failed\n  with a long remote traceback") from exc

    monkeypatch.setattr(pipeline.report, "write_report", write_report)
    assert main(["report", str(tmp_path)]) == EXIT_FAILURE
    assert capsys.readouterr().err == "cafe: error: /data/out/part-0.arrow: No space left on device\n"


@pytest.mark.parametrize("case", ["model-mismatch", "superseded", "node-lost"])
def test_faults_inside_ray_workers_are_one_line(tmp_path, capsys, monkeypatch, case):
    """What ends a run inside a Ray worker reaches the user as one line (Ray's real error classes, as the driver
    receives them: a task error whose cause is the worker's exception, or Ray's own loss errors)."""
    import ray.exceptions as rx

    import pipeline.report
    from pipeline.models import ModelMismatch
    from pipeline.store import OutputBusy

    cause = {"model-mismatch": ModelMismatch("generate on node-7: t2i at /models/t2i has fingerprint aaaa, the "
                                             "driver's is bbbb: this node's model copy differs"),
             "superseded": OutputBusy("s3://b/out: a newer driver (epoch 3) holds this output; a worker of epoch 2 "
                                      "does not commit"),
             "node-lost": rx.ActorUnavailableError("The actor is unavailable: node 10.0.0.7 died\nmore", None)}[case]

    def write_report(dataset, **kw):
        if case == "node-lost":
            raise cause
        raise rx.RayTaskError("sink_batch", "Traceback (most recent call last):\n  ... 100 lines ...", cause)

    monkeypatch.setattr(pipeline.report, "write_report", write_report)
    assert main(["report", str(tmp_path)]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    want = {"model-mismatch": "cafe: error: generate on node-7: t2i at /models/t2i has fingerprint aaaa",
            "superseded": "cafe: error: s3://b/out: a newer driver (epoch 3) holds this output",
            "node-lost": "cafe: error: a Ray node, worker or actor was lost (ActorUnavailableError: "}
    assert err.startswith(want[case]), err
    if case == "node-lost":  # Ray's own message (first line) and what to do
        assert "node 10.0.0.7 died); what was committed is kept: re-run the same command to resume" in err


def _unshare_mount_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.integration
@pytest.mark.skipif(not _unshare_mount_works(), reason="needs `unshare -m` and tmpfs mounts (root)")
def test_real_read_only_and_full_disks_give_one_line(tmp_path):
    """`cafe` in a private mount namespace: --out on a read-only tmpfs, make-tiny into a 64 KiB tmpfs."""
    ro, full = tmp_path / "ro", tmp_path / "full"
    ro.mkdir()
    full.mkdir()
    cafe = f"{sys.executable} -m pipeline.cli"
    script = (f"mount -t tmpfs -o ro,size=64k tmpfs {ro} && mount -t tmpfs -o size=64k tmpfs {full} && "
              f"{cafe} build {_tiny_yaml()} --out {ro}/out; echo rc=$?; "
              f"{cafe} models make-tiny {full}/m; echo rc=$?")
    out = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.splitlines()[0] == "rc=2" and out.stdout.splitlines()[-1] == "rc=1", out
    err = [line for line in out.stderr.splitlines() if line.startswith("cafe: error:") or "Traceback" in line]
    assert err == [f"cafe: error: {ro}: Read-only file system",
                   f"cafe: error: {full}/m: No space left on device"], out.stderr


def test_help_validation_and_lookup_errors_import_no_torch(tmp_path):
    """`cafe --help`, `cafe config validate`, a config error and an unknown concept answer without importing torch
    or Ray (each costs seconds to import; at paper scale a model load costs minutes)."""
    code = ("import sys; from pipeline.cli import main\n"
            "assert main(['config', 'validate', 'configs/tiny.yaml', 'configs/paper.yaml']) == 0\n"
            "assert main(['config', 'validate', '--set', 'ray.num_cpus=0', 'configs/tiny.yaml']) == 3\n"
            "assert main(['concepts', 'generate', '--config', 'configs/concepts/tiny.yaml', '--concept', 'nope', "
            f"'--prompt', 'x', '--set', 'concepts.output={tmp_path}/c']) == 1\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'diffusers'))\n"
            "assert not heavy, heavy[:5]\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-1000:] + out.stderr[-2000:]
    assert "no finished run of concept 'nope'" in out.stderr


def test_every_subcommand_describes_itself_and_every_argument():
    """`cafe X --help` opens with what X does, and no argument of any command is left without help."""
    import argparse

    from pipeline.cli import build_parser

    missing: list[str] = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if not sub.description:
                        missing.append(" ".join(path + [name]) + ": no description")
                    walk(sub, path + [name])
            elif action.help is None and action.dest != "help":
                missing.append(" ".join(path) + f": {action.dest} has no help")

    walk(build_parser(), ["cafe"])
    assert missing == []
    build = build_parser()._subparsers._group_actions[0].choices["build"]
    assert build.description == "Round-0 CAFE dataset construction on Ray Data."
    assert "configs/tiny.yaml is the embedded default" in " ".join(build.format_help().split())
