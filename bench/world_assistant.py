"""The CAFE assistant on the synthetic world, end to end, judged by the world's oracle (issue 9's quality study).

    python bench/world_assistant.py [--out outputs/wa] [--skip-train] [--seeds 0 1]

1. ``cafe train promptnet`` on the world's 108 source images (500 steps, lr 3e-4);
2. ``cafe build`` round 0 with that PromptNet (S* guidance s1 = 2, s2 = 2, 4 instructions per source, or
   ``--per-source N``);
3. ``cafe cache``, then ``cafe train diffusion`` (800 steps, lr 5e-4) and ``cafe train mllm`` (400 steps) on it;
4. :func:`training.world.assistant_eval.evaluate_assistant` on the world's eval set (12 subjects × 11
   instructions, reference image 0, the given seeds): the assistant, the direct mode, and two baselines (input
   unchanged; the world t2i on the instruction text).

Writes ``<out>/assistant_eval.json`` and prints the table recorded in bench/RESULTS.md. ``--mllm-steps``,
``--mllm-lam``, ``--mllm-lr`` change the MLLM run (its own run name then, and ``assistant_eval_<tag>.json``);
``--only-mllm`` retrains only the MLLM on what ``--out`` already holds (also with ``--ideal``, the ideal-data
diagnostic).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CAFE = str(ROOT / ".venv" / "bin" / "cafe")


def sh(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, check=True, cwd=ROOT)


@dataclass(frozen=True)
class MLLMRun:
    """The MLLM run's overrides (``--mllm-*``; ``None``: configs/tiny.yaml's value)."""

    steps: int = 400
    lam: float | None = None
    lr: float | None = None

    def args(self) -> list[str]:
        args = ["--set", f"train.mllm.max_steps={self.steps}"]
        for key in ("lam", "lr"):
            if getattr(self, key) is not None:
                args += ["--set", f"train.mllm.{key}={getattr(self, key)}"]
        return args

    @property
    def tag(self) -> str:
        """A name for a non-default run ("" for the default): its own Ray Train run name, so that it does not
        resume another run's checkpoint, and its own eval file."""
        parts = [f"s{self.steps}"] + [f"{k}{getattr(self, k):g}" for k in ("lam", "lr") if getattr(self, k) is not None]
        return "" if parts == ["s400"] else "mllm-" + "-".join(parts)

    def suffixed(self, name: str, sep: str = "-") -> str:
        return name + (f"{sep}{self.tag}" if self.tag else "")


def train_all(out: str, mllm: MLLMRun, per_source: int = 4, only_mllm: bool = False) -> None:
    common = ["--set", f"train.output_dir={out}/train", "--set", f"train.storage_path={out}/runs",
              "--set", f"train.log_dir={out}/tb", "--set", "run.name=wa", "--set", "train.log_every=100"]
    data = ["--set", f"train.data.datasets=[{out}/round0]", "--set", "train.checkpoint.every_steps=200"]
    if not only_mllm:
        train_round0(out, per_source, common, data)
    sh(CAFE, "train", "mllm", "configs/tiny.yaml", *common, *data, *mllm.args(), "--set",
       f"run.name={mllm.suffixed('wa')}")


def train_round0(out: str, per_source: int, common: list[str], data: list[str]) -> None:
    sh(CAFE, "train", "promptnet", "configs/tiny.yaml", *common, "--set", "train.promptnet.max_steps=500",
       "--set", "train.promptnet.lr=0.0003", "--set", "train.checkpoint.every_steps=250")
    sh(CAFE, "build", "configs/tiny.yaml", "--out", f"{out}/round0", "--set",
       f"models.promptnet.path={ROOT / out / 'train' / 'promptnet'}", "--set", "build.profusion.s1=2.0",
       "--set", "build.profusion.s2=2.0", "--set", f"build.instructions.per_source={per_source}")
    sh(CAFE, "cache", "configs/tiny.yaml", *common, *data)
    sh(CAFE, "train", "diffusion", "configs/tiny.yaml", *common, *data, "--set", "train.diffusion.max_steps=800",
       "--set", "train.diffusion.lr=0.0005")


