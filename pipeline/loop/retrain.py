"""``cafe retrain CONFIG``: one idempotent command for a scheduler (cron, RayCronJob) to call repeatedly.

Usage::

    outcome = retrain("configs/tiny.yaml")
    print(outcome.message)        # "nothing new …" | "version 3 promoted: …" | "version 3 not promoted: …"

Steps: (1) snapshot the sources (names and sizes of every file under ``build.sources``) and key the whole loop
(:func:`pipeline.loop.cafe.cafe_graph` keys: config slices + model fingerprints); if the registry's latest version
was made from the same snapshot and loop key, there is nothing new: do nothing and say so. (2) Otherwise run the
loop (``cafe pipeline run``: stages whose keys did not change are skipped). (3) Register the last round's
assistant as a candidate with its metrics, datasets and config hash, measured against the current model.
(4) Promote it only if every gated metric (``pipeline.gate``) is within the tolerance of the current model or
better; otherwise keep the current model and record why.
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
    from pipeline.loop.cafe import LoopContext, cafe_graph, run_loop
    from pipeline.loop.graph import outputs_of
    from pipeline.loop.registry import open_registry, registry_location

    ctx = LoopContext.load(config_path, overrides, address=address)
    cfg = ctx.cfg
    reg = open_registry(registry_location(cfg))
    snapshot = source_snapshot(cfg)
    graph = cafe_graph(ctx.rounds)
    keys, _ = graph.keys(ctx)
    loop_key = keys["report"]
    latest = reg.list()[-1] if reg.list() else None
    if latest is not None and latest.sources == snapshot and latest.config_hash == loop_key:
        return Outcome("nothing_new", None, f"nothing new: sources {snapshot} and loop key {loop_key} are those of "
                                            f"version {latest.version} ({latest.status}); nothing done")
    current = reg.current()
    echo(f"[retrain] sources {snapshot}, loop key {loop_key}; current model: "
         f"{'version ' + str(current.version) if current else 'none'}")
    run_loop(ctx, echo=echo)
    last = ctx.rounds - 1
    ev = outputs_of(ctx.state, f"eval-r{last}")
    checkpoint = {"mllm": outputs_of(ctx.state, f"train-mllm-r{last}")["weights"],
                  "diffusion": outputs_of(ctx.state, f"train-diffusion-r{last}")["weights"], "eval": ev["report"]}
    datasets = [outputs_of(ctx.state, f"build-r{r}")["dataset"] for r in range(ctx.rounds)]
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
