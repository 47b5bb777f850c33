"""The model registry and its promotion gate: better promoted, worse refused with the reason, rollback, races —
on each store: SQLite, the decision log in a local directory, and the decision log on S3 (a real S3-compatible
server on 127.0.0.1)."""
from __future__ import annotations

import multiprocessing as mp

import pytest

from pipeline.loop.registry import LogRegistry, SqliteRegistry, gate_check, open_registry
from tests.s3util import s3_bucket, s3_server  # noqa: F401  (fixtures)

GATE = ["assistant.both", "assistant.identity"]


def metrics(both: float, identity: float) -> dict:
    return {"assistant.both": both, "assistant.identity": identity, "assistant.dino": 0.5}


def test_gate_compares_every_metric_within_the_tolerance():
    cur = metrics(0.40, 0.60)
    assert gate_check(metrics(0.39, 0.61), cur, GATE, 0.02)[0]  # within tolerance
    ok, why = gate_check(metrics(0.37, 0.70), cur, GATE, 0.02)
    assert not ok and "assistant.both 0.3700 < 0.4000" in why and "identity" not in why
    assert gate_check(metrics(0.5, 0.5), None, GATE, 0.0) == (True, "no current model: the first candidate is promoted")
    assert not gate_check({"assistant.both": 1.0}, cur, GATE, 0.0)[0]  # a missing metric never passes


@pytest.fixture(params=["sqlite", "log", "s3"])
def where(request, tmp_path):
    """A fresh registry location of each kind (a function: the race test opens it again in other processes)."""
    if request.param == "sqlite":
        return str(tmp_path / "registry.sqlite")
    if request.param == "log":
        return str(tmp_path / "registry")
    return request.getfixturevalue("s3_bucket") + "/loop/registry"


def test_promote_refuse_and_rollback(where):
    reg = open_registry(where)
    v1 = reg.register({"mllm": "a", "diffusion": "b"}, ["r0"], "k1", metrics(0.30, 0.50), "s1", base=None)
    assert reg.decide(v1, GATE, 0.02).promoted and reg.current().version == v1
    worse = reg.register({"mllm": "c", "diffusion": "d"}, ["r0", "r1"], "k2", metrics(0.10, 0.50), "s2", base=v1)
    d = reg.decide(worse, GATE, 0.02)
    assert not d.promoted and "assistant.both 0.1000 < 0.3000" in d.reason
    assert reg.get(worse).status == "rejected" and reg.get(worse).reason == d.reason
    assert reg.current().version == v1  # the current model is kept
    better = reg.register({"mllm": "e", "diffusion": "f"}, ["r0", "r1"], "k3", metrics(0.35, 0.55), "s3", base=v1)
    assert reg.decide(better, GATE, 0.02).promoted and reg.current().version == better
    old, new = reg.rollback()
    assert (old.version, new.version) == (better, v1) and reg.current().checkpoint == {"mllm": "a", "diffusion": "b"}
    assert reg.get(better).status == "rolled_back"
    reg.promote(better)  # by hand, back again
    assert reg.current().version == better
    assert [v.version for v in reg.list()] == [v1, worse, better]
    with pytest.raises(ValueError, match="not a candidate"):
        reg.decide(better, GATE, 0.02)


def test_a_candidate_measured_against_an_old_model_is_stale(where):
    reg = open_registry(where)
    v1 = reg.register({}, [], "k", metrics(0.3, 0.5), "s", base=None)
    reg.decide(v1, GATE, 0.0)
    late = reg.register({}, [], "k", metrics(0.9, 0.9), "s", base=None)  # started before v1 was promoted
    d = reg.decide(late, GATE, 0.0)
    assert not d.promoted and d.reason.startswith("stale: measured against version None")


def _race(path: str, barrier, base, both: float, out) -> None:
    reg = open_registry(path)
    v = reg.register({"who": both}, [], "k", metrics(both, 0.9), "s", base=base)
    barrier.wait()
    out.put((v, reg.decide(v, GATE, 0.02).promoted))


