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
* **MLLM**: :func:`training.world.assistant_eval.fit_mllm_head`, the ``cafe train mllm`` model (frozen world
  ``llm``, trainable V, H and the query token) trained in-process with AdamW (each ``--lr``, warm-up 5 steps,
  clip 1.0, micro-batch ``--batch``, 8 by default) on the training rows for each of ``--steps``, for each
  ``--lam`` (SPEC D2's λ; 1 is the code default; the embedding MSE is a mean over dimensions, so
  ``λ = clip_dim`` weighs it as a squared distance).

Prints a table and writes ``--json``. Run on a quiet machine: the MLLM trains in seconds per 100 steps on 2 cores.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

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

    from tests import trainutil as tu
    from training.world.assistant_eval import fit_mllm_head

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
    def progress(r: dict) -> None:
        print(f"MLLM λ {r['lam']:g} lr {r['lr']:g} batch {r['batch']} step {r['steps']}: train MSE {r['train_mse']:.5f}, "
              f"held-out MSE {r['test_mse']:.5f}, held-out LM {r['test_lm']:.4f} ({r['seconds']:.0f} s)", flush=True)

    runs = [r for lam in args.lam for lr in args.lr
            for r in fit_mllm_head(cols, train, test, tu.roles(), lam, lr, sorted(args.steps), args.batch,
                                   progress=progress)]
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
