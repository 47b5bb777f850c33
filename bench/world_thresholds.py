"""Pick the build's CLIP-T / DINO thresholds on one half of the sources, report them on the other (world oracle).

    python bench/world_thresholds.py ROUND_DIR [--target-precision 0.9]

ROUND_DIR is a build output on the synthetic world (its ``candidates/`` hold the scores and the oracle's verdicts).
Sources are split in two by a stable hash of their id (``choose``/``report``). On ``choose``, every (clip_t_min,
dino_min) on a grid is scored by the precision of "kept" against the oracle's "both right" (identity kept and
instruction followed); the pair with the highest recall among those with precision ≥ the target is chosen (ties:
the higher thresholds). Its precision, recall and kept count on ``report`` are the honest figures. Nothing is
chosen on ``report``. The same numbers come out of `cafe refilter ROUND_DIR --set build.rules...` on the kept rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.data import schema as S
    from training.data.ids import stable_int

    ap = argparse.ArgumentParser()
    ap.add_argument("round_dir")
    ap.add_argument("--target-precision", type=float, default=0.9)
    args = ap.parse_args()
    files = sorted(Path(args.round_dir, "candidates", "data").glob("*.parquet"))
    t = pa.concat_tables([pq.read_table(f) for f in files]).to_pydict()
    clip_t, dino = np.array(t[S.CLIP_T], float), np.array(t[S.DINO], float)
    good = np.array(t[S.ORACLE_IDENTITY], bool) & np.array(t[S.ORACLE_INSTRUCTION], bool)
    half = np.array([stable_int("threshold-split", s) % 2 for s in t[S.SOURCE_ID]])

    def score(mask, c, d):
        keep = mask & (clip_t >= c) & (dino >= d)
        tp = int((keep & good).sum())
        return {"kept": int(keep.sum()), "precision": tp / keep.sum() if keep.sum() else float("nan"),
                "recall": tp / (mask & good).sum() if (mask & good).sum() else float("nan")}

    best = None
    for c in np.round(np.arange(0.0, 0.61, 0.05), 2):
        for d in np.round(np.arange(0.4, 0.99, 0.02), 2):
            s = score(half == 0, c, d)
            if s["kept"] >= 5 and s["precision"] >= args.target_precision:
                key = (s["recall"], c, d)
                if best is None or key > best[0]:
                    best = (key, c, d, s)
    rules = json.loads(Path(args.round_dir, "manifest.json").read_text())["rules"]
    c0, d0 = rules["clip_t_min"], rules["dino_min"]
    out = {"rows": len(good), "good_rate": float(good.mean()),
           "current": {"clip_t_min": c0, "dino_min": d0, "choose": score(half == 0, c0, d0),
                       "report": score(half == 1, c0, d0)}}
    if best is None:
        out["chosen"] = None
    else:
        _, c, d, s = best
        out["chosen"] = {"clip_t_min": float(c), "dino_min": float(d), "choose": s, "report": score(half == 1, c, d)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
