"""``cafe retrain CONFIG``: one idempotent command for a scheduler (cron, RayCronJob) to call repeatedly.

Usage::

    outcome = retrain("configs/tiny.yaml")
    print(outcome.message)        # "nothing new …" | "version 3 promoted: …" | "version 3 not promoted: …"

Steps: (1) snapshot the sources (names and sizes of every file under ``build.sources``) and key the whole loop
(:func:`pipeline.loop.cafe.cafe_graph` keys: config slices + model fingerprints); if the registry's latest version
was made from the same snapshot and loop key, there is nothing new: do nothing and say so. (2) New source files
since the round-0 build planned: append a **source increment** (``_loop/increments.json``) — the sources no
earlier increment planned (their ids in ``_loop/increments/<k>.parquet``, read by the build as
``build.sources.skip_ids``) and the promoted model, which training continues from (``train.*.init_from``).
Round 0 builds only the new increment (finished increments are no-ops); training runs on every increment, from the
promoted weights; rounds ≥ 1 are regenerated (their targets come from the new models). Changed or deleted files
are not rebuilt: new rows come from new files. (3) Run the loop (``cafe pipeline run``: stages whose keys did not
change are skipped). (4) Register the last round's assistant as a candidate with its metrics, datasets and config
hash, measured against the current model. (5) Promote it only if every gated metric (``pipeline.gate``) is within
the tolerance of the current model or better; otherwise keep the current model and record why.

Idempotent: a retrain killed anywhere is resumed by the next call (the increment is appended once per snapshot;
finished stages are skipped); of two racing on one registry at most one promotes.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from dataclasses import dataclass

from pipeline.store import Storage, is_uri

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    action: str  # "nothing_new", "promoted", "rejected"
    version: int | None
    message: str


def source_snapshot(cfg) -> str:
    """A hash of what the build would read: every source file's relative name and size (or the generate spec)."""
    s = cfg.build.sources
    h = hashlib.sha256()
    if s.kind == "generate":
        h.update(repr((s.classes, s.num_per_class, s.prompt_template)).encode())
        return h.hexdigest()[:16]
    import pyarrow.fs as pafs

    for location in filter(None, (s.path, s.manifest)):
        root = Storage(location if is_uri(location) else str(Path(location).absolute()))
        top = root.fs.get_file_info(root.path())
        if top.type == pafs.FileType.File:  # a manifest or one table file
            infos = [top]
        else:
            infos = root.fs.get_file_info(pafs.FileSelector(root.path(), recursive=True, allow_not_found=True))
        for info in sorted(infos, key=lambda i: i.path):
            if info.type == pafs.FileType.File:
                h.update(f"{info.path[len(root.path()):]}\0{info.size}\n".encode())
    return h.hexdigest()[:16]


