"""Probe: does a world LLM trained on dialogue text let the MLLM carry identity and instruction?

Superseded for the LLM itself: `cafe world make` now trains the world `llm` (stage `llm`, training/world/llm.py), so
step 1 below continues from an already trained model. Steps 2–3 remain the quick assistant check.

    python bench/world_llm_probe.py [--out outputs/wa] [--steps 600]

1. Trains the world's tiny Llama (architecture and tokenizer of models/world/llm) as a causal LM on the
   template dialogues of the world: the user request and the assistant reply for every class × phrase. Plain
   torch, AdamW. The result is written in the `llm` layout to `<out>/llm-trained`; models/world/llm is untouched.
2. `cafe train mllm` on the ideal round-0 dataset (`bench/world_assistant.py --ideal` writes it) with that LLM.
3. Evaluates the assistant with the ideal-data diffusion model, as `bench/world_assistant.py` does.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train_llm(out: Path, steps: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.world import domain as D

    src = ROOT / "models" / "world" / "llm"
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    texts = []
    for cls in D.CLASSES:
        for phrase in D.PHRASES:
            for req in (f"Can you generate an image for this {cls} {phrase}?",
                        f"Generate an image for this {cls} {phrase}."):
                prompt = tok.apply_chat_template([{"role": "user", "content": req}], add_generation_prompt=True,
                                                 tokenize=False)
                texts.append(prompt + f" Here is the {cls} {phrase}." + tok.eos_token)
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(texts), (32,), generator=g)
        loss = model(input_ids=enc.input_ids[idx], attention_mask=enc.attention_mask[idx], labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"llm step {step} loss {loss.item():.4f}", flush=True)
    dest = out / "llm-trained"
    model.save_pretrained(dest, safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja") or f.name == "generation_config.json":
            shutil.copy(f, dest / f.name)
    return dest


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="outputs/wa")
    ap.add_argument("--steps", type=int, default=600)
    a = ap.parse_args()
    out = ROOT / a.out
    llm = train_llm(out, a.steps)
    cafe = str(ROOT / ".venv" / "bin" / "cafe")
    common = ["--set", f"models.llm.path={llm}", "--set", f"train.output_dir={a.out}/probe-train",
              "--set", f"train.storage_path={a.out}/runs", "--set", f"train.log_dir={a.out}/tb",
              "--set", "run.name=probe", "--set", "train.log_every=100",
              "--set", f"train.data.datasets=[{a.out}/ideal]", "--set", "train.checkpoint.every_steps=400"]
    subprocess.run([cafe, "train", "mllm", "configs/tiny.yaml", *common, "--set", "train.mllm.max_steps=400"],
                   check=True, cwd=ROOT)
    probe = out / "probe-train"
    shutil.copytree(out / "ideal-train" / "diffusion", probe / "diffusion", dirs_exist_ok=True)

    from pipeline.config import load_config
    from pipeline.generate import load_assistant
    from pipeline.train import role_refs
    from training.trainers.base import load
    from training.world.assistant_eval import evaluate_assistant, format_report
    from training.world.oracle import load_oracle

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"train.output_dir={probe}", f"models.llm.path={llm}"])
    rep = evaluate_assistant(load_assistant(cfg), load_oracle(ROOT / "models" / "world" / "oracle"),
                             load("t2i", role_refs(cfg)["t2i"], "cpu").components, ROOT / "models" / "world" / "eval",
                             seeds=(0, 1), steps=20, guidance=cfg.train.generate.guidance_scale)
    (out / "assistant_eval_probe.json").write_text(json.dumps(rep, indent=2))
    print(format_report(rep))
    print("examples:", rep["examples"][:3])
