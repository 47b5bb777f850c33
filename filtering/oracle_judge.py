"""The synthetic world's oracle as a judge of built rows: did the target keep the source's identity, and does it
show what the instruction asked for?

Usage::

    judge = OracleJudge("models/world/oracle")
    verdict = judge({"source_png": [...], "target_png": [...], "instruction": ["on the left", ...]})
    verdict["oracle_identity"], verdict["oracle_instruction"], verdict["oracle_reading"]
    # reading: "red-star-whitedot → red-star-none gray left small solid" (source instance → target instance and
    # the target's background, position, size, style)

* **identity kept**: the oracle reads the same class, colour and mark on the source and on the target;
* **instruction followed**: the instruction phrase maps to one (attribute, value) of the world
  (:data:`training.world.domain.PHRASES`, e.g. ``"on the left"`` → position = left) and the oracle reads that
  value on the target. A phrase outside the world's vocabulary gives ``None`` (unknown), never False.

It is an evaluation signal, apart from the rules: the build's keep/drop decision never reads it; the report
compares the two (:func:`training.world.gates.oracle_agreement`). Images of another size are resized to the
world's resolution (bicubic) before reading.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from training.data import schema as S
from training.world import domain as D
from training.world.oracle import load_oracle


def _decode(png: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(png)).convert("RGB")
    if im.size != (D.IMAGE_SIZE, D.IMAGE_SIZE):
        im = im.resize((D.IMAGE_SIZE, D.IMAGE_SIZE), Image.BICUBIC)
    return np.asarray(im)


class OracleJudge:
    def __init__(self, oracle_dir: str):
        self.oracle = load_oracle(oracle_dir)

    def read(self, pngs: Sequence[bytes]) -> dict[str, list[str]]:
        return self.oracle.predict_names(np.stack([_decode(p) for p in pngs]))

    def __call__(self, batch: dict[str, Sequence]) -> dict[str, list]:
        n = len(batch[S.TARGET_PNG])
        if n == 0:
            return {c: [] for c in S.ORACLE_COLUMNS}
        src = self.read(list(batch[S.SOURCE_PNG]))
        tgt = self.read(list(batch[S.TARGET_PNG]))
        identity, followed, reading = [], [], []
        for i, phrase in enumerate(batch[S.INSTRUCTION]):
            identity.append(all(src[a][i] == tgt[a][i] for a in D.IDENTITY_ATTRIBUTES))
            try:
                attr, value = D.phrase_attribute(str(phrase))
                followed.append(tgt[attr][i] == value)
            except KeyError:
                followed.append(None)
            src_id = D.Instance(src["class"][i], src["colour"][i], src["mark"][i]).id
            tgt_id = D.Instance(tgt["class"][i], tgt["colour"][i], tgt["mark"][i]).id
            reading.append(f"{src_id} → {tgt_id} " + " ".join(tgt[a][i] for a in D.CONTEXT_ATTRIBUTES))
        return {S.ORACLE_IDENTITY: identity, S.ORACLE_INSTRUCTION: followed, S.ORACLE_READING: reading}
