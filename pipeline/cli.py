"""``cafe`` — the command line. Each command is a thin layer over one documented Python function.

Usage::

    cafe config validate configs/*.yaml [--check-paths]
    cafe config show configs/tiny.yaml --set build.profusion.num_inference_steps=10
    cafe models make-tiny models/tiny
    cafe models check models/tiny            # or a config file
    cafe models convert-promptnet promptnet.bin --t2i DIR --image-encoder DIR --out DIR
    cafe pipeline plan|run configs/tiny.yaml [--rounds N] [--until STAGE]   # the CAFE loop (docs/loop.md)
    cafe eval configs/tiny.yaml [--mllm DIR --diffusion DIR | --checkpoint VERSION]
    cafe retrain configs/tiny.yaml · cafe models list|promote VERSION|rollback [--config C]
    cafe build configs/tiny.yaml [--set ...] [--out DIR] [--address RAY_ADDRESS]
    cafe refilter DATASET_DIR --set build.rules.clip_t_min=0.25 --out DIR
    cafe report DATASET_DIR
    cafe world make models/world [--seed N] [--only STAGE] [--force]
    cafe world check models/world [--write]
    cafe concepts run configs/concepts/tiny.yaml [--set ...]      # ICO / Infusion jobs on Ray actors
    cafe concepts status | generate --concept ID --prompt "a photo of {}" [--dci] | eval --concept ID
    cafe submit --address http://HEAD:8265 -- cafe pipeline run configs/paper.yaml   # a job on a Ray cluster
    cafe jobs list|status|logs [--follow]|stop JOB_ID [--address URL]
    cafe deploy render configs/paper.yaml --out deploy/        # KubeRay manifests from the config

Exit codes (stable, for scripts): 0 success · 1 runtime failure · 2 usage error · 3 invalid config ·
4 unusable model directory · 130 interrupted. A file-system failure (read-only or full disk, a path that is
a file where a directory is needed, ...) prints one line, ``cafe: error: PATH: REASON``, and exits 1
(2 when it is found while checking the arguments, before any work).
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG, EXIT_MODEL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

log = logging.getLogger("cafe")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config key (YAML value); repeatable")


# ------------------------------------------------------------------------------------------ config


def cmd_config_validate(args) -> int:
    from pipeline.config import ConfigError, check_paths, load_config

    failed = 0
    for path in args.files:
        try:
            cfg = load_config(path, args.overrides)
            problems = check_paths(cfg) if args.check_paths else []
            if problems:
                raise ConfigError(path, problems)
            print(f"{path}: ok")
        except ConfigError as exc:
            failed += 1
            print(str(exc), file=sys.stderr)
    return EXIT_CONFIG if failed else EXIT_OK


def cmd_config_show(args) -> int:
    import yaml

    from pipeline.config import load_config

    cfg = load_config(args.file, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ models


def cmd_models_make_tiny(args) -> int:
    from pipeline.models import make_tiny_models

    try:
        written = make_tiny_models(args.dir, seed=args.seed, overwrite=args.overwrite)
    except Exception as exc:  # a full disk surfaces from safetensors without a path: name the target
        inner = _os_error_in(exc)
        if inner is None or inner.filename is not None:
            raise
        raise OSError(inner.errno, inner.strerror, args.dir) from exc
    for role, path in written.items():
        print(f"{role:13s} {path}")
    return EXIT_OK


def cmd_models_check(args) -> int:
    from pipeline.models import check_models, format_check_table

    rows = check_models(args.target, args.overrides, roles=args.role or None)
    print(format_check_table(rows))
    return EXIT_OK


def cmd_models_convert_promptnet(args) -> int:
    from training.models.convert_promptnet import convert_authors_checkpoint

    out = convert_authors_checkpoint(args.src, args.t2i, args.image_encoder, args.out)
    print(f"promptnet written to {out}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ build


def check_output_dir(path: str | os.PathLike) -> None:
    """Raise an :class:`OSError` naming ``path`` unless it is, or can be created as, a writable directory.

    A ``scheme://`` URI is left to the storage layer.
    """
    if "://" in str(path):
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(path))
    existing = path
    while not existing.exists():  # nearest existing ancestor: where the directory would be created
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        code = errno.EROFS if read_only else errno.EACCES
        raise PermissionError(code, os.strerror(code), str(existing))


def cmd_build(args) -> int:
    from pipeline.config import load_config
    from pipeline.store import join

    cfg = load_config(args.config, args.overrides)  # validated before Ray starts
    out = args.out or join(cfg.run.output_dir, cfg.run.name)
    try:
        check_output_dir(out)
    except OSError as exc:
        _print_os_error(exc)
        return EXIT_USAGE
    from pipeline.build import run_build

    from pipeline.build import BuildConflict, NoUsableSources
    from pipeline.store import OutputBusy

    try:
        result = run_build(cfg, out_dir=out, address=args.address, config_path=args.config)
    except NoUsableSources as exc:
        print(f"cafe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OutputBusy, BuildConflict) as exc:
        print(f"cafe: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(result.summary())
    if result.pending:
        print(f"cafe: {result.pending} record(s) pending after transient failures; re-run the same command",
              file=sys.stderr)
        return EXIT_FAILURE
    counts = result.manifest["counts"]
    if counts["kept"] == 0:
        print(f"cafe: error: the build kept no row of {counts['candidates']} candidate(s) "
              f"({counts['quarantined']} quarantined): the funnel above says where they went; the report's score "
              f"histograms show the thresholds (build.rules.*), and `cafe refilter` tries others without "
              f"regenerating", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_refilter(args) -> int:
    from pipeline.refilter import refilter

    result = refilter(args.dataset, args.overrides, out_dir=args.out)
    print(result.summary())
    return EXIT_OK


def cmd_export(args) -> int:
    from pipeline.export import export_messages

    try:
        result = export_messages(args.dataset, args.out, address=args.address)
    except (FileNotFoundError, ValueError) as exc:
        print(f"cafe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"exported {result.rows} conversation(s) as messages: {result.out}   (datasets.load_dataset)")
    return EXIT_OK


def cmd_report(args) -> int:
    from pipeline.report import write_report

    path = write_report(args.dataset)
    print(f"report: {path}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ cluster


def cmd_submit(args) -> int:
    from pipeline.cluster.submit import SubmitError, client, dashboard_address, prepare, submit, wait_and_stream

    argv = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    try:
        address = dashboard_address(args.address)
        sub = prepare(argv, address, working_dir=None if args.no_upload else args.working_dir, wheels=args.wheel,
                      requirements=args.requirements, submission_id=args.job_id)
    except SubmitError as exc:
        print(f"cafe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    job_id = submit(sub, address)
    print(f"submitted {job_id} to {address}: {sub.entrypoint}", file=sys.stderr)
    if args.no_wait:
        print(job_id)
        return EXIT_OK
    try:
        code = wait_and_stream(client(address), job_id)
    except KeyboardInterrupt:
        print(f"detached; {job_id} keeps running (cafe jobs logs --follow {job_id} · cafe jobs stop {job_id})",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"job {job_id} ended with exit status {code}", file=sys.stderr)
    return code


def cmd_jobs(args) -> int:
    from pipeline.cluster.submit import SubmitError, client, exit_status, wait_and_stream

    try:
        c = client(args.address)
    except SubmitError as exc:
        print(f"cafe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.verb == "list":
        jobs = sorted(c.list_jobs(), key=lambda j: j.start_time or 0)
        print(f"{'JOB':44s} {'STATUS':10s} {'EXIT':>4s}  ENTRYPOINT")
        for j in jobs:
            code = exit_status(j)
            print(f"{j.submission_id or j.job_id or '-':44s} {str(j.status.value):10s} "
                  f"{'' if code is None else code:>4}  {j.entrypoint}")
        return EXIT_OK
    if args.verb == "status":
        info = c.get_job_info(args.job_id)
        code = exit_status(info)
        print(f"{args.job_id}: {info.status.value}" + ("" if code is None else f" (exit status {code})")
              + (f" — {info.message}" if info.message else ""))
        return EXIT_OK
    if args.verb == "logs":
        if args.follow:
            return wait_and_stream(c, args.job_id)
        sys.stdout.write(c.get_job_logs(args.job_id))
        return EXIT_OK
    stopped = c.stop_job(args.job_id)
    deadline = time.monotonic() + args.wait_s
    while time.monotonic() < deadline and exit_status(c.get_job_info(args.job_id)) is None:
        time.sleep(0.5)
    info = c.get_job_info(args.job_id)
    print(f"{args.job_id}: {info.status.value}" + ("" if stopped else " (it was not running)"))
    return EXIT_OK if exit_status(info) is not None else EXIT_FAILURE


def cmd_deploy_render(args) -> int:
    from pipeline.cluster.render import render, write
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    files = render(cfg, args.config)
    if args.check:
        stale = [n for n, text in files.items()
                 if not (Path(args.out) / n).is_file() or (Path(args.out) / n).read_text() != text]
        for n in stale:
            print(f"{Path(args.out) / n}: differs from its render", file=sys.stderr)
        if stale:
            print(f"cafe: re-render with `cafe deploy render {args.config} --out {args.out}`", file=sys.stderr)
        return EXIT_FAILURE if stale else EXIT_OK
    for path in write(files, args.out):
        print(path)
    return EXIT_OK


# ------------------------------------------------------------------------------------------ the loop


def _loop_context(args):
    from pipeline.loop.cafe import LoopContext

    return LoopContext.load(args.config, args.overrides, rounds=args.rounds, address=getattr(args, "address", None))


def cmd_pipeline_plan(args) -> int:
    from pipeline.loop.cafe import cafe_graph

    ctx = _loop_context(args)
    items = cafe_graph(ctx.rounds).plan(ctx, ctx.state, until=args.until)
    print(f"pipeline {ctx.out}: {sum(i.action == 'run' for i in items)} of {len(items)} stage(s) to run")
    for i in items:
        print(f"  {i.action:4s}  {i.name:20s} {i.key}  {i.why}")
    return EXIT_OK


def cmd_pipeline_run(args) -> int:
    from pipeline.loop.cafe import run_loop
    from pipeline.store import OutputBusy

    ctx = _loop_context(args)
    check_output_dir(ctx.out)
    try:
        result = run_loop(ctx, until=args.until)
    except OutputBusy as exc:
        print(f"cafe: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"pipeline {ctx.out}: ran {len(result.ran)}, skipped {len(result.skipped)} finished stage(s)")
    for item in result.items:
        outs = (item.record or {}).get("outputs", {})
        where = outs.get("dataset") or outs.get("weights") or outs.get("report") or ""
        print(f"  {item.name:20s} {'ran' if item.name in result.ran else 'skipped':8s} {where}")
    report = next((i.record["outputs"]["report"] for i in result.items if i.name == "report" and i.record), None)
    if report:
        print(f"report: {report}")
        _print_eval_table(ctx)
    return EXIT_OK


def _print_eval_table(ctx) -> None:
    from pipeline.loop.graph import STATE_DIR

    rows = []
    for r in range(ctx.rounds):
        rec = ctx.state.read_json(f"{STATE_DIR}/stages/eval-r{r}.json")
        if rec:
            from pipeline.loop.evaluate import headline

            split, flat = headline(rec["outputs"]["metrics"])
            rows.append((r, flat))
    if not rows:
        return
    names = [m for m in ("assistant.both", "assistant.identity", "assistant.instruction", "direct.both", "input.both",
                         "t2i.both") if m in rows[0][1]]
    print(f"evaluation (oracle rates over the '{split}' pairs):")
    print("round  " + "  ".join(f"{n:>22s}" for n in names))
    for r, m in rows:
        print(f"{r:5d}  " + "  ".join(f"{m[n]:22.3f}" for n in names))


def cmd_eval(args) -> int:
    from pipeline.config import load_config
    from pipeline.loop.evaluate import evaluate_checkpoint, format_table
    from pipeline.store import Storage, join

    cfg = load_config(args.config, args.overrides)
    mllm, diffusion = args.mllm, args.diffusion
    if args.checkpoint is not None:
        from pipeline.loop.registry import open_registry, registry_location

        v = open_registry(registry_location(cfg)).get(args.checkpoint)
        mllm, diffusion = v.checkpoint["mllm"], v.checkpoint["diffusion"]
    if diffusion is None:
        mllm, diffusion = mllm or join(cfg.train.output_dir, "mllm"), join(cfg.train.output_dir, "diffusion")
    out = args.out or join(cfg.run.output_dir, "eval", f"v{args.checkpoint}" if args.checkpoint else "latest")
    report = evaluate_checkpoint(cfg, mllm, diffusion, Storage(out), progress=lambda m: log.info("%s", m))
    print(format_table(report))
    print(f"eval: {out}/metrics.json, {out}/table.md, {out}/samples.png")
    return EXIT_OK


def cmd_retrain(args) -> int:
    from pipeline.loop.retrain import retrain

    outcome = retrain(args.config, args.overrides, address=args.address)
    print(outcome.message)
    return EXIT_OK


def cmd_models_registry(args) -> int:
    from pipeline.config import load_config
    from pipeline.loop.registry import format_versions, open_registry, registry_location

    reg = open_registry(args.registry or registry_location(load_config(args.config, args.overrides)))
    if args.verb == "promote":
        v = reg.promote(args.version)
        print(f"version {v.version} promoted: it is the current model")
    elif args.verb == "rollback":
        old, new = reg.rollback()
        print(f"version {old.version} rolled back; current: {new.version if new else 'none'}")
    else:
        print(format_versions(reg.list(), reg.current()))
    return EXIT_OK


# ------------------------------------------------------------------------------------------ parser


def cmd_train(args) -> int:
    from pipeline.config import load_config
    from pipeline.train import train_model

    cfg = load_config(args.config, args.overrides)
    try:
        train_model(cfg, args.model, address=args.address)
    except (FileNotFoundError, ValueError) as exc:
        print(f"cafe: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_cache(args) -> int:
    from pipeline.config import load_config
    from pipeline.train import cache_embeddings

    cfg = load_config(args.config, args.overrides)
    try:
        for line in cache_embeddings(cfg, address=args.address):
            print(line)
    except (FileNotFoundError, ValueError) as exc:
        print(f"cafe: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_generate(args) -> int:
    from pipeline.generate import GenerateError, generate_cli

    try:
        return generate_cli(args)
    except GenerateError as exc:
        print(f"cafe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cmd_world_make(args) -> int:
    from training.world.make import STAGES, WorldConfig, make_world

    unknown = [s for s in args.only or [] if s not in STAGES]
    if unknown:
        print(f"cafe: error: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return EXIT_USAGE
    state = make_world(args.dir, WorldConfig(seed=args.seed, threads=args.threads, device=args.device),
                       only=args.only, force=args.force)
    gates = state.get("stages", {}).get("gates", {})
    print(f"world: {args.dir} — training {state.get('train_seconds', 0):.0f} s in all stages; "
          f"gates {'passed' if gates.get('passed') else 'FAILED (see GATES.md)'}")
    return EXIT_OK if gates.get("passed") else EXIT_FAILURE


def cmd_world_check(args) -> int:
    import json

    from training.world.gates import format_table, measure_gates

    if not Path(args.dir).is_dir():
        print(f"cafe: error: {args.dir}: not a directory (make it with `cafe world make {args.dir}`)", file=sys.stderr)
        return EXIT_USAGE
    t0 = time.perf_counter()
    from training.models.kit import resolve_device

    device = str(resolve_device(args.device))
    gates = measure_gates(args.dir, progress=lambda m: log.info("%s", m), device=device)
    if (Path(args.dir) / "t2i_scenes").is_dir():  # the EM testbed (a world stage of its own)
        from training.world.scenes_t2i import measure_scene_gates

        gates += measure_scene_gates(args.dir, device=device, progress=lambda m: log.info("%s", m))
    print(format_table(gates))
    failed = [g.name for g in gates if not g.passed]
    print(f"{len(gates) - len(failed)}/{len(gates)} gates passed in {time.perf_counter() - t0:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if args.write:
        from training.world.make import STATE_FILE, write_gate_files

        state_path = Path(args.dir) / STATE_FILE
        write_gate_files(Path(args.dir), gates, json.loads(state_path.read_text()) if state_path.is_file() else {})
    return EXIT_FAILURE if failed else EXIT_OK


# ------------------------------------------------------------------------------------------ concepts


def cmd_concepts_run(args) -> int:
    from pipeline.concepts import run_jobs
    from pipeline.store import OutputBusy

    try:
        summary = run_jobs(args.jobs, args.config, args.overrides, address=args.address, retry_failed=args.retry_failed)
    except OutputBusy as exc:
        print(f"cafe: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_FAILURE if summary["failed"] else EXIT_OK


def cmd_concepts_status(args) -> int:
    from pipeline.concepts import job_status

    print(job_status(args.jobs, args.config, args.overrides))
    return EXIT_OK


def cmd_concepts_generate(args) -> int:
    from pipeline.concepts import ConceptError, generate, generate_batch

    try:
        if args.requests:
            import json

            from pipeline.concepts import read_requests

            rows = generate_batch(args.config, read_requests(args.requests), args.out or "outputs/concepts-generate",
                                  args.overrides, address=args.address)
            bad = [r for r in rows if r["error"]]
            for r in rows:
                print(json.dumps(r))
            return EXIT_FAILURE if bad else EXIT_OK
        if not args.concept or not args.prompt:
            print("cafe: error: --concept and --prompt are required (or --requests FILE)", file=sys.stderr)
            return EXIT_USAGE
        paths = generate(args.config, args.concept, args.prompt, seed=args.seed, out=args.out, dci=args.dci,
                         lam=args.lam, aux_noun=args.aux_noun, method=args.method, overrides=args.overrides,
                         num_images=args.num_images)
    except ConceptError as exc:
        print(f"cafe: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    for p in paths:
        print(p)
    return EXIT_OK


def cmd_concepts_masks(args) -> int:
    from pipeline.concepts import ConceptError, masks

    try:
        paths = masks(args.config, args.concept, image=args.image, out=args.out, tokens=args.token,
                      overrides=args.overrides, seed=args.seed)
    except ConceptError as exc:
        print(f"cafe: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    for p in paths:
        print(p)
    return EXIT_OK


def cmd_concepts_eval(args) -> int:
    from pipeline.concepts import ConceptError, evaluate, format_metrics

    try:
        result = evaluate(args.config, args.concept, method=args.method, overrides=args.overrides)
    except ConceptError as exc:
        print(f"cafe: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(format_metrics(result))
    return EXIT_OK


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cafe-system")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cafe", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="console detail (DEBUG adds Ray Data's progress, per-chunk lines and library logs)")
    parser.add_argument("--version", action="version", version=f"cafe {_version()}")
    nouns = parser.add_subparsers(dest="noun", metavar="COMMAND", required=True)

    config = nouns.add_parser("config", help="validate and show configs").add_subparsers(dest="verb", required=True)
    p = config.add_parser("validate", help="validate YAML configs; exit 3 on any error")
    p.add_argument("files", nargs="+")
    p.add_argument("--check-paths", action="store_true", help="also require every model directory to exist")
    _add_set(p)
    p.set_defaults(func=cmd_config_validate)
    p = config.add_parser("show", help="print the resolved config (defaults, overrides, env vars applied)")
    p.add_argument("file")
    _add_set(p)
    p.set_defaults(func=cmd_config_show)

    models = nouns.add_parser("models", help="tiny checkpoints and model checks").add_subparsers(dest="verb", required=True)
    p = models.add_parser("make-tiny", help="write a seeded tiny set of every model role into DIR")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0, help="seeds every tiny model's initialisation")
    p.add_argument("--overwrite", action="store_true", help="rewrite roles that already exist")
    p.set_defaults(func=cmd_models_make_tiny)
    p = models.add_parser("check", help="load every role, run one forward pass, print a table")
    p.add_argument("target", help="a directory with one folder per role, or a config file")
    p.add_argument("--role", action="append", help="check only this role; repeatable")
    _add_set(p)
    p.set_defaults(func=cmd_models_check)
    p = models.add_parser("convert-promptnet",
                          help="convert the authors' ProFusion PromptNet checkpoint into the promptnet role layout")
    p.add_argument("src", help="the authors' PromptNet weights (.safetensors, or .bin read with weights_only=True)")
    p.add_argument("--t2i", required=True, help="the t2i role directory (SD2 diffusers layout) it was trained on")
    p.add_argument("--image-encoder", required=True, help="transformers CLIPVisionModel dir (CLIP ViT-H/14)")
    p.add_argument("--out", required=True, help="the promptnet role directory to write")
    p.set_defaults(func=cmd_models_convert_promptnet)

    for verb, fn, text in (("list", cmd_models_registry, "the registry's versions (* marks the current model)"),
                           ("promote", cmd_models_registry, "make VERSION the current model"),
                           ("rollback", cmd_models_registry, "retire the current model; the previous one serves")):
        p = models.add_parser(verb, help=text)
        if verb == "promote":
            p.add_argument("version", type=int, help="a registry version (see `cafe models list`)")
        p.add_argument("--config", default="configs/tiny.yaml", help="config naming pipeline.registry")
        p.add_argument("--registry", help="registry: a *.sqlite file, or a directory / s3:// prefix (default: from the config)")
        _add_set(p)
        p.set_defaults(func=fn)

    pipe = nouns.add_parser("pipeline", help="the CAFE loop: build → train → evaluate → Eq. 4 rounds, resumable "
                            "on stage keys").add_subparsers(dest="verb", required=True)
    for verb, fn, text in (("plan", cmd_pipeline_plan, "print which stages would run and why (loads no model)"),
                           ("run", cmd_pipeline_run, "run or resume the loop; finished stages are skipped")):
        p = pipe.add_parser(verb, help=text)
        p.add_argument("config")
        p.add_argument("--rounds", type=int, help="rounds (default pipeline.rounds)")
        p.add_argument("--until", metavar="STAGE", help="stop after STAGE (and what it needs)")
        if verb == "run":
            p.add_argument("--address", help="Ray address of an existing cluster (default: a local loopback cluster)")
        _add_set(p)
        p.set_defaults(func=fn)

    p = nouns.add_parser("eval", help="the DreamBench protocol (and the world's oracle) for a trained assistant "
                         "beside its baselines")
    p.add_argument("config")
    p.add_argument("--checkpoint", type=int, metavar="VERSION", help="a registry version")
    p.add_argument("--mllm", help="trained MLLM directory (default train.output_dir/mllm)")
    p.add_argument("--diffusion", help="trained diffusion directory (default train.output_dir/diffusion)")
    p.add_argument("--out", help="output directory (default run.output_dir/eval/...)")
    _add_set(p)
    p.set_defaults(func=cmd_eval)

    p = nouns.add_parser("retrain", help="scheduled retraining: new sources → loop → evaluate → promote if the "
                         "gate passes (idempotent: no new data, nothing done)")
    p.add_argument("config")
    p.add_argument("--address", help="Ray address of an existing cluster (default: a local loopback cluster)")
    _add_set(p)
    p.set_defaults(func=cmd_retrain)

    p = nouns.add_parser("submit", help="run a cafe command as a job on a running Ray cluster (Job Submission "
                         "SDK; validated here first; logs streamed; exits with the job's status)")
    p.add_argument("--address", help="the Ray dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working directory (default: .; "
                   "outputs, models and environments excluded)")
    p.add_argument("--no-upload", action="store_true", help="upload nothing: the cluster's image holds the project")
    p.add_argument("--wheel", action="append", default=[], help="a built wheel installed for the job; repeatable")
    p.add_argument("--requirements", help="a pinned requirements file (every line ==) installed for the job")
    p.add_argument("--job-id", help="the submission id (default: cafe-<command>-<time>-<random>)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- cafe COMMAND ARGS")
    p.set_defaults(func=cmd_submit)
    jobs = nouns.add_parser("jobs", help="jobs on a Ray cluster: list, status, logs, stop").add_subparsers(
        dest="verb", required=True)
    for verb, text in (("list", "every job of the cluster"), ("status", "a job's status and exit status"),
                       ("logs", "a job's logs (--follow: stream until it ends, exit with its status)"),
                       ("stop", "stop a job and wait for it to end")):
        p = jobs.add_parser(verb, help=text)
        if verb != "list":
            p.add_argument("job_id", help="the submission id `cafe submit` printed (see `cafe jobs list`)")
        p.add_argument("--address", help="the Ray dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
        if verb == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends; exit with its status")
        if verb == "stop":
            p.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for it to end")
        p.set_defaults(func=cmd_jobs)
    deploy = nouns.add_parser("deploy", help="KubeRay manifests from the config's deploy section").add_subparsers(
        dest="verb", required=True)
    p = deploy.add_parser("render", help="write RayCluster, RayJobs, scheduled retraining (CronJob and RayCronJob) "
                          "and the service account into --out")
    p.add_argument("config")
    p.add_argument("--out", default="deploy", help="directory (default: deploy)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file differs from its render")
    _add_set(p)
    p.set_defaults(func=cmd_deploy_render)
    p = nouns.add_parser("build", help="round-0 CAFE dataset construction on Ray Data")
    p.add_argument("config")
    p.add_argument("--out", help="output directory (default: run.output_dir/run.name)")
    p.add_argument("--address", help="Ray address of an existing cluster (default: a local loopback cluster)")
    _add_set(p)
    p.set_defaults(func=cmd_build)

    p = nouns.add_parser("refilter", help="re-apply rules to a built dataset's stored scores (no recomputation)")
    p.add_argument("dataset", help="output directory of a `cafe build`")
    p.add_argument("--out", required=True, help="the new output (a directory or URI); the input is not changed")
    _add_set(p)
    p.set_defaults(func=cmd_refilter)

    p = nouns.add_parser("report", help="regenerate the report of a built dataset")
    p.add_argument("dataset")
    p.set_defaults(func=cmd_report)

    p = nouns.add_parser("export", help="write a built dataset in another stack's layout (messages: chat "
                         "conversations + images, for LLaVA/TRL-style trainers)")
    p.add_argument("dataset", help="output directory (or URI) of a `cafe build`")
    p.add_argument("--out", required=True, help="where the export goes (a directory or URI; replaced)")
    p.add_argument("--format", default="messages", choices=["messages"], help="messages: chat turns + images + the target image")
    p.add_argument("--address", help="Ray address of an existing cluster (default: a local loopback cluster)")
    p.set_defaults(func=cmd_export)

    p = nouns.add_parser("train", help="train CAFE's MLLM, conditioned diffusion model or PromptNet (Ray Train + "
                         "DeepSpeed); re-running the same command resumes from the latest checkpoint")
    p.add_argument("model", choices=["mllm", "diffusion", "promptnet"], help="which model to train")
    p.add_argument("config")
    p.add_argument("--address", help="Ray address of an existing cluster (default: a local loopback cluster)")
    _add_set(p)
    p.set_defaults(func=cmd_train)

    p = nouns.add_parser("cache", help="compute VAE latents, CLIP embeddings, DINO patch tokens and MLLM vision "
                         "features of every training row once (Ray Data), beside each dataset")
    p.add_argument("config")
    p.add_argument("--address", help="Ray address of an existing cluster (default: a local loopback cluster)")
    _add_set(p)
    p.set_defaults(func=cmd_cache)

    p = nouns.add_parser("generate", help="assistant inference: image + text → response + generated image")
    p.add_argument("--config", default="configs/tiny.yaml", help="config whose models and train.output_dir to use")
    p.add_argument("--image", help="the input image (x)")
    p.add_argument("--text", help="the user's request")
    p.add_argument("--clip-from-image", dest="clip_from_image",
                   help="direct mode: the CLIP embedding of this image replaces the MLLM's prediction")
    p.add_argument("--requests", help="batch mode: a Parquet or JSONL file of requests (image, text[, clip_image, "
                   "seed, id]) run on Ray Data")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler's noise")
    p.add_argument("--out", default="outputs/generate", help="output directory")
    p.add_argument("--address", help="Ray address for batch mode (default: a local loopback cluster)")
    _add_set(p)
    p.set_defaults(func=cmd_generate)

    concepts = nouns.add_parser("concepts", help="per-concept customization jobs on Ray actors: ICO (+ DCI), "
                                "Infusion").add_subparsers(dest="verb", required=True)
    p = concepts.add_parser("run", help="run every job of JOBS on an actor pool; re-running resumes (finished jobs "
                            "are never run twice)")
    p.add_argument("jobs", help="a YAML job file (config + jobs), a .jsonl or a .parquet table of jobs")
    p.add_argument("--config", help="config for a JSONL/Parquet source (default configs/tiny.yaml); merged under a "
                   "YAML job file")
    p.add_argument("--address", help="Ray address of an existing cluster (default: a local loopback cluster)")
    p.add_argument("--retry-failed", dest="retry_failed", action="store_true",
                   help="queue failed jobs again with fresh attempts (after fixing their cause)")
    _add_set(p)
    p.set_defaults(func=cmd_concepts_run)
    p = concepts.add_parser("status", help="print the job table")
    p.add_argument("jobs", nargs="?", default="configs/concepts/tiny.yaml",
                   help="the job file or config naming concepts.output (default configs/concepts/tiny.yaml)")
    p.add_argument("--config", help="config for a JSONL/Parquet job table (default configs/tiny.yaml)")
    _add_set(p)
    p.set_defaults(func=cmd_concepts_status)
    p = concepts.add_parser("generate", help="images of finished concepts ('{}' in the prompt = the concept phrase)")
    p.add_argument("--config", default="configs/concepts/tiny.yaml", help="job file or config naming concepts.output")
    p.add_argument("--concept", action="append", metavar="ID", help="concept id; repeat to compose Infusion concepts")
    p.add_argument("--prompt", help="the prompt, required without --requests; '{}' stands for the concept phrase")
    p.add_argument("--method", choices=["ico", "infusion", "em"], help="when a concept has runs of several methods")
    p.add_argument("--dci", action="store_true", help="DCI dual-branch sampling (ICO concepts)")
    p.add_argument("--lambda", dest="lam", type=float, help="DCI injection ratio λ (default concepts.dci.lam)")
    p.add_argument("--aux-noun", dest="aux_noun", help="DCI auxiliary noun (default: automatic)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler's noise")
    p.add_argument("--num-images", dest="num_images", type=int, default=1, help="images to write")
    p.add_argument("--requests", help="batch mode: a JSONL/Parquet file of requests (concepts, prompt[, seed, dci, "
                   "lam, aux_noun]) served by the actor pool")
    p.add_argument("--out", help="output directory (default <run.output_dir>/concepts-generate)")
    p.add_argument("--address", help="Ray address for batch mode")
    _add_set(p)
    p.set_defaults(func=cmd_concepts_generate)
    p = concepts.add_parser("masks", help="an EM concept's token masks as PNGs + overlays: the job's final masks, or "
                            "estimated on --image by the trained tokens")
    p.add_argument("--config", default="configs/concepts/tiny.yaml", help="job file or config naming concepts.output")
    p.add_argument("--concept", required=True, help="the EM concept id")
    p.add_argument("--image", help="an image (path or URI) to segment with the trained tokens")
    p.add_argument("--token", action="append", metavar="TOKEN", help="only this token; repeatable (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seeds the timesteps and noise of the estimate")
    p.add_argument("--out", help="output directory (default <run.output_dir>/concepts-masks/<concept>)")
    _add_set(p)
    p.set_defaults(func=cmd_concepts_masks)
    p = concepts.add_parser("eval", help="CLIP-T, CLIP-I, DINO (and LFD/W2 with concepts.eval.divergence) of a concept")
    p.add_argument("--config", default="configs/concepts/tiny.yaml", help="job file or config naming concepts.output")
    p.add_argument("--concept", required=True, help="the concept id")
    p.add_argument("--method", choices=["ico", "infusion", "em"], help="when a concept has runs of several methods")
    _add_set(p)
    p.set_defaults(func=cmd_concepts_eval)

    world = nouns.add_parser("world", help="the synthetic world: trained tiny models, oracle, gates").add_subparsers(
        dest="verb", required=True)
    p = world.add_parser("make", help="render the domain, train every world model, write assets and gates into DIR "
                         "(resumable; skips stages whose code, config and seed are unchanged)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0, help="seeds the world's renders and every model's initialisation")
    p.add_argument("--only", action="append", metavar="STAGE", help="run only this stage; repeatable")
    p.add_argument("--force", action="store_true", help="rerun stages even when they are done")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_world_make)
    p = world.add_parser("check", help="re-measure every gate on the models in DIR; exit 1 if one fails")
    p.add_argument("dir")
    p.add_argument("--write", action="store_true", help="also rewrite DIR/gates.json and DIR/GATES.md")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.set_defaults(func=cmd_world_check)
    _describe(parser)
    return parser


#: help of positionals that many commands share (a command's own help wins)
POSITIONAL_HELP = {
    "config": "a YAML config (configs/tiny.yaml is the embedded default); `--set key=value` overrides it",
    "configs": "YAML configs",
    "files": "YAML config files",
    "file": "a YAML config",
    "dataset": "a built dataset: the --out directory (or URI) of a `cafe build`",
    "dir": "a directory",
}


def _describe(parser: argparse.ArgumentParser) -> None:
    """Every sub-command's ``--help`` opens with its one-line help, and shared positionals say what they take."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if sub.description is None and helps.get(name):
                    sub.description = helps[name][:1].upper() + helps[name][1:] + "."
                _describe(sub)
        elif not action.option_strings and action.help is None and action.dest in POSITIONAL_HELP:
            action.help = POSITIONAL_HELP[action.dest]


