"""`cafe train` through Ray Train + DeepSpeed on a local loopback cluster, then `cafe cache` and `cafe generate`.

* two CPU workers with ZeRO-2 and with ZeRO-3 follow the single-worker loss trajectory at the same global batch,
  for the diffusion model and for the MLLM; under ZeRO-3 each of the two ranks holds half of the frozen LLM;
* a two-worker ZeRO-3 run stopped after step k and re-run with the same command resumes (Ray Train restores the
  checkpoint by run name + storage path), each rank pulling only its own partitions, and follows the
  uninterrupted single-worker trajectory (that a resumed run continues *exactly* is checked in-process by
  tests/test_train_units.py);
* the shards Ray Train hands the workers, padded to equal sizes and cut into full micro-batches, train on every
  row of the dataset in each epoch;
* the exported weights drive `generate` (an image of the configured size and a non-empty response), and bad
  requests fail with clear errors; a bfloat16 cache stage's features train to the first loss of images within
  bf16's rounding, and each trainer reads only its own columns.
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


@pytest.fixture(scope="module")
def one_worker_mllm(one_worker, data):
    """The single-worker MLLM reference, exported beside the diffusion model (generate uses both)."""
    from pipeline.train import train_model

    tmp, _ = one_worker
    return train_model(_cfg(tmp, data), "mllm", echo=lambda s: None)


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
    # each rank pulled its own partitions (model and optimizer states) and nothing of the other rank's
    assert sorted(second.pulled) == [0, 1]
    for rank, files in second.pulled.items():
        other = 1 - rank
        assert "state.json" in files and not any(f.startswith("weights/") for f in files)
        assert any(f"zero_pp_rank_{rank}_" in f and f.endswith("optim_states.pt") for f in files), files
        assert any(f"zero_pp_rank_{rank}_" in f and f.endswith("model_states.pt") for f in files), files
        assert not any(f"zero_pp_rank_{other}_" in f for f in files), files


def test_mllm_on_two_ranks_follows_one_and_zero3_halves_the_llm(tmp_path, data, ray_local, one_worker_mllm):
    from pipeline.train import train_model

    one = one_worker_mllm
    assert one.steps == 2 and all(s["local"] == s["total"] for s in one.frozen_share.values())
    for stage in (2, 3):
        two = train_model(_cfg(tmp_path / f"z{stage}", data, workers={"num_workers": 2, "cpus_per_worker": 0.5},
                               deepspeed={"config": f"configs/deepspeed/zero{stage}.json"},
                               mllm={"micro_batch_size": 4}), "mllm", echo=lambda s: None)
        print(f"MLLM ZeRO-{stage} two ranks", _losses(two), "vs one", _losses(one), "frozen share", two.frozen_share)
        np.testing.assert_allclose(_losses(two), _losses(one), rtol=TOL)
        assert sorted(two.frozen_share) == [0, 1]
        total = one.frozen_share[0]["total"]
        for share in two.frozen_share.values():
            assert share["total"] == total
            if stage == 2:
                assert share["local"] == total  # ZeRO-2 partitions only the optimizer state
            else:  # ZeRO-3: each rank holds its half (each parameter padded to a multiple of the world size)
                assert total / 2 <= share["local"] <= total / 2 + len(list(_llm_params(tu.WORLD / "llm")))


def _llm_params(path):
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            yield from st.keys()


def test_every_row_is_trained_in_each_epoch_on_two_ranks(ray_local):
    """Ray Train's equal split of a padded dataset, cut into full micro-batches per rank: the union of the ids the
    two ranks see in one epoch is the dataset's; both ranks train the same number of micro-batches."""
    import threading

    import ray.data

    from pipeline.train import pad_to_workers
    from training.trainers.engine import full_batches

    rows = 11
    ds = pad_to_workers(ray.data.from_items([{"id": f"r{i:02d}"} for i in range(rows)]), rows, 2)
    splits = ds.streaming_split(2, equal=True)
    seen: dict[int, list] = {}

    def consume(rank):
        seen[rank] = [list(b["id"]) for b in full_batches(
            splits[rank].iter_batches(batch_size=4, batch_format="numpy", local_shuffle_buffer_size=8,
                                      local_shuffle_seed=rank), 4)]

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(seen[0]) == len(seen[1]) == 2  # 6 rows a rank → 2 full micro-batches each
    assert all(len(b) == 4 for r in seen.values() for b in r)
    assert {i for r in seen.values() for b in r for i in b} == {f"r{i:02d}" for i in range(rows)}
    one = ray.data.from_items([{"id": "only"}])
    assert pad_to_workers(one, 1, 4).count() == 4  # fewer rows than workers: every worker still gets one


def test_cache_generate_and_errors(tmp_path, data, ray_local, one_worker, one_worker_mllm):
    import pyarrow.parquet as pq

    from pipeline.generate import GenerateError, generate, generate_batch
    from pipeline.train import READS, _read, cache_embeddings, data_paths, train_model

    bf16 = {"cache": {"dtype": "bfloat16"}}
    lines = list(cache_embeddings(_cfg(tmp_path, data, **bf16)))
    assert "cached 8 rows" in lines[0]
    assert "up to date" in list(cache_embeddings(_cfg(tmp_path, data, **bf16)))[0]
    require = _cfg(tmp_path, data, data={"cache": "require"}, **bf16)
    shard = next((data / "cache").rglob("*.parquet"))
    assert pq.read_schema(shard).field("dino_input").type.storage_type.value_type == "uint16"  # bf16 bits
    for model in ("diffusion", "mllm"):  # each trainer reads only its columns
        paths, cached = data_paths(require, model)
        assert cached and _read(paths, model, True, False).columns() == list(READS[model]["cache"])
    cached = train_model(_cfg(tmp_path, data, data={"cache": "require"}, diffusion={"max_steps": 1}, **bf16),
                         "diffusion", echo=lambda s: None)  # (its first loss is the check: one step)
    _, plain = one_worker  # the same config on images
    assert cached.losses[0]["loss"] == pytest.approx(plain.losses[0]["loss"], rel=1e-2)  # bf16 features

    where, _ = one_worker
    cfg = _cfg(where, data)  # the one-worker runs' exported diffusion model and MLLM
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
    summary = generate_batch(cfg, str(reqs), str(tmp_path / "batch"))
    assert (summary.requests, summary.failed) == (2, 1)
    rows = {r["id"]: r for r in pq.read_table(summary.results).to_pylist()}
    assert rows["a"]["error"] == "" and rows["a"]["image_path"].endswith("a.png")
    assert "not found" in rows["b"]["error"]
