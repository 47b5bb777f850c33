"""How well the MLLM's head predicts the target's CLIP embedding, against two references, on a round-0 cache.

    python bench/world_mllm_head.py outputs/wa11/round0 [--steps 400 1200] [--lam 1 64] [--lr 0.01]

The CAFE assistant hands the MLLM's predicted CLIP embedding H(h) to the diffusion model; the study in
``bench/world_assistant.py`` found that the assistant follows instructions no better than returning the input.
This script asks whether the prediction itself carries the information. On the rows of a round-0 build's cache
(``cafe cache`` output: ``vision_input``, ``clip_target``, texts), split into train / held-out rows (a seeded 20 %,
at least 24), it reports the held-out MSE of:

* **mean**: always predicting the training rows' mean embedding (knows nothing about the row);
* **linear probe**: ridge regression from [mean-pooled ``vision_input`` of x, one-hot instruction, one-hot class]
  to ``clip_target`` (ridge α chosen on the training rows by leave-one-out, closed form): what a plain linear
  read-out of the same inputs achieves;
* **MLLM**: :class:`training.trainers.mllm.MLLMRecipe` (the ``cafe train mllm`` model: frozen world ``llm``,
  trainable V, H and the query token), trained with AdamW (each ``--lr``, warm-up 5 steps, clip 1.0, micro-batch ``--batch``, 8 by default)
  on the training rows for each of ``--steps``, for each ``--lam`` (SPEC D2's λ; 1 is the default; the embedding
  MSE is a mean over dimensions, so ``λ = clip_dim`` weighs it as a squared distance).

Prints a table and writes ``--json``. Run on a quiet machine: the MLLM trains in seconds per 100 steps on 2 cores.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace as NS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import _benchutil as U  # noqa: E402


def load_cache(round_dir: Path) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    files = sorted(glob.glob(str(round_dir / "cache" / "*" / "data" / "*.parquet")))
    if not files:
        raise SystemExit(f"no cache under {round_dir}/cache: run `cafe cache` on that build first")
    table = pq.read_table(files)
    cols = table.to_pydict()
    for name in ("vision_input", "clip_target"):  # Ray's tensor extension: the shape is in the field metadata
        shape = json.loads(table.schema.field(name).metadata[b"ARROW:extension:metadata"])
        cols[name] = [np.asarray(v, dtype=np.float32).reshape(shape) for v in cols[name]]
    return cols


def split(n: int, seed: int = 0):
    import numpy as np

    perm = np.random.default_rng(seed).permutation(n)
    k = max(24, n // 5)
    return perm[k:], perm[:k]


def linear_probe(cols: dict, train, test) -> dict:
    import numpy as np

    def onehot(values):
        keys = sorted(set(values))
        return np.array([[v == k for k in keys] for v in values], dtype=np.float64)

    X = np.c_[np.array([v.mean(0) for v in cols["vision_input"]], dtype=np.float64),
              onehot(cols["instruction"]), onehot(cols["class_name"]), np.ones(len(cols["id"]))]
    Y = np.array(cols["clip_target"], dtype=np.float64)
    best = None
    for alpha in (0.01, 0.1, 1.0, 10.0, 100.0):
        Xt, Yt = X[train], Y[train]
        H = Xt @ np.linalg.solve(Xt.T @ Xt + alpha * np.eye(X.shape[1]), Xt.T)
        loo = (((Yt - H @ Yt) / (1 - np.diag(H))[:, None]) ** 2).mean()  # leave-one-out error, closed form
        if best is None or loo < best[0]:
            best = (loo, alpha)
    alpha = best[1]
    W = np.linalg.solve(X[train].T @ X[train] + alpha * np.eye(X.shape[1]), X[train].T @ Y[train])
    return {"alpha": alpha, "train_mse": float(((X[train] @ W - Y[train]) ** 2).mean()),
            "test_mse": float(((X[test] @ W - Y[test]) ** 2).mean())}


def train_mllm(cols: dict, train, test, lam: float, lr: float, checkpoints: list[int], batch_size: int = 8,
               seed: int = 0) -> list[dict]:
    import numpy as np
    import torch

    from tests import trainutil as tu
    from training.trainers.mllm import MLLMRecipe

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    rec = MLLMRecipe(NS(lam=lam, select_layer=-2), tu.roles()).setup("cpu", encoders=False)
    module = rec.module
    rec.module_train_mode(module)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    batch = lambda idx: {k: [v[i] for i in idx] for k, v in cols.items()}  # noqa: E731

    def mse(idx) -> tuple[float, float]:
        with torch.no_grad():
            out = module(**rec.prepare(batch(idx), 0, 0))
        return float(out["mse"]), float(out["lm"])

    out, t0 = [], time.perf_counter()
    for step in range(1, max(checkpoints) + 1):
        loss = module(**rec.prepare(batch(rng.choice(train, batch_size, replace=False)), 0, step))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step in checkpoints:
            (tr, _), (te, lm) = mse(train), mse(test)
            out.append({"lam": lam, "lr": lr, "batch": batch_size, "steps": step, "train_mse": tr, "test_mse": te, "test_lm": lm,
                        "seconds": round(time.perf_counter() - t0, 1)})
            print(f"MLLM λ {lam:g} lr {lr:g} batch {batch_size} step {step}: train MSE {tr:.5f}, held-out MSE {te:.5f}, held-out LM "
                  f"{lm:.4f} ({out[-1]['seconds']:.0f} s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("round_dir", help="a round-0 build's output folder with a `cafe cache` (e.g. outputs/wa11/round0)")
    ap.add_argument("--steps", type=int, nargs="+", default=[400, 1200])
    ap.add_argument("--lam", type=float, nargs="+", default=[1.0, 64.0])
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-2])
    ap.add_argument("--batch", type=int, default=8, help="micro-batch rows per step")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(2)
    U.quiet_libraries()
    U.header("world_mllm_head: held-out MSE of the MLLM's predicted CLIP embedding vs the mean and a linear probe")
    cols = load_cache(Path(args.round_dir))
    n = len(cols["id"])
    train, test = split(n)
    Y = np.array(cols["clip_target"], dtype=np.float64)
    mean = Y[train].mean(0)
    ref = {"rows": n, "train_rows": len(train), "test_rows": len(test),
           "mean_test_mse": float(((Y[test] - mean) ** 2).mean()),
           "mean_train_mse": float(((Y[train] - mean) ** 2).mean()), "probe": linear_probe(cols, train, test)}
    print(f"{n} rows ({len(train)} train, {len(test)} held out); clip_target dim {Y.shape[1]}")
    runs = [r for lam in args.lam for lr in args.lr
            for r in train_mllm(cols, train, test, lam, lr, sorted(args.steps), args.batch)]
    rows = [["predict the training mean", f"{ref['mean_train_mse']:.5f}", f"{ref['mean_test_mse']:.5f}", "1.00"],
            [f"linear probe (ridge α {ref['probe']['alpha']:g})", f"{ref['probe']['train_mse']:.5f}",
             f"{ref['probe']['test_mse']:.5f}", f"{ref['probe']['test_mse'] / ref['mean_test_mse']:.2f}"]]
    rows += [[f"MLLM λ {r['lam']:g}, lr {r['lr']:g}, batch {r['batch']}, {r['steps']} steps", f"{r['train_mse']:.5f}", f"{r['test_mse']:.5f}",
              f"{r['test_mse'] / ref['mean_test_mse']:.2f}"] for r in runs]
    print()
    print(U.table(["predictor", "train MSE", "held-out MSE", "held-out / mean"], rows))
    best = min(runs, key=lambda r: r["test_mse"])
    print(f"RESULT  held-out embedding MSE: mean {ref['mean_test_mse']:.5f}, linear probe {ref['probe']['test_mse']:.5f}, "
          f"best MLLM {best['test_mse']:.5f} (λ {best['lam']:g}, lr {best['lr']:g}, {best['steps']} steps)")
    if args.json:
        Path(args.json).write_text(json.dumps({"reference": ref, "mllm": runs}, indent=2))


if __name__ == "__main__":
    main()
