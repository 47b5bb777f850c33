"""Eq. 4 self-distillation targets (SPEC D3): the checkpoint it names, λ = 0 exactness, mode mix, round-r lineage."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.trainutil import WORLD, roles

PROMPTS = ["a circle on the left", "a star in large size"]
SEEDS = [11, 12]


def _sources():
    from PIL import Image

    files = sorted((WORLD / "sources").rglob("*.png"))
    return [np.asarray(Image.open(f).convert("RGB")) for f in files[:2]], \
        [np.asarray(Image.open(f).convert("RGB")) for f in files[40:42]]


def write_diffusion(out, seed: int) -> str:
    """A conditioned UNet on the world t2i with a seeded, non-zero conditioner (an untrained checkpoint)."""
    from training.encoders import ConditionEncoders  # noqa: F401  (the dims come from the loaded encoders)
    from training.models.conditioned import ConditionedUNet
    from training.trainers.base import load, load_encoders

    r = roles()
    t2i = load("t2i", r["t2i"], "cpu")
    enc = load_encoders(r, "cpu", ("clip_target", "dino_input"), t2i=t2i)
    torch.manual_seed(seed)
    model = ConditionedUNet.from_unet(t2i.components.unet, enc.clip_dim, enc.dino_width)
    with torch.no_grad():
        for p in model.conditioner_state().values():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * 0.2)
    model.save(out)
    return str(out)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("distill")
    return write_diffusion(base / "a", 0), write_diffusion(base / "b", 1)


def generator(diffusion: str, scale_dino: float, mode: str = "eq4", mllm: str | None = None):
    from training.assistant import Assistant
    from training.methods.self_distill import SelfDistillGenerator
    from training.trainers.base import load

    assistant = Assistant.load(roles(), mllm, diffusion, device="cpu")
    t2i = load("t2i", roles()["t2i"], "cpu")
    return SelfDistillGenerator(assistant, t2i.components, mode, scale_dino, alpha=0.5, steps=4, guidance=2.5)


def test_lambda_zero_target_does_not_depend_on_the_source(checkpoints):
    a, _ = checkpoints
    src1, src2 = _sources()
    g0 = generator(a, 0.0)
    x = g0.sample(src1, PROMPTS, PROMPTS, SEEDS)
    y = g0.sample(src2, PROMPTS, PROMPTS, SEEDS)
    assert all(np.array_equal(p, q) for p, q in zip(x, y))  # exact: DINO is scaled by 0
    g = generator(a, 0.5)
    x, y = g.sample(src1, PROMPTS, PROMPTS, SEEDS), g.sample(src2, PROMPTS, PROMPTS, SEEDS)
    assert not all(np.array_equal(p, q) for p, q in zip(x, y))  # λ > 0: the source's identity enters


def test_eq4_uses_the_named_checkpoint_and_equals_an_independent_composition(checkpoints):
    from training.assistant import Assistant
    from training.encoders import images_to_tensor
    from training.trainers.base import load
    from training.world.t2i import generate

    a, b = checkpoints
    src, _ = _sources()
    got_a = generator(a, 0.5).sample(src, PROMPTS, PROMPTS, SEEDS)
    got_b = generator(b, 0.5).sample(src, PROMPTS, PROMPTS, SEEDS)
    assert not all(np.array_equal(p, q) for p, q in zip(got_a, got_b))  # the checkpoint decides the target
    # independently: x_ref from the base t2i with each row's seed → its CLIP embedding; DINO patches of the source
    t2i = load("t2i", roles()["t2i"], "cpu")
    x_ref = generate(t2i.components, PROMPTS, SEEDS, steps=4, guidance=2.5)
    assistant = Assistant.load(roles(), None, b, device="cpu")
    clip = assistant.encoders.clip_embed(images_to_tensor(list(x_ref)))
    dino = assistant.encoders.dino_tokens(images_to_tensor(src))
    want = assistant.sample(clip, dino, SEEDS, steps=4, guidance=2.5, scale_dino=0.5)
    assert all(np.array_equal(p, q) for p, q in zip(got_b, want))


def test_mix_needs_the_mllm_and_eq4_is_its_alpha_one_end(checkpoints):
    from training.methods.self_distill import SelfDistillGenerator

    a, _ = checkpoints
    g = generator(a, 0.5)
    with pytest.raises(ValueError, match="mode mix needs the MLLM"):
        SelfDistillGenerator(g.assistant, g.t2i, "mix")
    with pytest.raises(ValueError, match="unknown self-distillation mode"):
        SelfDistillGenerator(g.assistant, g.t2i, "nope")


def test_round_one_config_requires_the_previous_models():
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="build.distill.diffusion"):
        load_config("configs/tiny.yaml", ["build.round=1"])
    cfg = load_config("configs/tiny.yaml", ["build.round=1", "build.distill.diffusion=/x"])
    assert cfg.build.distill.mode == "eq4" and cfg.build.distill.scale_dino == 0.5


@pytest.mark.integration
def test_round_one_build_rows_carry_round_checkpoint_and_parent(checkpoints, tmp_path, ray_local):
    from pipeline.build import run_build
    from pipeline.stages import choose_phrases, distill_checkpoint
    from tests.buildutil import as_config, read_parquet_dir
    from training.data import schema as S
    from training.data.ids import row_id
    from training.models.fingerprint import fingerprint

    a, _ = checkpoints
    src = tmp_path / "src" / "circle"
    src.mkdir(parents=True)
    for f in sorted((WORLD / "sources" / "circle").glob("*.png"))[:2]:
        (src / f.name).write_bytes(f.read_bytes())
    data = {"run": {"name": "r1", "seed": 0}, "ray": {"num_cpus": 2}, "models": {"root": str(WORLD)},
            "build": {"round": 1, "sources": {"kind": "folder", "path": str(tmp_path / "src"), "class_from": "folder",
                                              "image_size": 32},
                      "instructions": {"phrases": ["on the left", "in large size"], "per_source": 2},
                      "distill": {"diffusion": a, "num_inference_steps": 4},
                      "rules": {"clip_t_min": -1.0, "dino_min": -1.0}, "rows_per_chunk": 4}}
    cfg = as_config(data)
    result = run_build(cfg, out_dir=tmp_path / "out")
    rows = read_parquet_dir(result.out_dir / "dataset" / "data").to_pylist()
    assert len(rows) == 4
    want_ckpt = distill_checkpoint(cfg)
    import hashlib

    # the id depends on the weights only, not on where they are or on sampling settings
    assert want_ckpt == hashlib.sha256(f"diffusion:{fingerprint(a)}".encode()).hexdigest()[:16]
    for r in rows:
        assert r[S.ROUND] == 1 and r[S.CHECKPOINT] == want_ckpt and r[S.GENERATOR] == "self_distill_eq4"
        assert r[S.PARENT_ID] == row_id(0, r[S.SOURCE_ID], r[S.INSTRUCTION]) != r[S.ID]
        assert r[S.ID] == row_id(1, r[S.SOURCE_ID], r[S.INSTRUCTION])
        assert r[S.INSTRUCTION] in choose_phrases(r[S.SOURCE_ID], ["on the left", "in large size"], 2, 0)
        assert json.loads(r[S.GENERATOR_PARAMS])["scale_dino"] == 0.5


def test_assistant_batch_equals_one_request_at_a_time(checkpoints):
    """generate_batch (the evaluation's path) against generate per row (direct mode; each row's noise from its seed)."""
    from training.assistant import Assistant

    a, _ = checkpoints
    assistant = Assistant.load(roles(), None, a, device="cpu")
    src, other = _sources()
    images, clip_images = src + other, other + src
    seeds = [3, 4, 5, 6]
    batch = assistant.generate_batch(images, [""] * 4, seeds, clip_images=clip_images, steps=3, guidance=2.0,
                                     batch_size=3)
    for i in range(4):
        one = assistant.generate(images[i], "", seed=seeds[i], clip_image=clip_images[i], steps=3, guidance=2.0)
        diff = np.abs(one.image.astype(int) - batch[i].image.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.05, (i, diff.max(), diff.mean())  # batch numerics only
        assert batch[i].clip_source == "image" and batch[i].response == ""
    with pytest.raises(ValueError, match="no MLLM loaded"):
        assistant.generate_batch(images, ["x"] * 4, seeds)


def test_round_one_batches_rows_across_sources_like_source_by_source(checkpoints, tmp_path):
    """Rounds ≥ 1 fill each batch with rows of any source (each row with its own source image): the targets equal
    source-by-source generation up to batch-size rounding, in the same row order."""
    import pyarrow as pa

    from pipeline.build import stage_keys, write_plan
    from pipeline.stages import GenerateStage, SourcesStage
    from pipeline.store import Storage
    from tests.buildutil import as_config
    from training.data import schema as S

    a, _ = checkpoints
    src = tmp_path / "src"
    for cls in ("circle", "star"):
        (src / cls).mkdir(parents=True)
        f = sorted((WORLD / "sources" / cls).glob("*.png"))[0]
        (src / cls / f.name).write_bytes(f.read_bytes())
    cfg = as_config({"run": {"name": "r1", "seed": 0}, "models": {"root": str(WORLD)},
                     "build": {"round": 1, "sources": {"kind": "folder", "path": str(src), "image_size": 32},
                               "instructions": {"phrases": ["on the left", "in large size", "in outline style"],
                                                "per_source": 3},
                               "profusion": {"batch_size": 4},
                               "distill": {"diffusion": a, "num_inference_steps": 4}, "rows_per_chunk": 6}})
    keys = stage_keys(cfg, {})
    out = Storage(tmp_path / "out", owner="t")
    (chunk,) = write_plan(cfg, out, keys["plan"], [])
    kw = {"config": cfg.model_dump(mode="json"), "out": out.uri, "keys": keys, "owner": "t"}
    block = SourcesStage(**kw)(pa.table({"chunk": [chunk]}))
    stage = GenerateStage(**kw)
    stage._setup_once()
    rows = [r for r in block.to_pylist() if r[S.STATUS] == S.STATUS_ROW]
    by_source: dict = {}
    for r in rows:
        by_source.setdefault(r[S.SOURCE_ID], []).append(r)
    assert [len(g) for g in by_source.values()] == [3, 3]  # batches of 4 cross the sources: [3 + 1], [2]
    batched = stage._generate_across_sources(by_source)
    for sid, group in by_source.items():
        alone = stage._generate_source(sid, group)
        assert len(batched[sid]) == len(alone) == 3
        assert all(np.abs(x.astype(int) - y.astype(int)).max() <= 2 for x, y in zip(batched[sid], alone))
    assert not np.array_equal(batched[list(by_source)[0]][0], batched[list(by_source)[1]][0])
