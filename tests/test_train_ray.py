"""`cafe train` through Ray Train + DeepSpeed on a local loopback cluster, then `cafe cache` and `cafe generate`.

* two CPU workers with ZeRO-2 and with ZeRO-3 follow the single-worker loss trajectory at the same global batch;
* a two-worker ZeRO-3 run stopped after step k and re-run with the same command resumes (Ray Train restores the
  checkpoint by run name + storage path) and follows the uninterrupted single-worker trajectory (that a resumed
  run continues *exactly* is checked in-process by tests/test_train_units.py);
* the exported weights drive `generate` (an image of the configured size and a non-empty response), and bad
  requests fail with clear errors; the cache stage's features train to the same first loss as images.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests import trainutil as tu

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOL = 2e-3  # relative: the workers' gradient all-reduce sums in another order than one worker's batch mean


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tu.write_dataset(tmp_path_factory.mktemp("train-ray"), n=8, shards=2)


def _cfg(tmp, dataset, **train):
    from pipeline.config import load_config_dict

    world = str(tu.WORLD)
    section = {
        "data": {"datasets": [str(dataset)], "cache": "off"},
        "storage_path": str(tmp / "runs"), "output_dir": str(tmp / "out"), "log_dir": str(tmp / "tb"),
        "checkpoint": {"every_steps": 2, "keep": 2},
        "diffusion": {"lr": 1e-3, "micro_batch_size": 8, "max_steps": 4, "epochs": 100},
        "mllm": {"lr": 1e-2, "micro_batch_size": 8, "max_steps": 2, "epochs": 100},
        "generate": {"num_inference_steps": 4},
    }
    for k, v in train.items():
        if isinstance(v, dict) and isinstance(section.get(k), dict):
            section[k] = {**section[k], **v}
        else:
            section[k] = v
    return load_config_dict({"run": {"name": "t"}, "ray": {"num_cpus": 2}, "models": {"root": world},
                             "train": section})


def _losses(summary):
    return [m["loss"] for m in summary.losses]


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, data, ray_local):
    """The single-worker reference run (shared: the ZeRO runs and the cache are compared with it)."""
    from pipeline.train import train_model

    tmp = tmp_path_factory.mktemp("one-worker")
    return tmp, train_model(_cfg(tmp, data), "diffusion", echo=lambda s: None)


def test_workers_zero_stages_and_resume(tmp_path, data, ray_local, one_worker):
    from pipeline.train import train_model

    where, one = one_worker
    assert one.steps == 4 and len(one.losses) == 4
    assert (where / "out" / "diffusion" / "conditioner.safetensors").is_file()
    assert list((where / "tb").rglob("events.out.tfevents*"))  # TensorBoard scalars
    two = lambda stage, **kw: _cfg(tmp_path / f"z{stage}", data,  # noqa: E731
                                   workers={"num_workers": 2, "cpus_per_worker": 0.5},
                                   deepspeed={"config": f"configs/deepspeed/zero{stage}.json"},
                                   diffusion={"micro_batch_size": 4}, **kw)
    z2 = train_model(two(2), "diffusion", echo=lambda s: None)
    print("ZeRO-2", _losses(z2), "vs one worker", _losses(one))
    np.testing.assert_allclose(_losses(z2), _losses(one), rtol=TOL)

    # ZeRO-3, stopped after step 2 and re-run with the same command: it resumes and ends on the same trajectory
    first = train_model(two(3, stop_at_step=2), "diffusion", echo=lambda s: None)
    assert first.steps == 2
    lines = []
    second = train_model(two(3), "diffusion", echo=lines.append)
    assert second.resumed_from == 2 and any("resumed from the checkpoint at step 2" in s for s in lines)
    assert [m["step"] for m in second.losses] == [3, 4]
    print("ZeRO-3 stopped + resumed", _losses(first) + _losses(second), "vs one worker", _losses(one))
    np.testing.assert_allclose(_losses(first) + _losses(second), _losses(one), rtol=TOL)


def test_cache_generate_and_errors(tmp_path, data, ray_local, one_worker):
    from pipeline.generate import GenerateError, generate, generate_batch
    from pipeline.train import cache_embeddings, train_model

    lines = list(cache_embeddings(_cfg(tmp_path, data)))
    assert "cached 8 rows" in lines[0]
    assert "up to date" in list(cache_embeddings(_cfg(tmp_path, data)))[0]
    cached = train_model(_cfg(tmp_path, data, data={"cache": "require"}), "diffusion", echo=lambda s: None)
    _, plain = one_worker  # the same config on images
    assert cached.losses[0]["loss"] == pytest.approx(plain.losses[0]["loss"], rel=1e-5)
    train_model(_cfg(tmp_path, data), "mllm", echo=lambda s: None)

    cfg = _cfg(tmp_path, data)
    image = sorted((tu.WORLD / "sources").rglob("*.png"))[0]
    res = generate(cfg, str(image), "Can you generate an image for this circle on the left?", seed=3,
                   out_dir=str(tmp_path / "gen"))
    from PIL import Image

    with Image.open(res.image_path) as im:
        assert im.size == (32, 32)
    assert res.response.strip() and res.clip_source == "mllm"
    direct = generate(cfg, str(image), "", clip_from_image=str(image), out_dir=str(tmp_path / "gen"), name="direct")
    assert direct.clip_source == "image"

    with pytest.raises(GenerateError, match="not found"):
        generate(cfg, str(tmp_path / "missing.png"), "hello")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(GenerateError, match="not readable"):
        generate(cfg, str(tmp_path / "bad.png"), "hello")
    with pytest.raises(GenerateError, match="empty"):
        generate(cfg, str(image), "   ")

    reqs = tmp_path / "reqs.jsonl"
    import json

    reqs.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "image": str(image), "text": "Generate an image for this circle on the right.", "seed": 1},
        {"id": "b", "image": str(tmp_path / "missing.png"), "text": "hi", "seed": 2}]) + "\n")
    rows = {r["id"]: r for r in generate_batch(cfg, str(reqs), str(tmp_path / "batch"))}
    assert rows["a"]["error"] == "" and rows["a"]["image_path"].endswith("a.png")
    assert "not found" in rows["b"]["error"]
    assert (tmp_path / "batch" / "results.parquet").is_file()