def write_ideal_dataset(out: str, n: int = 1024, seed: int = 0) -> str:
    """A round-0 dataset with the *ideal* generator: (instance in context A) → (the same instance with the
    instruction applied), rendered from ground truth; only training-split pairs. Diagnostic: what the CAFE models
    learn when round-0 data keep identity and follow the instruction (the world's ProFusion rows rarely do)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from training.data import schema
    from training.world.assistant_eval import REQUEST, RESPONSE, ideal_pairs

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    rows = []
    for inst, phrase, x, y in ideal_pairs(n, seed):
        rows.append({schema.ID: f"ideal{len(rows):05d}", schema.CLASS: inst.cls, schema.INSTRUCTION: phrase,
                     schema.INPUT_IMAGE: png(x), schema.TARGET_IMAGE: png(y),
                     schema.USER_TEXT: REQUEST.format(cls=inst.cls, phrase=phrase),
                     schema.ASSISTANT_TEXT: RESPONSE.format(cls=inst.cls, phrase=phrase)})
    data = ROOT / out / "ideal" / "dataset" / "data"
    data.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), data / "train-000000.parquet")
    return f"{out}/ideal"


def train_ideal(out: str, mllm: MLLMRun, only_mllm: bool = False) -> None:
    dataset = f"{out}/ideal" if only_mllm else write_ideal_dataset(out)
    common = ["--set", f"train.output_dir={out}/ideal-train", "--set", f"train.storage_path={out}/runs",
              "--set", f"train.log_dir={out}/tb", "--set", "train.log_every=100",
              "--set", f"train.data.datasets=[{dataset}]", "--set", "train.checkpoint.every_steps=400"]
    if not only_mllm:
        sh(CAFE, "cache", "configs/tiny.yaml", *common, "--set", "run.name=ideal")
        sh(CAFE, "train", "diffusion", "configs/tiny.yaml", *common, "--set", "run.name=ideal",
           "--set", "train.diffusion.max_steps=1200", "--set", "train.diffusion.lr=0.0005")
    sh(CAFE, "train", "mllm", "configs/tiny.yaml", *common, "--set", f"run.name={mllm.suffixed('ideal')}",
       *mllm.args())


def evaluate(out: str, seeds: list[int], scale_dino: float | None = None, train_dir: str | None = None,
             tag: str = "") -> dict:
    from pipeline.config import load_config
    from pipeline.generate import load_assistant
    from pipeline.train import role_refs
    from training.trainers.base import load
    from training.world.assistant_eval import evaluate_assistant, format_report
    from training.world.oracle import load_oracle

    overrides = [f"train.output_dir={train_dir or out + '/train'}"]
    if scale_dino is not None:
        overrides.append(f"train.generate.scale_dino={scale_dino}")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    t0 = time.time()
    assistant = load_assistant(cfg)
    t2i = load("t2i", role_refs(cfg)["t2i"], "cpu")
    rep = evaluate_assistant(assistant, load_oracle(ROOT / "models" / "world" / "oracle"), t2i.components,
                             ROOT / "models" / "world" / "eval", seeds=seeds, steps=20,
                             guidance=cfg.train.generate.guidance_scale, scale_dino=cfg.train.generate.scale_dino,
                             progress=print)
    rep["seconds"] = round(time.time() - t0, 1)
    name = "assistant_eval" + (f"_{tag}" if tag else "") + ("" if scale_dino is None else f"_dino{scale_dino:g}")
    name += ".json"
    (ROOT / out / name).write_text(json.dumps(rep, indent=2))
    print(format_report(rep))
    print("examples:", rep["examples"][:3])
    return rep


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="outputs/wa")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--scale-dino", type=float, default=None, help="override train.generate.scale_dino")
    ap.add_argument("--per-source", type=int, default=4, help="instructions per source image in the round-0 build")
    ap.add_argument("--ideal", action="store_true",
                    help="diagnostic: train on ground-truth round-0 pairs instead of the ProFusion build")
    ap.add_argument("--mllm-steps", type=int, default=400, help="MLLM training steps")
    ap.add_argument("--mllm-lam", type=float, default=None, help="MLLM λ (SPEC D2); default: the config's")
    ap.add_argument("--mllm-lr", type=float, default=None, help="MLLM learning rate; default: the config's")
    ap.add_argument("--only-mllm", action="store_true", help="reuse the round-0 build (or the ideal data) and the "
                    "trained diffusion model in --out; retrain only the MLLM")
    a = ap.parse_args()
    mllm = MLLMRun(a.mllm_steps, a.mllm_lam, a.mllm_lr)
    if a.ideal:
        if not a.skip_train:
            train_ideal(a.out, mllm, a.only_mllm)
        evaluate(f"{a.out}", a.seeds, a.scale_dino, train_dir=f"{a.out}/ideal-train",
                 tag=mllm.suffixed("ideal", "_"))
    else:
        if not a.skip_train:
            train_all(a.out, mllm, a.per_source, a.only_mllm)
        evaluate(a.out, a.seeds, a.scale_dino, tag=mllm.tag)
