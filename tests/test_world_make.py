"""``cafe world make`` as machinery, on a 1 %-length world: every stage, kit loading, skip, resume, keys.

The figures of the real world are asserted in test_world_models.py (shipped files) and test_world_rebuild.py.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.world import domain as D
from training.world.make import OUTPUTS, STAGES, WorldConfig, WorldMaker, make_world, stage_keys

ROLES = ("t2i", "clip_filter", "dino_filter", "clip_cond", "dino_cond", "promptnet", "llm", "dialogue_llm")
QUICK = WorldConfig(device="cpu").scaled(0.01)
pytestmark = pytest.mark.slow  # one 1 %-length world for the module: about a minute on 2 cores


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    state = make_world(d, QUICK)
    return d, state


def _mtimes(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


def test_every_stage_ran_and_every_role_loads_through_the_kit(quick_world):
    from training.models.kit import load_role, smoke_forward

    d, state = quick_world
    assert set(state["stages"]) == set(STAGES)
    for stage, outputs in OUTPUTS.items():
        assert all((d / o).exists() for o in outputs), stage
    for role in ROLES:
        loaded = load_role(role, d / role)
        shapes = smoke_forward(loaded)
        assert shapes and all(all(n > 0 for n in s) for s in shapes.values())
    # trained weights are stored in float16 (the llm roles stay float32: 0.5 MB, frozen in the MLLM)
    from safetensors import safe_open

    with safe_open(str(d / "t2i" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    gates = json.loads((d / "gates.json").read_text())
    assert {g["name"] for g in gates} >= {"oracle", "t2i.class+colour", "clip.retrieval", "dino_filter.retrieval",
                                          "llm.reply"}
    assert json.loads((d / "llm" / "cafe_world.json").read_text())["trained"] is True
    # the EM testbed: the t2i tuned on two-object scenes, its own gates, the t2i's VAE and tokenizer unchanged
    scenes = load_role("t2i", d / "t2i_scenes")
    assert smoke_forward(scenes)
    assert {g["name"] for g in json.loads((d / "t2i_scenes" / "gates.json").read_text())} == {
        "t2i_scenes.attention_iou", "t2i_scenes.two_objects", "t2i_scenes.class+colour"}
    read = lambda p: (d / p).read_bytes()  # noqa: E731
    assert read("t2i_scenes/vae/diffusion_pytorch_model.safetensors") == read("t2i/vae/diffusion_pytorch_model.safetensors")
    assert read("t2i_scenes/unet/diffusion_pytorch_model.safetensors") != read("t2i/unet/diffusion_pytorch_model.safetensors")


def test_assets(quick_world):
    d, _ = quick_world
    sources = sorted((d / "sources").rglob("*.png"))
    assert len(sources) == len(D.all_instances())
    for p in sources[:5]:
        inst = D.instance_from_id(p.stem.split("__")[0])
        assert p.parent.name == inst.cls and Image.open(p).size == (D.IMAGE_SIZE, D.IMAGE_SIZE)
    for line in (d / "scenes" / "scenes.jsonl").read_text().splitlines()[:10]:
        scene = json.loads(line)
        for obj in scene["objects"]:
            mask = np.asarray(Image.open(d / "scenes" / obj["mask"])) > 0
            assert int(mask.sum()) == obj["pixels"] > 0
    prompts = [json.loads(x) for x in (d / "eval" / "prompts.jsonl").read_text().splitlines()]
    assert {p["phrase"] for p in prompts} == set(D.PHRASES)
    assert all(D.phrase_attribute(p["phrase"]) == (p["attribute"], p["value"]) for p in prompts)
    assert any(p["held_out"] for p in prompts)


def test_second_run_skips_every_stage(quick_world):
    d, _ = quick_world
    before = _mtimes(d)
    make_world(d, QUICK)
    after = _mtimes(d)
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed <= {"world.json"}  # only the state file is rewritten


def test_keys_follow_dependencies():
    base = stage_keys(QUICK)
    clip = stage_keys(replace(QUICK, clip=replace(QUICK.clip, lr=QUICK.clip.lr * 2)))
    assert {s for s in base if base[s] != clip[s]} == {"clip_filter", "clip_cond", "promptnet", "gates"}
    vae = stage_keys(replace(QUICK, vae=replace(QUICK.vae, steps=QUICK.vae.steps + 1)))
    assert {s for s in base if base[s] != vae[s]} == {"vae", "t2i", "t2i_scenes", "promptnet", "gates"}
    scenes = stage_keys(replace(QUICK, scenes=replace(QUICK.scenes, attn_weight=2.0)))
    assert {s for s in base if base[s] != scenes[s]} == {"t2i_scenes"}
    seed = stage_keys(replace(QUICK, seed=1))
    assert all(base[s] != seed[s] for s in base if s != "llm") and base != seed


def test_killed_run_resumes_without_redoing_finished_stages(tmp_path, monkeypatch):
    def boom(self):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(WorldMaker, "_stage_vae", boom)
    with pytest.raises(KeyboardInterrupt):
        make_world(tmp_path, QUICK, only=["pool", "oracle", "vae"])
    state = json.loads((tmp_path / "world.json").read_text())
    assert set(state["stages"]) == {"pool", "oracle"}
    oracle_bytes = (tmp_path / "oracle" / "model.safetensors").read_bytes()
    mtime = (tmp_path / "oracle" / "model.safetensors").stat().st_mtime_ns
    monkeypatch.undo()
    make_world(tmp_path, QUICK, only=["pool", "oracle", "vae"])
    assert (tmp_path / "oracle" / "model.safetensors").stat().st_mtime_ns == mtime
    assert set(json.loads((tmp_path / "world.json").read_text())["stages"]) == {"pool", "oracle", "vae"}
    assert not list(tmp_path.glob(".*.tmp-*"))
    # deterministic: the same stages in a fresh directory give the same bytes
    other = tmp_path / "again"
    make_world(other, QUICK, only=["pool", "oracle"])
    assert (other / "oracle" / "model.safetensors").read_bytes() == oracle_bytes


def test_fresh_clone_without_work_files_runs_nothing(quick_world, tmp_path):
    """The pool and the fp32 VAE live in _work/ (not in git): a clone without them has nothing to redo, while
    a stage that reads them (here t2i, after its outputs vanish) brings them back."""
    import shutil

    d, _ = quick_world
    clone = tmp_path / "clone"
    shutil.copytree(d, clone, ignore=shutil.ignore_patterns("_work"))
    assert WorldMaker(clone, QUICK).plan() == []
    shutil.rmtree(clone / "t2i")
    assert WorldMaker(clone, QUICK).plan() == ["pool", "vae", "t2i"]