@pytest.mark.parametrize("base_promoted", [False, True])
def test_two_racing_retrains_promote_at_most_one(where, base_promoted):
    path = where
    reg = open_registry(path)
    base = None
    if base_promoted:
        base = reg.register({}, [], "k", metrics(0.1, 0.1), "s", base=None)
        reg.decide(base, GATE, 0.0)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(path, barrier, base, both, out)) for both in (0.5, 0.6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = [out.get(timeout=5) for _ in procs]
    assert sum(promoted for _, promoted in results) == 1  # both pass the gate alone; one wins the swap
    winner = next(v for v, promoted in results if promoted)
    assert reg.current().version == winner
    loser = next(v for v, promoted in results if not promoted)
    assert reg.get(loser).reason.startswith("stale:")


def test_the_location_chooses_the_store(tmp_path):
    assert isinstance(open_registry(tmp_path / "registry.sqlite"), SqliteRegistry)
    assert isinstance(open_registry(tmp_path / "registry"), LogRegistry)
    assert isinstance(open_registry("s3://bucket/loop/registry"), LogRegistry)
    with pytest.raises(ValueError, match="SQLite needs a POSIX file system"):
        open_registry("s3://bucket/registry.sqlite")


def test_the_log_is_the_audit_trail_and_a_reader_sees_other_writers(tmp_path):
    """Two handles on one log: each sees the other's decisions; the log holds one immutable entry per decision."""
    a, b = open_registry(tmp_path / "reg"), open_registry(tmp_path / "reg")
    v1 = a.register({"mllm": "m1"}, ["r0"], "k", metrics(0.3, 0.5), "s1", base=None)
    assert b.decide(v1, GATE, 0.0).promoted  # b never saw v1 registered: it reads the new entry
    v2 = b.register({"mllm": "m2"}, ["r0"], "k", metrics(0.1, 0.5), "s2", base=v1)
    assert not a.decide(v2, GATE, 0.0).promoted
    assert a.current().version == b.current().version == v1
    entries = sorted((tmp_path / "reg" / "log").iterdir())
    assert [p.name for p in entries] == [f"{i:010d}.json" for i in (1, 2, 3, 4)]
    import json

    ops = [json.loads(p.read_text())["op"] for p in entries]
    assert ops == ["register", "decide", "register", "decide"]
    assert [v.status for v in a.list()] == ["promoted", "rejected"]


# ------------------------------------------------------------------------------------- cafe retrain's decisions


def test_retrain_does_nothing_without_new_data_and_gates_a_worse_candidate(tmp_path, monkeypatch):
    """`cafe retrain`'s flow with the loop's stages replaced by records (the real loop is exercised in
    tests/test_loop_run.py): first run promoted, same sources → nothing, new sources + worse model → refused."""
    import shutil

    from pipeline.loop import cafe, retrain as R
    from tests.trainutil import WORLD

    src = tmp_path / "src" / "circle"
    src.mkdir(parents=True)
    for f in sorted((WORLD / "sources" / "circle").glob("*.png"))[:2]:
        shutil.copy(f, src / f.name)
    quality = {"both": 0.4}

    from pipeline.build import stage_keys, write_plan
    from pipeline.store import Storage

    def fake_run_loop(ctx, until=None, echo=print):
        keys, parts = cafe.cafe_graph(ctx.rounds).keys(ctx)
        for k in range(len(ctx.increments)):  # round 0's real plans (what the build would plan; no model runs)
            cfg, out = cafe._build_cfg(ctx, 0, None, k=k), Storage(cafe.round_dir(ctx, 0, k))
            plan = stage_keys(cfg, {})["plan"]
            write_plan(cfg, out, plan, exclude_uris=[])
            out.write_json("_work/identity.json", {"plan": plan})
        outs = {f"build-r{r}": {"dataset": f"{ctx.out}/rounds/r{r}", "kept": 1} for r in range(ctx.rounds)}
        outs.update({f"train-{m}-r{r}": {"weights": f"{ctx.out}/{m}{r}"} for m in ("mllm", "diffusion")
                     for r in range(ctx.rounds)})
        outs.update({f"eval-r{r}": {"report": f"{ctx.out}/eval{r}", "metrics": {"changing": {
            "assistant.both": quality["both"], "assistant.identity": 0.5, "assistant.instruction": 0.5}}}
            for r in range(ctx.rounds)})
        for name, out in outs.items():
            ctx.state.write_json(f"_loop/stages/{name}.json", {"key": keys[name], "outputs": out})

    monkeypatch.setattr(cafe, "run_loop", fake_run_loop)
    sets = [f"pipeline.output={tmp_path / 'loop'}", f"build.sources.path={tmp_path / 'src'}",
            "build.sources.exclude=[]"]
    first = R.retrain("configs/tiny.yaml", sets, echo=lambda m: None)
    assert first.action == "promoted" and first.version == 1
    same = R.retrain("configs/tiny.yaml", sets, echo=lambda m: None)
    assert same.action == "nothing_new" and "nothing done" in same.message
    new_file = sorted((WORLD / "sources" / "circle").glob("*.png"))[5]
    shutil.copy(new_file, src)  # new source data
    quality["both"] = 0.1  # and a worse model
    said: list[str] = []
    worse = R.retrain("configs/tiny.yaml", sets, echo=said.append)
    assert worse.action == "rejected" and "assistant.both 0.1000 < 0.4000" in worse.message
    reg = open_registry(tmp_path / "loop" / "registry.sqlite")
    assert reg.current().version == 1 and reg.get(2).status == "rejected" and reg.get(2).base == 1
    assert reg.get(2).sources != reg.get(1).sources
    # the new file is round 0's source increment 1: only it is planned, training starts from version 1's weights
    ctx = cafe.LoopContext.load("configs/tiny.yaml", sets)
    assert len(ctx.increments) == 2 and ctx.init == {"version": 1, **{m: reg.get(1).checkpoint[m]
                                                                      for m in ("mllm", "diffusion")}}
    from pipeline.loop.retrain import planned_ids
    from pipeline.sources import consumed_ids, source_id

    first = planned_ids(Storage(cafe.round_dir(ctx, 0, 0)))
    assert len(first) == 2 and consumed_ids(ctx.increments[1]["skip_ids"]) == first
    assert planned_ids(Storage(cafe.round_dir(ctx, 0, 1))) == {source_id("file", f"circle/{new_file.name}")}
    assert cafe._train_cfg(ctx, 0, "k" * 16, ["d"]).train.diffusion.init_from == reg.get(1).checkpoint["diffusion"]
    assert any("1 new source(s)" in m for m in said) and any("continues from version 1" in m for m in said)
    assert R.retrain("configs/tiny.yaml", sets, echo=lambda m: None).action == "nothing_new"
    (src / new_file.name).write_bytes(new_file.read_bytes() + b"x")  # a changed file is not new data
    again = R.retrain("configs/tiny.yaml", sets, echo=lambda m: None)
    assert again.action == "nothing_new" and "changed or deleted files are not rebuilt" in again.message
