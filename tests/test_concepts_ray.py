"""`cafe concepts` on a local Ray cluster: actor pool, job table, artifacts, bad jobs, kills, generate, eval."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors import safe_open
from PIL import Image

from pipeline.concept_jobs import SUCCESS_MARKER, JobTable, load_jobs, parse_job
from pipeline.concepts import (ConceptError, ConceptWorker, evaluate, generate, generate_batch, job_status, masks,
                               run_jobs)
from pipeline.store import OutputBusy, Storage
from tests.buildutil import kill_session, wait_for

pytestmark = pytest.mark.integration


def _refs(root: Path, name: str, colour) -> list[str]:
    out = []
    for i in range(2):
        p = root / name / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        img = np.full((40, 48, 3), 255, np.uint8)
        img[8 + 2 * i:30, 10:34] = colour
        Image.fromarray(img).save(p)
        out.append(str(p))
    return out


def _job_file(tmp: Path, models: Path, jobs: list[dict], **concepts) -> Path:
    data = {
        "models": {"root": str(models)},
        "ray": {"num_cpus": 2},
        "concepts": {
            "output": str(tmp / "concepts"),
            "heartbeat_s": 0.5,
            "lease_ttl_s": 3.0,
            "actors": {"num_actors": 2, "num_cpus": 0.5},
            "ico": {"steps": 4, "batch_size": 1, "learning_rate": 0.001},
            "infusion": {"steps": 3, "batch_size": 2, "grad_accum": 1},
            "dci": {"steps": 4},
            "em": {"steps_tokens": 2, "steps_joint": 1, "mask_timesteps": 2, "reestimate_every": 1, "attn_res": 8},
            "sample": {"steps": 3},
            "samples_per_job": 1,
            "eval": {"prompts": ["a photo of {}"], "samples_per_prompt": 1},
            **concepts,
        },
        "jobs": jobs,
    }
    path = tmp / "jobs.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    return {"red": _refs(root, "red", (220, 30, 30)), "blue": _refs(root, "blue", (30, 30, 220))}


def test_pool_runs_good_jobs_and_fails_bad_ones_alone(tmp_path, tiny_models, refs, ray_local):
    gt = np.zeros((40, 48), np.uint8)
    gt[8:30, 10:34] = 255                                       # the red block of refs["red"][0]
    gt_mask, small_mask = str(tmp_path / "gt.png"), str(tmp_path / "small.png")
    Image.fromarray(gt).save(gt_mask)
    Image.fromarray(gt[:20, :20]).save(small_mask)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    jobs = [
        {"id": "red", "method": "ico", "noun": "cat", "images": refs["red"]},
        {"id": "red", "method": "infusion", "noun": "cat", "images": refs["red"]},
        {"id": "blue", "method": "infusion", "noun": "dog", "images": refs["blue"]},
        {"id": "missing", "method": "ico", "noun": "cat", "images": [str(tmp_path / "nope.png")]},
        {"id": "unreadable", "method": "infusion", "noun": "cat", "images": [str(broken)]},
        {"id": "two-tokens", "method": "ico", "noun": "zyzzyva", "images": refs["red"]},
        {"id": "bad/id", "method": "ico", "noun": "cat", "images": refs["red"]},
        {"id": "what", "method": "dreambooth", "noun": "cat", "images": refs["red"]},
        {"id": "empty", "method": "ico", "noun": "cat", "images": []},
        # EM: a good job (ground truth for its first token), a mask of the wrong size (fails on the actor), a token
        # tied to an image that is not there (fails at parsing)
        {"id": "scene", "method": "em", "images": refs["red"][:1],
         "params": {"tokens": ["[v1]", "[v2]"], "init": "word", "init_words": ["cat", "dog"]},
         "masks": {"[v1]": gt_mask}},
        {"id": "badmask", "method": "em", "images": refs["red"][:1],
         "params": {"tokens": ["[v1]"], "init": "word", "init_words": ["cat"]}, "masks": {"[v1]": small_mask}},
        {"id": "toomany", "method": "em", "images": refs["red"][:1], "params": {"tokens": ["[a]"], "token_images": [1]}},
    ]
    path = _job_file(tmp_path, tiny_models, jobs)
    summary = run_jobs(path, echo=lambda *_: None)
    by_id = {(r["concept_id"], r["method"]): r for r in summary["records"]}
    assert summary["done"] == 4 and summary["failed"] == 8
    errors = {k[0]: r["error"] for k, r in by_id.items() if r["state"] == "failed"}
    assert "not found" in errors["missing"]
    assert "unreadable" in errors and "image" in errors["unreadable"]
    assert "exactly one token" in errors["two-tokens"]
    assert "one path segment" in errors["bad_id"]
    assert "unknown method" in errors["what"]
    assert "no reference images" in errors["empty"]
    assert "differs from its image's 48x40" in errors["badmask"]
    assert "more images named than the 1 given" in errors["toomany"]
    assert by_id[("missing", "ico")]["attempts"] == 1            # an input error is not retried
    out = Storage(tmp_path / "concepts")
    for key in [("red", "ico"), ("red", "infusion"), ("blue", "infusion")]:
        rec = by_id[key]
        art = Path(tmp_path / "concepts" / rec["artifact"])
        assert (art / SUCCESS_MARKER).is_file() and (art / "job.json").is_file() and (art / "metrics.json").is_file()
        meta = json.loads((art / "job.json").read_text())
        assert meta["base_fingerprint"] and meta["layer_names"] and meta["weights_bytes"] > 0
        assert len(list((art / "samples").glob("*.png"))) == 1
        metrics = json.loads((art / "metrics.json").read_text())
        assert all(-1.0 <= metrics[k] <= 1.0 for k in ("clip_t", "clip_i", "dino"))
        assert rec["attempts"] == 1 and rec["durations_s"] and rec["state"] == "done"
    assert not (tmp_path / "concepts" / "bad").exists() and not out.exists("bad_id")   # an invalid job writes nothing
    # re-running finds everything done or failed: nothing runs, nothing is rewritten
    marks = {p: p.stat().st_mtime_ns for p in (tmp_path / "concepts").rglob(SUCCESS_MARKER)}
    again = run_jobs(path, echo=lambda *_: None)
    assert again["skipped"] == 4 and again["done"] == 4
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "concepts").rglob(SUCCESS_MARKER)} == marks
    text = job_status(path)
    assert "done: 4" in text and "failed: 8" in text

    # EM: tokens, delta, masks, IoU history (ground truth of [v1] only) and the figure; masks out; generation
    art = Path(tmp_path / "concepts" / by_id[("scene", "em")]["artifact"])
    em_meta = json.loads((art / "em.json").read_text())
    assert [(h["stage"], h["step"]) for h in em_meta["history"]] == [(1, 0), (2, 1), (2, 2)]
    assert all(set(h["iou"]) == {"[v1]"} for h in em_meta["history"])
    assert {p.name for p in (art / "masks").iterdir()} == {"00.png", "01.png"}
    assert (art / "em_unet_delta.safetensors").is_file() and (art / "mask_history.png").is_file()
    final = masks(path, "scene", out=str(tmp_path / "m"))
    assert [Path(p).name for p in final] == ["00-v1.png", "00-v1-overlay.png", "01-v2.png", "01-v2-overlay.png"]
    assert np.array_equal(np.asarray(Image.open(final[0])) > 127, np.asarray(Image.open(art / "masks" / "00.png")) > 127)
    other = masks(path, "scene", image=refs["blue"][1], out=str(tmp_path / "m2"), tokens=["[v2]"])
    assert [Path(p).name for p in other] == ["00-v2.png", "00-v2-overlay.png"]
    assert np.asarray(Image.open(other[0])).shape == (64, 64)
    with pytest.raises(ConceptError, match="not this concept"):
        masks(path, "scene", image=refs["blue"][1], tokens=["[v9]"])
    composed = generate(path, ["scene"], "a photo of [v1] and [v2]", out=str(tmp_path / "g"))
    assert np.asarray(Image.open(composed[0])).shape == (64, 64, 3)
    with pytest.raises(ConceptError, match="names none of the concept's tokens"):
        generate(path, ["scene"], "a photo of a cat", method="em")

    # generate: ICO with and without DCI, two Infusion concepts in one prompt; eval prints metrics
    plain = generate(path, ["red"], "a photo of {}", method="ico", seed=3, out=str(tmp_path / "g"))
    dci = generate(path, ["red"], "a photo of {}", method="ico", seed=3, dci=True, lam=1.0, out=str(tmp_path / "g"))
    assert Path(plain[0]).read_bytes() != Path(dci[0]).read_bytes()      # λ = 1 moves the image
    img = np.asarray(Image.open(plain[0]))
    assert img.shape == (64, 64, 3)                                # the tiny t2i: 8x8 latents, 3 VAE blocks
    multi = generate(path, ["red", "blue"], "a cat and a dog", method="infusion", out=str(tmp_path / "g"))
    assert Path(multi[0]).is_file()
    other = tmp_path / "other-t2i"                               # same architecture, another base model
    shutil.copytree(tiny_models / "t2i", other)
    (other / "model_index.json").write_text((other / "model_index.json").read_text() + "\n")
    with pytest.raises(ConceptError, match="trained on another base"):
        generate(path, ["red"], "a photo of {}", method="ico", overrides=[f"models.t2i.path={other}"])
    result = evaluate(path, "red", method="infusion")
    assert result["num_images"] == 1 and -1 <= result["clip_t"] <= 1
    div = ["concepts.eval.divergence=true", "concepts.eval.w2_samples=4", "concepts.eval.lfd_samples=8"]
    inf = evaluate(path, "red", method="infusion", overrides=div)
    ico = evaluate(path, "red", method="ico", overrides=div)
    assert inf["lfd"] == 0.0 and ico["lfd"] > 0.0          # Infusion leaves non-customized prompts to F alone
    assert inf["w2"] >= 0.0 and ico["w2"] > 0.0
    # W2 on the prompt naming each concept; class drift apart (Infusion: the same samples); the base's own W2 at
    # this n beside it, and the note that 4 samples in 256 dimensions are estimator bias
    assert ico["w2_prompts"] == ["a photo of a <new1> <new2> <new3> cat"] and inf["w2_prompts"] == ["a photo of a cat"]
    assert inf["w2_class_drift"] == inf["w2"] and ico["w2_class_drift"] != ico["w2"]
    assert ico["w2_baseline"] > 0.0 and inf["w2_baseline"] > 0.0
    assert "4 samples < 256 pooled dimensions" in ico["w2_note"]
    rows = generate_batch(path, [{"concepts": ["red"], "prompt": "a photo of {}", "method": "ico"},
                                 {"concepts": ["nobody"], "prompt": "a photo of {}"},
                                 {"concepts": ["red", "blue"], "prompt": "a cat and a dog", "method": "infusion"}],
                          str(tmp_path / "batch"))
    assert [r["error"] is None for r in rows] == [True, False, True]
    assert "no finished run" in rows[1]["error"]
    assert (tmp_path / "batch" / "results.parquet").is_file()


def test_same_job_alone_and_after_others_is_bit_identical(tmp_path, tiny_models, refs):
    jobs = [{"id": "red", "method": m, "noun": "cat", "images": refs["red"]} for m in ("ico", "infusion")]
    jobs.append({"id": "blue", "method": "ico", "noun": "dog", "images": refs["blue"]})
    path = _job_file(tmp_path, tiny_models, jobs)
    cfg, raw = load_jobs(path, overrides=["models.t2i.device=auto"])    # "auto" resolves on the actor (CPU here)
    parsed = [parse_job(r, cfg, "fp", i) for i, r in enumerate(raw)]
    cfg_json = cfg.model_dump(mode="json")

    def weights(worker, job):
        concept, _ = worker.train(job)
        d = tmp_path / f"w-{time.monotonic_ns()}"
        concept.save(d)
        out = {}
        for p in sorted(d.glob("*.safetensors")):   # tensors as bytes (safetensors' header order is not stable)
            with safe_open(str(p), "pt") as f:
                out[p.name] = ({k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}, f.metadata())
        return out

    fresh = ConceptWorker(cfg_json)
    alone = {j.method: weights(fresh, j) for j in parsed[:2]}
    busy = ConceptWorker(cfg_json)
    weights(busy, parsed[2])                                   # another concept first, on the same base
    after = {j.method: weights(busy, j) for j in reversed(parsed[:2])}
    assert alone == after
    base = {k: v.clone() for k, v in busy.t2i.unet.state_dict().items()}
    weights(busy, parsed[2])
    assert all(torch_equal(base[k], v) for k, v in busy.t2i.unet.state_dict().items())
    # a worker whose base copy is not the driver's fails the job with a reason and writes nothing
    stray = ConceptWorker(cfg_json, base_fingerprint="0" * 16)
    result = stray.run(parsed[0].to_json())
    assert not result["ok"] and not result["transient"] and "ModelMismatch" in result["error"]
    assert "the driver's is 0000000000000000" in result["error"] and not list(Path(cfg.concepts.output).rglob("*.safetensors"))
    ConceptWorker(cfg_json, base_fingerprint=busy.fingerprint).check_base()  # the same copy passes


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def _status(out: Path) -> dict[str, dict]:
    return {r["key"]: r for r in JobTable(Storage(out)).records()}


def test_driver_then_actor_killed_each_job_finishes_exactly_once(tmp_path, tiny_models, refs, ray_local):
    jobs = [{"id": f"c{i}", "method": "ico" if i % 2 else "infusion", "noun": "cat", "images": refs["red"],
             "seed": i} for i in range(4)]
    path = _job_file(tmp_path, tiny_models, jobs, ico={"steps": 40, "batch_size": 1, "learning_rate": 0.001},
                     infusion={"steps": 40, "batch_size": 2, "grad_accum": 1},
                     actors={"num_actors": 1, "num_cpus": 0.5})
    out = tmp_path / "concepts"
    env = dict(os.environ, PYTHONPATH=str(Path.cwd()))
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "concepts", "run", str(path), "--address",
                             ray_local.get_runtime_context().gcs_address], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    wait_for(lambda: any(r["state"] == "done" for r in _status(out).values())
             and any(r["state"] == "running" and (r.get("step") or 0) >= 2 for r in _status(out).values()),
             300, proc, "one job done and one running")
    # a second driver on the same output is refused while the first is alive
    with pytest.raises(OutputBusy):
        run_jobs(path, echo=lambda *_: None)
    kill_session(proc)
    before = _status(out)
    done_before = {k: r["finished_at"] for k, r in before.items() if r["state"] == "done"}
    assert 1 <= len(done_before) < 4

    killed = []
    resumed_at = time.time()

    def kill_an_actor():
        def running():   # a job of the resumed run (not a stale record of the dead driver's)
            return [r for r in _status(out).values() if r["state"] == "running" and (r.get("step") or 0) >= 2
                    and r.get("owner_pid") and r["started_at"] > resumed_at]
        wait_for(lambda: bool(running()), 300, None, "a running job in the resumed run")
        rec = running()[0]
        os.kill(rec["owner_pid"], signal.SIGKILL)
        killed.append(rec["key"])

    time.sleep(3.5)                                             # the dead driver's lease expires (ttl 3 s)
    t = threading.Thread(target=kill_an_actor)
    t.start()
    summary = run_jobs(path, echo=lambda *_: None)
    t.join()
    assert summary["done"] == 4 and summary["failed"] == 0
    after = _status(out)
    for k, finished in done_before.items():                     # finished jobs were not run again
        assert after[k]["finished_at"] == finished and after[k]["attempts"] == before[k]["attempts"]
    for k, r in after.items():
        assert r["state"] == "done" and (out / r["artifact"] / SUCCESS_MARKER).is_file()
        # an attempt whose driver died has no duration; every other attempt has one
        assert len(r["durations_s"]) <= r["attempts"] <= len(r["durations_s"]) + 1
    assert killed and after[killed[0]]["attempts"] >= 2         # the killed actor's job ran again, to the end


def test_ico_prior_from_a_folder_of_captioned_images(tmp_path, tiny_models, refs):
    folder = tmp_path / "class-cat"
    _refs(folder.parent, folder.name, (90, 90, 90))                   # 0.png, 1.png
    Image.fromarray(np.full((64, 64, 3), 40, np.uint8)).save(folder / "2.png")
    (folder / "0.txt").write_text("a cat on a sofa\n")
    (folder / "1.txt").write_text("a cat in the snow")
    path = _job_file(tmp_path, tiny_models, [{"id": "red", "method": "ico", "noun": "cat", "images": refs["red"]}],
                     prior_images=str(tmp_path / "class-{noun}"))
    cfg, raw = load_jobs(path)
    job = parse_job(raw[0], cfg, "fp")
    worker = ConceptWorker(cfg.model_dump(mode="json"))
    prior = worker._prior(job, 2)
    assert [c for _, c in prior] == ["a cat on a sofa", "a cat in the snow", "a photo of a cat"]   # own captions
    assert all(img.shape == (64, 64, 3) for img, _ in prior)
    concept, _ = worker.train(job)
    assert len(concept.losses) == 4 and all(np.isfinite(concept.losses))
    generated, _ = load_jobs(_job_file(tmp_path, tiny_models, [raw[0]]))
    assert parse_job(raw[0], generated, "fp").run_id != job.run_id     # another prior source, another run