# how libraries written in Rust (safetensors, tokenizers) report an I/O error: "... (os error 28)"
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, a cause, or a Ray task error's cause), preferring one with a path;
    else one rebuilt from a Rust library's ``(os error N)`` message (no path known)."""
    found, rust = None, None
    for exc in _chain(exc):
        if isinstance(exc, OSError) and (found is None or (found.filename is None and exc.filename is not None)):
            found = exc
        m = _RUST_OS_ERROR.search(str(exc))
        if rust is None and m:
            code = int(m.group(1))
            rust = OSError(code, os.strerror(code))
    return found or rust


def _chain(exc: BaseException | None):
    """``exc``, then what caused it: Python's ``__cause__`` and a Ray task error's ``cause`` (a worker's error)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__


#: Ray's errors for a lost node, worker or actor (by name: the CLI's error path imports no Ray)
RAY_LOSS = ("ActorUnavailableError", "ActorDiedError", "NodeDiedError", "OwnerDiedError", "ObjectLostError",
            "WorkerCrashedError", "LocalRayletDiedError", "RaySystemError")


def _one_line_error(exc: BaseException) -> str | None:
    """One line for a fault that ended a run inside Ray (a worker's model copy, a superseded driver, a lost
    node), or None when there is no such known cause."""
    from pipeline.models import ModelMismatch
    from pipeline.store import OutputBusy

    for e in _chain(exc):
        if isinstance(e, (ModelMismatch, OutputBusy)):
            return f"cafe: error: {str(e).splitlines()[0]}"
    for e in _chain(exc):
        if type(e).__name__ in RAY_LOSS:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return (f"cafe: error: a Ray node, worker or actor was lost ({type(e).__name__}: {first[:300]}); what "
                    "was committed is kept: re-run the same command to resume (on a cluster, check the node's "
                    "events: preemption, OOM kill)")
    return None


def _print_os_error(exc: OSError) -> None:
    """One line: ``cafe: error: PATH: REASON`` (no traceback)."""
    inner = _os_error_in(exc) or exc
    if inner.filename is not None and inner.strerror:
        where = inner.filename if inner.filename2 is None else f"{inner.filename} -> {inner.filename2}"
        print(f"cafe: error: {where}: {inner.strerror}", file=sys.stderr)
    else:
        print(f"cafe: error: {str(inner).splitlines()[0] if str(inner) else type(inner).__name__}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cafe`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.log_level != "DEBUG":  # no per-file "Loading weights" bars from transformers/diffusers (workers too)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from pipeline.config import ConfigError

    from training.errors import ModelLoadError  # torch-free: usage and config paths never import torch
    try:
        return args.func(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    except ModelLoadError as exc:
        print(f"cafe: error: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # read-only or full disk, a file where a directory belongs, a missing input ...
        _print_os_error(exc)
        return EXIT_USAGE if isinstance(exc, FileNotFoundError) else EXIT_FAILURE
    except ValueError as exc:
        print(f"cafe: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - top level: report and exit non-zero
        inner = _os_error_in(exc)  # e.g. a full disk inside a Ray worker, wrapped by Ray
        line = _one_line_error(exc)
        if line is not None:
            print(line, file=sys.stderr)
        elif inner is not None:
            _print_os_error(inner)
        else:
            log.exception("failed: %s", exc)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
