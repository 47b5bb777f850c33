"""The CAFE loop as a stage graph (SPEC §1 steps 3–7, §2, D3): ``cafe pipeline plan|run``.

Usage::

    ctx = LoopContext.load("configs/tiny.yaml", overrides=[], rounds=2)
    for item in cafe_graph(ctx).plan(ctx, ctx.state):  print(item.name, item.action, item.why)
    run_loop(ctx)

Stages, for r = 0 … rounds−1 (each keyed by its semantic config slice and its inputs' keys)::

    build-r0 (ProFusion) ─┬─ train-mllm-r0 ──┬─ eval-r0
                          └─ train-diffusion-r0 ┘     │
    build-r1 (Eq. 4 from the r0 models) ─ train-*-r1 (on the union r0 ∪ r1) ─ eval-r1 ─ … ─ report

Where things go (under ``pipeline.output``, default ``<run.output_dir>/<run.name>-loop``)::

    rounds/r<r>-<plan>/            each round's build (dataset/, candidates/, quarantine/, report/, manifest.json)
    train/r<r>-<key>/{mllm,diffusion}   the round's exported weights (Ray Train runs in train/runs/)
    eval/r<r>-<key>/               metrics.json, table.md, samples.png
    report/report.md               timeline, funnels, metric curves, samples
    _loop/                         the graph's records (one per finished stage) and the lease

Every dataset directory is a complete round; the training view of round r is the list of rounds ≤ r (no row is
copied: ``datasets.load_dataset("parquet", data_files=[...])`` and ``ray.data.read_parquet([...])`` read the union).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.loop.graph import Graph, Stage, outputs_of, stable_key
from pipeline.store import Lease, Storage, join

log = logging.getLogger(__name__)

#: train settings that decide how a run goes, never what it learns (in no key)
TRAIN_OPERATIONAL = frozenset({"storage_path", "output_dir", "log_dir", "run_name", "log_every", "stop_at_step",
                               "checkpoint", "cache", "generate", "datasets"})
#: recipe settings that change how a run computes or what inference does, never what training learns: gradient
#: checkpointing recomputes the same activations; the reply length is the evaluation's (in its key)
RECIPE_OPERATIONAL = frozenset({"gradient_checkpointing", "max_new_tokens"})
ROLES_TRAIN = ("t2i", "clip_cond", "dino_cond", "llm")


@dataclass
class LoopContext:
    cfg: object  # CafeConfig
    config_path: str | None
    overrides: list[str]
    rounds: int
    out: str
    address: str | None = None
    _fp: dict = field(default_factory=dict)
    #: round 0's source increments (``_loop/increments.json``, appended by ``cafe retrain``): increment 0 is the
    #: config's sources; increment k ≥ 1 = the sources of snapshot k that no earlier increment planned, and the
    #: promoted model training continues from (``init``)
    increments: list[dict] = field(default_factory=lambda: [dict(FIRST_INCREMENT)])

    @classmethod
    def load(cls, config_path: str, overrides: list[str] | None = None, rounds: int | None = None,
             address: str | None = None) -> "LoopContext":
        from pipeline.config import load_config

        overrides = list(overrides or [])
        cfg = load_config(config_path, overrides)
        out = loop_output(cfg)
        increments = Storage(out).read_json(INCREMENTS, {}).get("increments") or [dict(FIRST_INCREMENT)]
        return cls(cfg, config_path, overrides, rounds or cfg.pipeline.rounds, out, address, increments=increments)

    @property
    def init(self) -> dict | None:
        """The exported model training continues from (the latest increment's), or None: from scratch."""
        return self.increments[-1].get("init")

    @property
    def state(self) -> Storage:
        return Storage(self.out)

    def derived(self, sets: list[str]):
        """The config with ``--set`` style overrides applied on top (a stage's own view)."""
        from pipeline.config import load_config_dict

        return load_config_dict(self.cfg.model_dump(mode="json"), "<loop>", sets)

    def fingerprint(self, path) -> str:
        from training.models.fingerprint import fingerprint

        key = str(path)
        if key not in self._fp:
            self._fp[key] = fingerprint(path) if Path(path).exists() else "missing"
        return self._fp[key]

    def roles(self, names) -> dict:
        return {r: self.fingerprint(self.cfg.models.role_dir(r)) for r in names}


INCREMENTS = "_loop/increments.json"
FIRST_INCREMENT = {"snapshot": None, "skip_ids": None, "init": None}


def loop_output(cfg) -> str:
    """``pipeline.output``, default ``<run.output_dir>/<run.name>-loop`` (absolute, or a URI)."""
    from pipeline.train import _abs

    return _abs(cfg.pipeline.output or join(cfg.run.output_dir, f"{cfg.run.name}-loop"))


def _semantic(model, exclude: frozenset = frozenset()) -> dict:
    """A config section without its operational fields: the build's rule (:data:`pipeline.build.OPERATIONAL_FIELDS`)."""
    from pipeline.build import _semantic as semantic

    return semantic(model, exclude)


# ------------------------------------------------------------------------------------------------ paths


def round_dir(ctx: LoopContext, r: int, k: int = 0) -> str:
    """Round r's build output (increment k of round 0): named by its plan key, so other sources get another
    directory (never a conflict)."""
    from pipeline.build import stage_keys

    plan = stage_keys(_build_cfg(ctx, r, "<plan>", k=k),
                      {"t2i": ctx.fingerprint(ctx.cfg.models.role_dir("t2i"))})["plan"]
    return f"{ctx.out}/rounds/r{r}-{plan[:8]}"


def _build_cfg(ctx: LoopContext, r: int, diffusion: str | None, mllm: str | None = None, k: int = 0):
    """The build of round r (round 0: of increment k). Rounds ≥ 1 cover every source of the latest snapshot."""
    sets = [f"build.round={r}"]
    inc = ctx.increments[k] if r == 0 else ctx.increments[-1]
    if inc.get("snapshot"):
        sets.append(f"build.sources.snapshot={json.dumps(inc['snapshot'])}")
    if r == 0 and inc.get("skip_ids"):
        sets.append(f"build.sources.skip_ids={json.dumps(inc['skip_ids'])}")
    if r >= 1:
        sets += [f"build.distill.diffusion={diffusion}"] + ([f"build.distill.mllm={mllm}"] if mllm else [])
    return ctx.derived(sets)


def _train_cfg(ctx: LoopContext, r: int, key: str, datasets: list[str]):
    base = f"{ctx.out}/train"
    sets = [f"train.data.datasets={json.dumps(datasets)}",  # JSON is YAML: any path, quoted
            f"train.output_dir={base}/r{r}-{key[:8]}",
            f"train.storage_path={base}/runs", f"train.log_dir={base}/tensorboard",
            f"train.run_name=r{r}-{key[:8]}"]
    if ctx.init:  # cafe retrain: continue from the promoted model
        sets += [f"train.{m}.init_from={json.dumps(ctx.init[m])}" for m in ("mllm", "diffusion")]
    return ctx.derived(sets)


def round_datasets(outputs: dict) -> list[str]:
    """A finished build stage's datasets that kept rows (round 0: one per source increment)."""
    return [i["dataset"] for i in outputs.get("increments", [outputs]) if i["kept"] > 0]


# ------------------------------------------------------------------------------------------------ stages


def _build_stage(r: int) -> Stage:
    deps = () if r == 0 else (f"train-mllm-r{r - 1}", f"train-diffusion-r{r - 1}")

    def parts(ctx: LoopContext) -> dict:
        from pipeline.build import stage_keys, used_roles

        def key(k: int) -> str:
            cfg = _build_cfg(ctx, r, "<from input>", "<from input>", k=k)
            fps = {role: ctx.fingerprint(cfg.models.role_dir(role)) for role in used_roles(cfg)}
            if cfg.build.scoring.oracle:
                fps["oracle"] = ctx.fingerprint(cfg.build.scoring.oracle)
            # rounds ≥ 1: the models enter through the inputs' keys (their weights do not exist before they train)
            return stage_keys(cfg, fps)["dialogue"]

        parts = {"build": key(0)}
        if r == 0 and len(ctx.increments) > 1:
            parts["increments"] = [key(k) for k in range(1, len(ctx.increments))]
        return parts

    def build(ctx: LoopContext, k: int, diffusion: str | None, mllm: str | None) -> dict:
        from pipeline.build import run_build

        cfg = _build_cfg(ctx, r, diffusion, mllm if ctx.cfg.build.distill.mode == "mix" else None, k=k)
        out = round_dir(ctx, r, k)
        result = run_build(cfg, out_dir=out, address=ctx.address, config_path=ctx.config_path)
        if result.pending:
            raise RuntimeError(f"build-r{r}: {result.pending} record(s) pending after transient failures; re-run "
                               "the same command to retry exactly those")
        c = result.manifest["counts"]
        return {"dataset": out, "kept": c["kept"], "candidates": c["candidates"], "quarantined": c["quarantined"],
                "dataset_hash": result.manifest["dataset_hash"]}

    def run(ctx: LoopContext, keys: dict) -> dict:
        mllm = diffusion = None
        if r >= 1:
            mllm = outputs_of(ctx.state, f"train-mllm-r{r - 1}")["weights"]
            diffusion = outputs_of(ctx.state, f"train-diffusion-r{r - 1}")["weights"]
        # round 0: every source increment (a finished one is a no-op: all its chunks are sunk)
        parts = [build(ctx, k, diffusion, mllm) for k in range(len(ctx.increments) if r == 0 else 1)]
        outputs = dict(parts[0])
        if len(parts) > 1:
            outputs["increments"] = parts
            for n in ("kept", "candidates", "quarantined"):
                outputs[n] = sum(p[n] for p in parts)
        if outputs["kept"] == 0 and r == 0:
            raise RuntimeError(f"build-r{r} kept no row (of {outputs['candidates']} candidates): nothing to train "
                               f"on; see {parts[-1]['dataset']}/report/report.md")
        return outputs

    return Stage(f"build-r{r}", deps, parts, run,
                 "round 0: ProFusion targets" if r == 0 else f"round {r}: Eq. 4 targets from the round {r - 1} models")


def _train_stage(r: int, model: str) -> Stage:
    deps = tuple(f"build-r{i}" for i in range(r + 1))

    def parts(ctx: LoopContext) -> dict:
        t = ctx.cfg.train
        # a 16-bit cache rounds the features the model learns from (float32 keeps the keys it always had)
        cache = {"cache_dtype": t.cache.dtype} if t.cache.dtype != "float32" and t.data.cache != "off" else {}
        init = {"init": ctx.init[model]} if ctx.init else {}  # continued from the promoted model (cafe retrain)
        return {"model": model, "recipe": _semantic(getattr(t, model), RECIPE_OPERATIONAL), **cache, **init,
                "train": _semantic(t, TRAIN_OPERATIONAL | {"mllm", "diffusion", "promptnet"}),
                "deepspeed_file": _file_hash(t.deepspeed.config), "roles": ctx.roles(ROLES_TRAIN)}

    def run(ctx: LoopContext, keys: dict) -> dict:
        from pipeline.train import train_model

        rounds = [outputs_of(ctx.state, f"build-r{i}") for i in range(r + 1)]
        datasets = [d for b in rounds for d in round_datasets(b)]  # a round that kept no row adds nothing
        for i, b in enumerate(rounds):
            if b["kept"] == 0:
                log.warning("train-%s-r%d: round %d kept no row; training on the other rounds", model, r, i)
        cfg = _train_cfg(ctx, r, keys[f"train-{model}-r{r}"], datasets)
        summary = train_model(cfg, model, address=ctx.address)
        if summary.output is None:
            raise RuntimeError(f"train-{model}-r{r}: the run ended without a checkpoint")
        return {"weights": summary.output, "steps": summary.steps, "datasets": datasets,
                "final_loss": summary.losses[-1].get("loss") if summary.losses else None}

    return Stage(f"train-{model}-r{r}", deps, parts, run, f"{model} on rounds 0..{r}")


def _file_hash(path: str) -> str:
    import hashlib

    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else "missing"


def _eval_stage(r: int) -> Stage:
    deps = (f"train-mllm-r{r}", f"train-diffusion-r{r}")

    def parts(ctx: LoopContext) -> dict:
        e = ctx.cfg.pipeline.eval
        extra = {"subjects": ctx.fingerprint(e.subjects)}
        if e.oracle:
            extra["oracle"] = ctx.fingerprint(e.oracle)
        return {"eval": _semantic(e, frozenset({"device"})), "format": 3, **extra,  # 3: pairs.parquet
                "max_new_tokens": ctx.cfg.train.mllm.max_new_tokens,
                "roles": ctx.roles(("t2i", "clip_filter", "dino_filter"))}

    def run(ctx: LoopContext, keys: dict) -> dict:
        from pipeline.loop.evaluate import evaluate_checkpoint, flat_metrics

        mllm = outputs_of(ctx.state, f"train-mllm-r{r}")["weights"]
        diffusion = outputs_of(ctx.state, f"train-diffusion-r{r}")["weights"]
        loc = f"{ctx.out}/eval/r{r}-{keys[f'eval-r{r}'][:8]}"
        report = evaluate_checkpoint(ctx.cfg, mllm, diffusion, Storage(loc),
                                     progress=lambda m: log.info("eval-r%d: %s", r, m))
        splits = next(iter(report["methods"].values())).get("oracle", {"all": None}).keys()
        return {"report": loc, "metrics": {split: flat_metrics(report, split) for split in splits}}

    return Stage(f"eval-r{r}", deps, parts, run, f"the round {r} assistant against the baselines")


def _report_stage(rounds: int) -> Stage:
    deps = tuple(f"eval-r{r}" for r in range(rounds)) + tuple(f"build-r{r}" for r in range(rounds))

    def run(ctx: LoopContext, keys: dict) -> dict:
        from pipeline.loop.report import write_loop_report

        return {"report": write_loop_report(ctx, rounds)}

    return Stage("report", deps, lambda ctx: {"version": 1}, run, "the run's report")


def cafe_graph(rounds: int) -> Graph:
    stages: list[Stage] = []
    for r in range(rounds):
        stages += [_build_stage(r), _train_stage(r, "mllm"), _train_stage(r, "diffusion"), _eval_stage(r)]
    stages.append(_report_stage(rounds))
    return Graph(stages)


def run_loop(ctx: LoopContext, until: str | None = None, echo=print):
    """Run (or resume) the loop under one lease: a second driver on the same output is refused."""
    graph = cafe_graph(ctx.rounds)
    state = ctx.state
    lease = Lease(state.sub("_loop"), ttl_s=ctx.cfg.build.lease_ttl_s, heartbeat_s=ctx.cfg.build.lease_ttl_s / 6)
    lease.acquire(wait_s=ctx.cfg.build.lease_wait)
    try:
        if not any(i.action == "run" for i in graph.plan(ctx, state, until)):
            return graph.run(ctx, state, until=until, echo=echo)  # all finished: no Ray, no model
        from pipeline.local_ray import ray_session

        # one Ray session for every stage (each would otherwise start and stop its own local cluster)
        with ray_session(ctx.cfg, ctx.address):
            return graph.run(ctx, state, until=until, echo=echo)
    finally:
        lease.release()
