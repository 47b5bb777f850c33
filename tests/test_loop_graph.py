"""The loop's stage graph: keys, skip/re-run sets, interruption (exception and SIGKILL), `cafe pipeline plan`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.loop.graph import Graph, Stage
from pipeline.store import Storage

ROOT = Path(__file__).resolve().parents[1]


def toy_graph(log: list[str], fail: set[str] | None = None) -> Graph:
    """a → b → d, a → c → d; each stage writes a file whose content depends on its parts and inputs."""
    fail = fail or set()

    def stage(name, deps):
        def run(ctx, keys):
            log.append(name)
            if name in fail:
                raise RuntimeError(f"{name} fails")
            inputs = [Path(ctx["out"], f"{d}.txt").read_text() for d in deps]
            Path(ctx["out"], f"{name}.txt").write_text(f"{name}({ctx['params'][name]};{','.join(inputs)})")
            return {"file": f"{name}.txt"}
        return Stage(name, deps, lambda ctx: {"param": ctx["params"][name]}, run)

    return Graph([stage("a", ()), stage("b", ("a",)), stage("c", ("a",)), stage("d", ("b", "c"))])


@pytest.fixture
def ctx(tmp_path):
    return {"out": str(tmp_path), "params": {"a": 1, "b": 2, "c": 3, "d": 4}}


def test_skips_finished_and_reruns_exactly_the_changed_stage_and_its_dependants(ctx, tmp_path):
    log: list[str] = []
    state = Storage(tmp_path / "state")
    first = toy_graph(log).run(ctx, state, echo=lambda m: None)
    assert first.ran == ["a", "b", "c", "d"] and log == ["a", "b", "c", "d"]
    log.clear()
    again = toy_graph(log).run(ctx, state, echo=lambda m: None)
    assert again.ran == [] and again.skipped == ["a", "b", "c", "d"] and log == []
    ctx["params"]["c"] = 30  # one stage's own key part
    plan = {i.name: i for i in toy_graph(log).plan(ctx, state)}
    assert {n for n, i in plan.items() if i.action == "run"} == {"c", "d"}
    assert plan["c"].why == "changed: param" and plan["d"].why == "input re-runs: c"
    toy_graph(log).run(ctx, state, echo=lambda m: None)
    assert log == ["c", "d"]
    assert Path(tmp_path, "d.txt").read_text() == "d(4;b(2;a(1;)),c(30;a(1;)))"
    ctx["params"]["c"] = 3  # back: the old key again, but its record was replaced → c and d run again
    log.clear()
    toy_graph(log).run(ctx, state, echo=lambda m: None)
    assert log == ["c", "d"]


def test_until_runs_only_what_the_stage_needs(ctx, tmp_path):
    log: list[str] = []
    state = Storage(tmp_path / "state")
    result = toy_graph(log).run(ctx, state, until="b", echo=lambda m: None)
    assert log == ["a", "b"] and [i.name for i in result.items] == ["a", "b"]
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        toy_graph(log).plan(ctx, state, until="nope")


def test_a_failed_stage_is_run_again_and_finished_ones_are_not(ctx, tmp_path):
    log: list[str] = []
    state = Storage(tmp_path / "state")
    with pytest.raises(RuntimeError, match="c fails"):
        toy_graph(log, fail={"c"}).run(ctx, state, echo=lambda m: None)
    assert log == ["a", "b", "c"]
    plan = {i.name: i for i in toy_graph(log).plan(ctx, state)}
    assert plan["c"].why == "interrupted: started, never finished" and plan["a"].action == plan["b"].action == "skip"
    log.clear()
    toy_graph(log).run(ctx, state, echo=lambda m: None)
    assert log == ["c", "d"]


def test_declaration_order_and_names_are_checked():
    s = lambda n, d=(): Stage(n, d, lambda c: {}, lambda c, k: {})  # noqa: E731
    with pytest.raises(ValueError, match="not declared before"):
        Graph([s("b", ("a",)), s("a")])
    with pytest.raises(ValueError, match="duplicate"):
        Graph([s("a"), s("a")])


KILL_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from pipeline.loop.graph import Graph, Stage
    from pipeline.store import Storage
    out = Path(sys.argv[1]); slow = sys.argv[2]
    def stage(name, deps):
        def run(ctx, keys):
            with open(out / "calls.txt", "a") as f:
                f.write(name + "\\n")
            if name == slow:
                time.sleep(60)
            (out / f"{name}.txt").write_text(name + "".join((out / f"{d}.txt").read_text() for d in deps))
            return {}
        return Stage(name, deps, lambda ctx: {}, run)
    g = Graph([stage("a", ()), stage("b", ("a",)), stage("c", ("b",))])
    g.run(None, Storage(out / "state"), echo=lambda m: None)
""")


