"""``cafe refilter``: re-apply the rules to a built dataset's stored scores — nothing is recomputed.

Usage::

    result = refilter("outputs/tiny", ["build.rules.clip_t_min=0.25"], out_dir="outputs/tiny-ct025")

Reads ``DATASET/candidates`` (every scored row with its scores and dialogue), applies ``build.rules`` from the
source build's config plus the overrides, and writes a new build directory (dataset, candidates with the new
decisions, quarantine copied, manifest, report). Quantile thresholds are computed over all candidates.

Dialogue is written only for rows that passed the rules at build time, so a *looser* rule can admit rows
that have no dialogue: they are counted as ``pending_dialogue`` in the funnel and left out of the dataset
(re-run ``cafe build`` with the looser rules into a new directory to complete them).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import schema as S
from pipeline.config import load_config_dict
from pipeline.store import atomic_write_bytes, atomic_write_json, content_hash


@dataclass
class RefilterResult:
    out_dir: Path
    manifest: dict

    def summary(self) -> str:
        from pipeline.report import funnel_text

        c = self.manifest["counts"]
        return (f"{funnel_text(self.manifest)}\nkept {c['kept']} of {c['candidates']} candidates "
                f"({c['pending_dialogue']} pass the rules but have no dialogue)\n"
                f"dataset: {self.out_dir / 'dataset'}")


def refilter(dataset_dir: str | Path, overrides: list[str] | None, out_dir: str | Path) -> RefilterResult:
    """Apply (overridden) rules to stored scores of ``dataset_dir``; write the result to ``out_dir``."""
    import datasets

    from filtering.rules import apply_rules, count_reasons
    from pipeline.store import save_dataset

    src, out = Path(dataset_dir), Path(out_dir)
    if src.resolve() == out.resolve():
        raise ValueError("refilter: --out must differ from the dataset directory")
    manifest_path = src / "manifest.json"
    if not manifest_path.is_file() or not (src / "candidates").is_dir():
        raise FileNotFoundError(f"{src}: not a build output (needs manifest.json and candidates/)")
    old = json.loads(manifest_path.read_text())
    cfg = load_config_dict(old["config"], f"{manifest_path}#config", overrides)  # validated before any work
    rules = cfg.build.rules

    candidates = datasets.load_from_disk(str(src / "candidates"))
    table = candidates.data.table
    scores = {c: np.asarray(table[c].to_numpy(zero_copy_only=False), dtype=np.float32) for c in (S.CLIP_T, S.DINO)}
    decision = apply_rules(scores, rules)
    has_dialogue = np.asarray(table[S.USER_TEXT].is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    keep = decision.keep & has_dialogue
    pending = int(np.count_nonzero(decision.keep & ~has_dialogue))

    import pyarrow as pa

    new_table = table.set_column(table.schema.get_field_index(S.KEEP), S.KEEP, pa.array(decision.keep))
    new_table = new_table.set_column(new_table.schema.get_field_index(S.FILTER_REASON), S.FILTER_REASON,
                                     pa.array(list(decision.reason), pa.string()))
    new_candidates = datasets.Dataset(new_table, info=candidates.info)
    kept = new_candidates.select(np.flatnonzero(keep)).select_columns(list(S.DATASET_COLUMNS))
    kept = kept.flatten_indices()
    out.mkdir(parents=True, exist_ok=True)
    save_dataset(kept, out / "dataset")
    save_dataset(new_candidates, out / "candidates")
    if (src / "quarantine").is_dir():
        if (out / "quarantine").exists():
            shutil.rmtree(out / "quarantine")
        shutil.copytree(src / "quarantine", out / "quarantine")
    n = len(table)
    reasons = {k: v for k, v in count_reasons(decision).items() if k != "kept" and v}
    n_pass = int(np.count_nonzero(decision.keep))
    funnel = [{"stage": "rules", "unit": "rows", "in": n, "out": n_pass, "removed": reasons},
              {"stage": "dialogue", "unit": "rows", "in": n_pass, "out": n_pass - pending,
               "removed": {"pending_dialogue": pending} if pending else {}}]
    manifest = {
        **{k: old[k] for k in ("schema_version", "model_fingerprints", "code_version") if k in old},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "refiltered_from": str(src),
        "source_dataset_hash": old.get("dataset_hash"),
        "config": cfg.model_dump(mode="json"),
        "config_hash": old.get("config_hash"),
        "overrides": list(overrides or []),
        "funnel": funnel,
        "rules": {"mode": rules.mode, "clip_t_min": rules.clip_t_min, "dino_min": rules.dino_min,
                  "clip_t_quantile": rules.clip_t_quantile, "dino_quantile": rules.dino_quantile,
                  "thresholds": {"clip_t": decision.thresholds["clip_t_min"],
                                 "dino": decision.thresholds["dino_min"]}},
        "counts": {"kept": len(kept), "candidates": n, "pending_dialogue": pending,
                   "quarantined": old.get("counts", {}).get("quarantined", 0)},
        "dataset_hash": content_hash(kept.data.table),
        "timings_s": {},
    }
    atomic_write_json(out / "manifest.json", manifest)
    from pipeline.report import write_report

    write_report(out)
    atomic_write_bytes(out / "_SUCCESS", b"")
    return RefilterResult(out, manifest)
