"""Column names and the dataset schema — the one place trainers and the build agree on.

A built dataset directory (``cafe build --out OUT``) holds::

    OUT/dataset/      kept rows       (datasets.load_from_disk; images as PNG with the ``Image`` feature)
    OUT/candidates/   every scored row (scores, rule decision, dialogue where made): input of ``cafe refilter``
    OUT/quarantine/   every input or row that failed a stage, with the stage and the reason
    OUT/manifest.json config + hash, model fingerprints, code version, per-stage counts and timings
    OUT/report/       report.md + figures (``cafe report OUT`` regenerates it)
    OUT/_work/        per-chunk stage outputs (resume ledger); safe to delete after success
    OUT/_SUCCESS      written last
"""
from __future__ import annotations

SCHEMA_VERSION = 1

# --- row identity and lineage
ID = "id"
ROUND = "round"
SOURCE_ID = "source_id"
SOURCE_URI = "source_uri"
CLASS = "class_name"
INSTRUCTION = "instruction"  # the phrase, e.g. "on the beach"
FILLED_PROMPT = "filled_prompt"  # "a {class} {phrase}" (filter text and dialogue input)
SEED = "seed"
GENERATOR = "generator"
GENERATOR_PARAMS = "generator_params"  # JSON text

# --- images: PNG bytes in the work files, the datasets ``Image`` feature in the published dataset
SOURCE_PNG = "source_png"
TARGET_PNG = "target_png"
INPUT_IMAGE = "input_image"
TARGET_IMAGE = "target_image"

# --- scores and decisions
CLIP_T = "clip_t"
DINO = "dino"
CLIP_I = "clip_i"
KEEP = "keep"
FILTER_REASON = "filter_reason"

# --- dialogue
USER_TEXT = "user_text"
ASSISTANT_TEXT = "assistant_text"
DIALOGUE_STYLE = "dialogue_style"
DIALOGUE_BACKEND = "dialogue_backend"

# --- quarantine rows
Q_ID = "id"  # row id, or source id for inputs that never became rows
Q_STAGE = "stage"
Q_REASON = "reason"
Q_DETAIL = "detail"
Q_INPUT = "input"  # source URI / path text

STAGES = ("sources", "generate", "score_clip_t", "score_dino", "score_clip_i", "rules", "dialogue")

#: columns of the published dataset, in order (work-file PNG columns are renamed to the Image columns)
DATASET_COLUMNS = (
    ID, ROUND, SOURCE_ID, SOURCE_URI, CLASS, INSTRUCTION, FILLED_PROMPT, INPUT_IMAGE, USER_TEXT, TARGET_IMAGE,
    ASSISTANT_TEXT, DIALOGUE_STYLE, GENERATOR, GENERATOR_PARAMS, SEED, CLIP_T, DINO, CLIP_I,
)
CANDIDATE_COLUMNS = DATASET_COLUMNS + (KEEP, FILTER_REASON)
QUARANTINE_COLUMNS = (Q_ID, Q_STAGE, Q_REASON, Q_DETAIL, Q_INPUT)


def arrow_schema(kind: str):
    """pyarrow schema of the work files: ``pairs`` (rows) or ``quarantine``."""
    import pyarrow as pa

    if kind == "quarantine":
        return pa.schema([(c, pa.string()) for c in QUARANTINE_COLUMNS])
    if kind != "pairs":
        raise ValueError(f"unknown schema kind {kind!r}; allowed: pairs, quarantine")
    return pa.schema([
        (ID, pa.string()), (ROUND, pa.int32()), (SOURCE_ID, pa.string()), (SOURCE_URI, pa.string()),
        (CLASS, pa.string()), (INSTRUCTION, pa.string()), (FILLED_PROMPT, pa.string()), (SEED, pa.int64()),
        (SOURCE_PNG, pa.binary()), (TARGET_PNG, pa.binary()), (GENERATOR, pa.string()),
        (GENERATOR_PARAMS, pa.string()), (CLIP_T, pa.float32()), (DINO, pa.float32()), (CLIP_I, pa.float32()),
        (KEEP, pa.bool_()), (FILTER_REASON, pa.string()), (USER_TEXT, pa.string()), (ASSISTANT_TEXT, pa.string()),
        (DIALOGUE_STYLE, pa.string()),
    ])


def dataset_features(with_decision: bool = False):
    """``datasets.Features`` of the published dataset (``with_decision``: the candidates table)."""
    from datasets import Features, Image, Value

    f = {
        ID: Value("string"), ROUND: Value("int32"), SOURCE_ID: Value("string"), SOURCE_URI: Value("string"),
        CLASS: Value("string"), INSTRUCTION: Value("string"), FILLED_PROMPT: Value("string"),
        INPUT_IMAGE: Image(), USER_TEXT: Value("string"), TARGET_IMAGE: Image(),
        ASSISTANT_TEXT: Value("string"), DIALOGUE_STYLE: Value("string"), GENERATOR: Value("string"),
        GENERATOR_PARAMS: Value("string"), SEED: Value("int64"), CLIP_T: Value("float32"),
        DINO: Value("float32"), CLIP_I: Value("float32"),
    }
    if with_decision:
        f.update({KEEP: Value("bool"), FILTER_REASON: Value("string")})
    return Features(f)