def test_sigkill_inside_a_stage_then_rerun_equals_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    ref.mkdir(), killed.mkdir()
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(ref), "-"], check=True, env=env, cwd=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(killed), "b"], env=env, cwd=ROOT)
    deadline = time.time() + 60
    while not ((killed / "calls.txt").exists() and "b" in (killed / "calls.txt").read_text().split()):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(killed), "-"], check=True, env=env, cwd=ROOT)
    assert (killed / "calls.txt").read_text().split() == ["a", "b", "b", "c"]  # a not redone, b redone once
    for name in ("a", "b", "c"):
        assert (killed / f"{name}.txt").read_text() == (ref / f"{name}.txt").read_text()
    records = {p.name: json.loads(p.read_text())["key"] for p in (killed / "state/_loop/stages").iterdir()}
    assert records == {p.name: json.loads(p.read_text())["key"] for p in (ref / "state/_loop/stages").iterdir()}


# ------------------------------------------------------------------------------------------- the CAFE graph


def _finish_all(ctx) -> None:
    """Mark every stage of the CAFE graph finished with the keys of ``ctx`` (as a finished run leaves them)."""
    from pipeline.loop.cafe import cafe_graph

    keys, parts = cafe_graph(ctx.rounds).keys(ctx)
    for name, key in keys.items():
        ctx.state.write_json(f"_loop/stages/{name}.json", {"key": key, "parts": parts[name], "outputs": {}})


def test_cafe_plan_reruns_exactly_the_dependants_of_a_changed_key(tmp_path):
    from pipeline.loop.cafe import LoopContext, cafe_graph

    sets = [f"pipeline.output={tmp_path / 'loop'}"]
    ctx = LoopContext.load(str(ROOT / "configs/tiny.yaml"), sets, rounds=2)
    names = [s.name for s in cafe_graph(2).stages]
    assert names == ["build-r0", "train-mllm-r0", "train-diffusion-r0", "eval-r0", "build-r1", "train-mllm-r1",
                     "train-diffusion-r1", "eval-r1", "report"]
    _finish_all(ctx)
    plan = lambda extra: {i.name for i in cafe_graph(2).plan(  # noqa: E731
        LoopContext.load(str(ROOT / "configs/tiny.yaml"), sets + extra, rounds=2), ctx.state) if i.action == "run"}
    assert plan([]) == set()
    # operational settings are in no key
    assert plan(["build.profusion.num_actors=2", "train.checkpoint.every_steps=7", "pipeline.eval.device=cpu",
                 "train.mllm.gradient_checkpointing=true", "train.diffusion.gradient_checkpointing=true"]) == set()
    assert plan(["train.mllm.max_new_tokens=64"]) == {"eval-r0", "eval-r1", "report"}  # inference only
    assert plan(["train.data.shuffle_buffer=0"]) == set(names) - {"build-r0"}  # which rows train together
    assert plan(["train.diffusion.lr=0.002"]) == {"train-diffusion-r0", "eval-r0", "build-r1", "train-diffusion-r1",
                                                  "train-mllm-r1", "eval-r1", "report"}
    assert plan(["train.mllm.lam=2.0"]) == {"train-mllm-r0", "eval-r0", "build-r1", "train-diffusion-r1",
                                            "train-mllm-r1", "eval-r1", "report"}
    assert plan(["pipeline.eval.scale_dino=0.5"]) == {"eval-r0", "eval-r1", "report"}
    assert plan(["build.distill.scale_dino=0.8"]) == {"build-r1", "train-diffusion-r1", "train-mllm-r1", "eval-r1",
                                                      "report"}
    assert plan(["build.rules.dino_min=0.7"]) == set(names)


def test_pipeline_plan_loads_no_model_and_no_torch(tmp_path):
    code = ("import sys; from pipeline.cli import main; rc = main(['pipeline', 'plan', 'configs/tiny.yaml', "
            f"'--set', 'pipeline.output={tmp_path}/loop']); "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'ray'))[:5]; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "9 of 9 stage(s) to run" in out.stdout and "build-r0" in out.stdout and "never run" in out.stdout


def test_python_dash_m_pipeline_is_the_cafe_command_and_has_a_version():
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "pipeline", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"cafe {version('cafe-system')}"
