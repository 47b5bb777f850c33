"""``cafe world make DIR``: render the domain, train every world model, write the assets and measure the gates.

Usage::

    from training.world.make import WorldConfig, make_world
    report = make_world("models/world", WorldConfig(seed=0))      # resumable; skips stages that are done

Stages, in order (each writes its outputs under a temporary name and renames them into place, then records
its **key** in ``DIR/world.json``; a stage whose key is recorded and whose outputs exist is skipped):

=============  ===========================================================================================
stage          writes
=============  ===========================================================================================
pool           ``_work/pool-<key>.npz``: renders of random (instance, context) pairs (not kept in git)
oracle         ``oracle/`` (config.json + model.safetensors)
vae            ``_work/vae-<key>/`` (fp32; the t2i stage stores it inside ``t2i/``)
t2i            ``t2i/``: the SD2-layout pipeline folder (unet, vae, text_encoder, tokenizer, scheduler)
t2i_scenes     ``t2i_scenes/``: the t2i fine-tuned on two-object captions with localised cross-attention (the EM
               concept-mask testbed, :mod:`.scenes_t2i`), its gates in ``t2i_scenes/gates.json``
clip_filter    ``clip_filter/`` (open_clip ``local-dir:`` layout)
clip_cond      ``clip_cond/`` (transformers CLIPVisionModelWithProjection, converted from clip_filter)
dino_filter    ``dino_filter/`` (transformers ViTModel)
dino_cond      ``dino_cond/`` (transformers Dinov2Model, converted from dino_filter)
promptnet      ``promptnet/``: PromptNet from the t2i UNet (untrained projection; pre-training comes with the
               training jobs) + clip_filter's image tower as its CLIP vision encoder
llm            ``llm/``: the tiny Llama trained as a causal LM on the world's dialogues (:mod:`.llm`);
               ``dialogue_llm/``: the tiny random Llama (the world's builds use the template dialogue backend)
assets         ``sources/`` (every instance in a training context: a folder source for ``cafe build``),
               ``eval/`` (DreamBench-style subjects × held-out context prompts), ``scenes/`` (2–3 objects with
               exact masks), ``samples.png``
gates          ``gates.json`` and ``GATES.md`` (the table of :mod:`training.world.gates`), ``samples_t2i.png``
               (+ ``.txt``: the captions) — 48 t2i generations for held-out captions
=============  ===========================================================================================

A stage's key is a hash of (its code files, its config section, the seed, the keys of the stages it reads; for
the rendering stages, a fingerprint of what the domain produces), so editing the t2i trainer retrains t2i and
what depends on it, and nothing else, while a comment in the domain module retrains nothing. Model files are stored in
float16 (``store_dtype``) — the gates are measured on the stored files, through the model kit.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from training.data.ids import stable_hash
from training.world import domain as D
from training.world.encoders import CLIPTrainConfig, DinoTrainConfig
from training.world.llm import LLMTrainConfig
from training.world.scenes_t2i import ScenesT2IConfig
from training.world.t2i import DiffusionConfig, VAEConfig

log = logging.getLogger(__name__)

STATE_FILE = "world.json"
_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class OracleTrainConfig:
    steps: int = 400
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 32


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    pool_size: int = 24_000
    oracle: OracleTrainConfig = field(default_factory=OracleTrainConfig)
    #: 4,000 steps: at 1,500 (the third world) the oracle recognised the class in only 85 % of VAE reconstructions
    #: of held-out renders (stars blur into circles), which capped t2i.class+colour (0.77) below its 0.80 gate
    vae: VAEConfig = field(default_factory=lambda: VAEConfig(steps=4000))
    #: Step counts sized for a GPU (the third world, trained on one H100 in about 8 minutes): class (shape) was
    #: still rising in all three image models at the second world's 3,000 / 1,800 / 2,000 steps (t2i.class+colour
    #: 0.23 at 1,400 and 0.48 at 3,000). On the 2-core CPU the same command takes hours; see docs/world.md.
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(steps=5000))
    clip: CLIPTrainConfig = field(default_factory=lambda: CLIPTrainConfig(steps=6000))
    dino: DinoTrainConfig = field(default_factory=lambda: DinoTrainConfig(steps=6000))
    llm: LLMTrainConfig = field(default_factory=LLMTrainConfig)
    scenes: ScenesT2IConfig = field(default_factory=ScenesT2IConfig)
    store_dtype: str = "float16"
    num_sources_per_instance: int = 1
    eval_subjects_per_class: int = 2
    eval_refs: int = 4
    num_scenes: int = 64
    threads: int = 0  # torch threads; 0 = leave torch's default
    #: where training and the gates run: ``auto`` (CUDA when visible), ``cpu``, ``cuda``, ``cuda:N``. Not part of
    #: any stage key (how it runs, not what it makes): a GPU gives the same world within float tolerance.
    device: str = "auto"

    def scaled(self, factor: float) -> "WorldConfig":
        """The same world with every training run ``factor`` times as long (a smoke test uses 0.01)."""
        s = lambda c: replace(c, steps=max(2, int(c.steps * factor)))  # noqa: E731
        scenes = replace(s(self.scenes), num_scenes=max(64, int(self.scenes.num_scenes * factor)),
                         num_singles=max(64, int(self.scenes.num_singles * factor)),
                         batch_size=max(8, int(self.scenes.batch_size * min(1.0, factor * 10))),
                         gate_scenes=max(2, int(self.scenes.gate_scenes * factor)),
                         gate_captions=max(2, int(self.scenes.gate_captions * factor)))
        return replace(self, scenes=scenes, oracle=s(self.oracle), vae=s(self.vae), diffusion=s(self.diffusion), clip=s(self.clip),
                       dino=s(self.dino), llm=s(self.llm), pool_size=max(600, int(self.pool_size * min(1.0, factor * 10))))


# stage → (code files, config fields, dependencies)
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "pool": ((), ("pool_size",), ()),
    "oracle": (("oracle.py", "optim.py"), ("oracle",), ("pool",)),
    "vae": (("t2i.py", "optim.py"), ("vae",), ("pool",)),
    "t2i": (("t2i.py", "optim.py", "../models/tiny.py"), ("diffusion", "store_dtype"), ("pool", "vae")),
    "t2i_scenes": (("scenes_t2i.py", "t2i.py", "optim.py", "../attention/em.py"), ("scenes", "store_dtype"),
                   ("t2i", "oracle")),
    "clip_filter": (("encoders.py", "optim.py"), ("clip", "store_dtype"), ("pool",)),
    "clip_cond": (("encoders.py",), (), ("clip_filter",)),
    "dino_filter": (("encoders.py", "optim.py"), ("dino", "store_dtype"), ("pool",)),
    "dino_cond": (("encoders.py",), (), ("dino_filter",)),
    "promptnet": (("../models/promptnet.py", "../models/kit.py"), (), ("t2i", "clip_cond")),
    "llm": (("../models/tiny.py", "../models/mllm.py", "llm.py", "optim.py", "../data/dialogue_templates.py"), ("llm",),
            ()),
    "assets": (("assets.py",), ("num_sources_per_instance", "eval_subjects_per_class", "eval_refs",
                                            "num_scenes"), ()),
    "gates": (("gates.py", "oracle.py", "t2i.py", "llm.py"), (),
              ("oracle", "t2i", "clip_filter", "clip_cond", "dino_filter", "dino_cond", "llm")),
}
OUTPUTS = {
    "oracle": ("oracle",), "t2i": ("t2i",), "t2i_scenes": ("t2i_scenes",), "clip_filter": ("clip_filter",), "clip_cond": ("clip_cond",),
    "dino_filter": ("dino_filter",), "dino_cond": ("dino_cond",), "promptnet": ("promptnet",),
    "llm": ("llm", "dialogue_llm"), "assets": ("sources", "eval", "scenes", "samples.png"),
    "gates": ("gates.json", "GATES.md", "samples_t2i.png"),
}


def _code_hash(files: tuple[str, ...]) -> str:
    return stable_hash(*[(_HERE / f).resolve().read_bytes().hex() for f in files])


#: stages that read the domain directly (the others read it through the pool)
_DOMAIN_STAGES = ("pool", "assets", "t2i_scenes")


def stage_keys(cfg: WorldConfig) -> dict[str, str]:
    """Each stage's key: its code files, its config fields, the seed, its inputs' keys — and, for the stages
    that render, :func:`domain.domain_fingerprint` (what the domain produces, not its source text)."""
    keys: dict[str, str] = {}
    conf = asdict(cfg)
    domain = D.domain_fingerprint()
    for name, (files, fields, deps) in STAGES.items():
        section = json.dumps({f: conf[f] for f in fields}, sort_keys=True, default=list)
        keys[name] = stable_hash("world-stage", name, _code_hash(files), section, cfg.seed,
                                 domain if name in _DOMAIN_STAGES else "", *[keys[d] for d in deps])[:16]
    return keys


class _Progress:
    """Logs a training run's loss about ten times, with the elapsed time."""

    def __init__(self, name: str, steps: int):
        self.name, self.steps, self.t0 = name, steps, time.perf_counter()
        self.every = max(1, steps // 10)

    def __call__(self, step: int, metrics: dict) -> None:
        if step % self.every == 0 or step == self.steps - 1:
            m = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            log.info("  %s step %d/%d %s (%.0f s)", self.name, step + 1, self.steps, m, time.perf_counter() - self.t0)


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(tmp, final)


def _tmp(world: Path, name: str) -> Path:
    p = world / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(p, ignore_errors=True)
    return p


class WorldMaker:
    def __init__(self, world_dir: str | os.PathLike, cfg: WorldConfig):
        self.world = Path(world_dir)
        self.cfg = cfg
        self.keys = stage_keys(cfg)
        self.state_path = self.world / STATE_FILE
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.state.setdefault("stages", {})
        self._pool = None
        from training.models.kit import resolve_device

        self.device = str(resolve_device(cfg.device))

    # -- bookkeeping ------------------------------------------------------------------------------

    def done(self, stage: str) -> bool:
        rec = self.state["stages"].get(stage)
        if not rec or rec.get("key") != self.keys[stage]:
            return False
        return all((self.world / o).exists() for o in OUTPUTS.get(stage, ())) and (
            stage != "pool" or self._pool_path().is_file()) and (stage != "vae" or self._vae_path().is_dir())

    def _record(self, stage: str, seconds: float, **extra) -> None:
        self.state["stages"][stage] = {"key": self.keys[stage], "seconds": round(seconds, 1), **extra}
        self.state["seed"] = self.cfg.seed
        self.state["config"] = asdict(self.cfg)
        self.state.setdefault("devices", {})[stage] = self.device
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state, indent=2, default=list))
        os.replace(tmp, self.state_path)

    def _pool_path(self) -> Path:
        return self.world / "_work" / f"pool-{self.keys['pool']}.npz"

    def _vae_path(self) -> Path:
        return self.world / "_work" / f"vae-{self.keys['vae']}"

    def plan(self, only: list[str] | None = None, force: bool = False) -> list[str]:
        """The stages to run, in order. ``pool`` and ``vae`` keep their outputs in ``_work/`` (not in git): when
        their recorded key is current but the files are gone (a fresh clone), they rerun only if a stage that
        reads them has to run."""
        todo = [s for s in STAGES if (not only or s in only) and (force or not self.done(s))]
        for work_stage in ("vae", "pool"):
            recorded = self.state["stages"].get(work_stage, {}).get("key") == self.keys[work_stage]
            readers = [s for s in todo if work_stage in STAGES[s][2]]
            if work_stage in todo and recorded and not force and not readers:
                todo.remove(work_stage)
        return todo

    def run(self, only: list[str] | None = None, force: bool = False) -> dict:
        self.world.mkdir(parents=True, exist_ok=True)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        total = time.perf_counter()
        todo = self.plan(only, force)
        for stage in STAGES:
            if stage not in todo:
                if not only or stage in only:
                    log.info("world: %s is done (key %s), skipped", stage, self.keys[stage])
                continue
            log.info("world: %s …", stage)
            t0 = time.perf_counter()
            extra = getattr(self, f"_stage_{stage}")() or {}
            seconds = time.perf_counter() - t0
            self._record(stage, seconds, **extra)
            log.info("world: %s done in %.1f s", stage, seconds)
        self.state["train_seconds"] = round(sum(
            s.get("seconds", 0) for k, s in self.state["stages"].items() if k not in ("gates",)), 1)
        log.info("world: finished in %.1f s", time.perf_counter() - total)
        return self.state

    # -- data -------------------------------------------------------------------------------------

    def pool(self):
        """(images, labels, pairs, held) of the render pool (loaded from ``_work`` after the first time)."""
        if self._pool is None:
            z = np.load(self._pool_path())
            pairs = [(D.instance_from_id(i), D.Context(*c.split("-"))) for i, c in zip(z["instance"], z["context"])]
            labels = {a: z[f"label_{a}"] for a in D.ATTRIBUTES}
            self._pool = (z["images"], labels, pairs, z["held_out"])
        return self._pool

    def train_pool(self):
        images, labels, pairs, held = self.pool()
        keep = ~held
        return images[keep], {a: v[keep] for a, v in labels.items()}, [p for p, h in zip(pairs, held) if not h]

    def _stage_pool(self):
        pairs = D.sample_pairs(self.cfg.pool_size, self.cfg.seed, "all")
        images, labels = D.render_pairs(pairs, self.cfg.seed)
        held = np.array([D.is_held_out(i, c) for i, c in pairs])
        out = self._pool_path()
        out.parent.mkdir(parents=True, exist_ok=True)
        for old in out.parent.glob("pool-*.npz"):
            old.unlink()
        tmp = out.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, held_out=held, instance=np.array([i.id for i, _ in pairs]),
                 context=np.array([c.id for _, c in pairs]), **{f"label_{a}": v for a, v in labels.items()})
        os.replace(tmp, out)
        self._pool = None
        return {"images": len(pairs), "held_out": int(held.sum())}

    # -- models -----------------------------------------------------------------------------------

    def _stage_oracle(self):
        from training.world.oracle import save_oracle, train_oracle

        images, labels, _, _ = self.pool()  # the judge sees every pair, held-out ones included
        c = self.cfg.oracle
        net = train_oracle(images, labels, steps=c.steps, batch_size=c.batch_size, lr=c.lr, seed=self.cfg.seed + 1,
                           width=c.width, progress=_Progress("oracle", c.steps), device=self.device)
        tmp = _tmp(self.world, "oracle")
        save_oracle(net, tmp)
        _replace_dir(tmp, self.world / "oracle")

    def _stage_vae(self):
        from training.world.t2i import train_vae

        images, _, _ = self.train_pool()
        vae = train_vae(images, self.cfg.vae, self.cfg.seed + 2, _Progress("vae", self.cfg.vae.steps), self.device)
        out = self._vae_path()
        for old in out.parent.glob("vae-*"):
            shutil.rmtree(old)
        tmp = _tmp(out.parent, out.name)
        vae.save_pretrained(tmp, safe_serialization=True)
        _replace_dir(tmp, out)

    def _stage_t2i(self):
        from diffusers import AutoencoderKL, StableDiffusionPipeline

        from training.models.tiny import build_clip_tokenizer, write_clip_bpe_files
        from training.world.t2i import encode_latents, train_t2i

        dtype = getattr(torch, self.cfg.store_dtype)
        images, _, pairs = self.train_pool()
        vae = AutoencoderKL.from_pretrained(self._vae_path(), local_files_only=True, use_safetensors=True).eval()
        # train on the latents of the *stored* (rounded) VAE, so generation decodes what training saw
        vae = vae.to(dtype).float()
        latents = encode_latents(vae, images)
        c = self.cfg.diffusion
        tokenizer = build_clip_tokenizer(c.context_length, D.VOCABULARY, 0)
        captions = lambda idx, rng: [D.training_caption(*pairs[i], rng) for i in idx]  # noqa: E731
        unet, text_encoder, scheduler = train_t2i(latents, captions, tokenizer, c, self.cfg.seed + 3,
                                                  _Progress("t2i", c.steps), self.device)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        ).to(dtype)
        tmp = _tmp(self.world, "t2i")
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_clip_bpe_files(tmp / "tokenizer", 0, D.VOCABULARY)
        _replace_dir(tmp, self.world / "t2i")

    def _stage_t2i_scenes(self):
        from training.models.kit import load_role
        from training.world.scenes_t2i import finetune_scenes, measure_scene_gates

        dtype = getattr(torch, self.cfg.store_dtype)
        t2i = load_role("t2i", self.world / "t2i", dtype="float32").components
        c = self.cfg.scenes
        unet, text_encoder = finetune_scenes(t2i, c, self.cfg.seed + 11, _Progress("t2i_scenes", c.steps), self.device)
        tmp = _tmp(self.world, "t2i_scenes")
        shutil.copytree(self.world / "t2i", tmp)
        for name, module in (("unet", unet), ("text_encoder", text_encoder)):
            shutil.rmtree(tmp / name)
            module.to(dtype).save_pretrained(tmp / name, safe_serialization=True)
        (tmp / "cafe_world.json").write_text(json.dumps({
            "role": "t2i", "trained": True, "tuned_from": "t2i",
            "note": "the world t2i fine-tuned on two-object captions with attention supervision of the class words "
                    "(training.world.scenes_t2i): the EM concept-mask testbed"}, indent=2))
        _replace_dir(tmp, self.world / "t2i_scenes")
        gates = measure_scene_gates(self.world, n_iou=c.gate_scenes, n_single=c.gate_captions, n_two=c.gate_captions,
                                    device=self.device, progress=lambda m: log.info("  %s", m))
        (self.world / "t2i_scenes" / "gates.json").write_text(json.dumps([g.as_dict() for g in gates], indent=2))
        return {"gates": {g.name: round(g.figure, 4) for g in gates}, "passed": all(g.passed for g in gates)}

    def _stage_clip_filter(self):
        from safetensors.torch import save_file

        from training.world.encoders import OPENAI_MEAN, OPENAI_STD, open_clip_config, train_clip

        images, _, pairs = self.train_pool()
        model = train_clip(images, pairs, self.cfg.clip, self.cfg.seed + 4, _Progress("clip", self.cfg.clip.steps),
                           self.device)
        tmp = _tmp(self.world, "clip_filter")
        tmp.mkdir(parents=True)
        cfg = {"model_cfg": open_clip_config(self.cfg.clip),
               "preprocess_cfg": {"size": D.IMAGE_SIZE, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                                  "interpolation": "bicubic", "resize_mode": "shortest"}}
        (tmp / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
        dtype = getattr(torch, self.cfg.store_dtype)
        save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "open_clip_model.safetensors"))
        _replace_dir(tmp, self.world / "clip_filter")

    def _load_clip_filter_fp32(self):
        from training.models.kit import load_role

        return load_role("clip_filter", self.world / "clip_filter").components.model

    def _stage_clip_cond(self):
        from transformers import CLIPImageProcessor

        from training.world.encoders import OPENAI_MEAN, OPENAI_STD, open_clip_to_hf_vision

        model = open_clip_to_hf_vision(self._load_clip_filter_fp32(), projection=True)
        tmp = _tmp(self.world, "clip_cond")
        model.to(getattr(torch, self.cfg.store_dtype)).save_pretrained(tmp, safe_serialization=True)
        _processor(CLIPImageProcessor, OPENAI_MEAN, OPENAI_STD).save_pretrained(tmp)
        _replace_dir(tmp, self.world / "clip_cond")

    def _stage_dino_filter(self):
        from transformers import ViTImageProcessor

        from training.world.encoders import IMAGENET_MEAN, IMAGENET_STD, train_dino

        images, labels, pairs = self.train_pool()
        inst_index = {inst.id: k for k, inst in enumerate(D.all_instances())}
        ids = np.array([inst_index[i.id] for i, _ in pairs])
        # colour groups only when hard batches are asked for (passing them draws one more random number per step)
        colour = (np.array([list(D.COLOURS).index(i.colour) for i in D.all_instances()])
                  if self.cfg.dino.hard_batches else None)
        model = train_dino(images, ids, self.cfg.dino, self.cfg.seed + 5, _Progress("dino", self.cfg.dino.steps),
                           self.device, groups_of=colour)
        tmp = _tmp(self.world, "dino_filter")
        model.to(getattr(torch, self.cfg.store_dtype)).save_pretrained(tmp, safe_serialization=True)
        _processor(ViTImageProcessor, IMAGENET_MEAN, IMAGENET_STD).save_pretrained(tmp)
        _replace_dir(tmp, self.world / "dino_filter")

    def _stage_dino_cond(self):
        from transformers import BitImageProcessor

        from training.models.kit import load_role
        from training.world.encoders import IMAGENET_MEAN, IMAGENET_STD, vit_to_dinov2

        vit = load_role("dino_filter", self.world / "dino_filter").components.model
        model = vit_to_dinov2(vit)
        tmp = _tmp(self.world, "dino_cond")
        model.to(getattr(torch, self.cfg.store_dtype)).save_pretrained(tmp, safe_serialization=True)
        _processor(BitImageProcessor, IMAGENET_MEAN, IMAGENET_STD, crop=True).save_pretrained(tmp)
        _replace_dir(tmp, self.world / "dino_cond")

    def _stage_promptnet(self):
        from transformers import CLIPImageProcessor

        from training.models.kit import load_role, save_promptnet
        from training.models.promptnet import PromptNet
        from training.world.encoders import OPENAI_MEAN, OPENAI_STD, open_clip_to_hf_vision

        torch.manual_seed(self.cfg.seed + 6)
        unet = load_role("t2i", self.world / "t2i").components.unet
        enc = open_clip_to_hf_vision(self._load_clip_filter_fp32(), projection=False)
        net = PromptNet.from_unet(unet, clip_vision_width=enc.config.hidden_size,
                                  text_width=unet.config.cross_attention_dim, proj_channels=16)
        dtype = getattr(torch, self.cfg.store_dtype)
        tmp = _tmp(self.world, "promptnet")
        save_promptnet(net.to(dtype), tmp)
        enc.to(dtype).save_pretrained(tmp / "image_encoder", safe_serialization=True)
        _processor(CLIPImageProcessor, OPENAI_MEAN, OPENAI_STD, crop=True).save_pretrained(tmp / "image_encoder")
        (tmp / "cafe_world.json").write_text(json.dumps({
            "role": "promptnet", "trained": False,
            "note": "encoder half initialised from the world t2i UNet; projection untrained until PromptNet "
                    "pre-training (the training jobs) runs on the world"}, indent=2))
        _replace_dir(tmp, self.world / "promptnet")

    def _stage_llm(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from training.models.tiny import TINY_WRITERS
        from training.world.llm import reply_accuracy, train_llm

        extra = {}
        for k, role in enumerate(("llm", "dialogue_llm")):
            tmp = _tmp(self.world, role)
            TINY_WRITERS[role](tmp, self.cfg.seed * 1000 + 50 + k)
            trained = role == "llm"
            if trained:
                tok = AutoTokenizer.from_pretrained(tmp)
                model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
                c = self.cfg.llm
                model = train_llm(model, tok, c, self.cfg.seed + 7, _Progress("llm", c.steps), self.device)
                model.save_pretrained(tmp, safe_serialization=True)  # float32: a frozen LLM this small costs 0.5 MB
                extra["held_out_reply_accuracy"] = round(reply_accuracy(model, tok)[0], 4)
            note = ({"role": role, "trained": True, "objective": "causal LM on the world's dialogues "
                     "(training.world.llm)"} if trained else
                    {"role": role, "trained": False, "note": "random tiny Llama; world builds use the template "
                     "dialogue backend"})
            (tmp / "cafe_world.json").write_text(json.dumps(note, indent=2))
            _replace_dir(tmp, self.world / role)
        return extra

    def _stage_assets(self):
        from training.world.assets import write_assets

        return write_assets(self.world, self.cfg)

    def _stage_gates(self):
        from training.world.gates import measure_gates

        gates = measure_gates(self.world, progress=lambda m: log.info("  %s", m), device=self.device,
                              samples_path=self.world / "samples_t2i.png")
        write_gate_files(self.world, gates, self.state)
        return {"passed": all(g.passed for g in gates)}


def write_gate_files(world: Path, gates, state: dict) -> None:
    from training.world.gates import format_table

    (world / "gates.json").write_text(json.dumps([g.as_dict() for g in gates], indent=2))
    secs = {k: v.get("seconds") for k, v in state.get("stages", {}).items()}
    (world / "GATES.md").write_text(
        "# World gates\n\nMeasured by `cafe world check` on the stored files (loaded through the model kit).\n\n"
        "```\n" + format_table(gates) + "\n```\n\nStage seconds (last make): " + json.dumps(secs) + "\n")


def _processor(cls, mean, std, crop: bool = False):
    from training.models.tiny import image_processor_kwargs

    return cls(**image_processor_kwargs(mean, std, center_crop=crop, size=D.IMAGE_SIZE))


def make_world(world_dir: str | os.PathLike, cfg: WorldConfig | None = None, only: list[str] | None = None,
               force: bool = False) -> dict:
    return WorldMaker(world_dir, cfg or WorldConfig()).run(only=only, force=force)