def retrain(config_path: str, overrides: list[str] | None = None, address: str | None = None,
            echo=print) -> Outcome:
    from pipeline.loop.cafe import LoopContext, cafe_graph, round_datasets, run_loop
    from pipeline.loop.graph import outputs_of
    from pipeline.loop.registry import open_registry, registry_location

    ctx = LoopContext.load(config_path, overrides, address=address)
    cfg = ctx.cfg
    reg = open_registry(registry_location(cfg))
    snapshot = source_snapshot(cfg)
    graph = cafe_graph(ctx.rounds)
    keys, _ = graph.keys(ctx)
    loop_key = keys["report"]
    versions = reg.list()
    latest = versions[-1] if versions else None
    if latest is not None and latest.sources == snapshot and latest.config_hash == loop_key:
        return Outcome("nothing_new", None, f"nothing new: sources {snapshot} and loop key {loop_key} are those of "
                                            f"version {latest.version} ({latest.status}); nothing done")
    current = reg.current()
    if (latest is None or latest.sources != snapshot) and ctx.increments[-1].get("snapshot") != snapshot \
            and ctx.state.exists("_loop/stages/build-r0.json"):  # round 0 was planned: are there new files?
        new = add_increment(ctx, snapshot, current)
        if new == 0 and latest is not None:
            return Outcome("nothing_new", None, f"nothing new: sources {snapshot} differ from version "
                                                f"{latest.version}'s but hold no file round 0 has not planned (changed "
                                                "or deleted files are not rebuilt); nothing done")
        if new:
            echo(f"[retrain] {new} new source(s): round 0 builds them as source increment {len(ctx.increments) - 1}")
    inc = ctx.increments[-1]
    if len(ctx.increments) > 1 and inc.get("snapshot") == snapshot:
        keys, _ = graph.keys(ctx)
        loop_key = keys["report"]
        start = f"version {inc['init']['version']}" if inc.get("init") else "scratch (no promoted model)"
        echo(f"[retrain] source increment {len(ctx.increments) - 1}: training continues from {start}")
    echo(f"[retrain] sources {snapshot}, loop key {loop_key}; current model: "
         f"{'version ' + str(current.version) if current else 'none'}")
    run_loop(ctx, echo=echo)
    last = ctx.rounds - 1
    ev = outputs_of(ctx.state, f"eval-r{last}")
    checkpoint = {"mllm": outputs_of(ctx.state, f"train-mllm-r{last}")["weights"],
                  "diffusion": outputs_of(ctx.state, f"train-diffusion-r{last}")["weights"], "eval": ev["report"]}
    datasets = [d for r in range(ctx.rounds) for d in round_datasets(outputs_of(ctx.state, f"build-r{r}"))]
    g = cfg.pipeline.gate
    if g.split not in ev["metrics"]:
        raise ValueError(f"pipeline.gate.split = {g.split}: the evaluation has splits {sorted(ev['metrics'])} "
                         "(changing and held_out need pipeline.eval.oracle)")
    version = reg.register(checkpoint, datasets, loop_key, ev["metrics"][g.split], snapshot,
                           base=current.version if current else None)
    decision = reg.decide(version, g.metrics, g.tolerance)
    action = "promoted" if decision.promoted else "rejected"
    return Outcome(action, version, f"version {version} {'promoted' if decision.promoted else 'not promoted'}: "
                                    f"{decision.reason}")


def add_increment(ctx, snapshot: str, current) -> int:
    """Append source increment k to ``ctx`` and the loop state: the ids every earlier increment planned go to
    ``_loop/increments/<k>.parquet`` (the new build's ``build.sources.skip_ids``), with the current model as the
    training's start. Returns how many listed sources are new (0: nothing appended)."""
    import json

    import pyarrow as pa

    from pipeline.loop.cafe import INCREMENTS, round_dir
    from pipeline.sources import iter_sources

    planned: set[str] = set()
    for k in range(len(ctx.increments)):
        planned |= planned_ids(Storage(round_dir(ctx, 0, k)))
    new = sum(1 for s in iter_sources(ctx.cfg, exclude_uris=[ctx.out]) if s["source_id"] not in planned)
    if new == 0:
        return 0
    k = len(ctx.increments)
    skip = f"_loop/increments/{k:04d}-{snapshot}.parquet"
    ctx.state.write_parquet(skip, pa.table({"source_id": pa.array(sorted(planned), pa.string())}))
    init = None
    if current is not None:
        init = {"version": current.version, "mllm": current.checkpoint["mllm"],
                "diffusion": current.checkpoint["diffusion"]}
    ctx.increments = [*ctx.increments, {"snapshot": snapshot, "skip_ids": ctx.state.uri_of(skip), "init": init}]
    ctx.state.write_json(INCREMENTS, {"increments": ctx.increments})
    log.info("source increment %d: %d new source(s), %d planned before: %s", k, new, len(planned),
             json.dumps(ctx.increments[-1]))
    return new


def planned_ids(build: Storage) -> set[str]:
    """The source ids a build planned (its plan under ``_work/plan/<plan key>/``; [] when it planned nothing)."""
    import json

    from pipeline.stages import plan_table

    identity = build.read_json("_work/identity.json")
    if identity is None:
        return set()
    return {json.loads(s)["source_id"] for s in plan_table(build, identity["plan"]).column("source").to_pylist()}
