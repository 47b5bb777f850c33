"""Column names and the dataset schema — the one place the build (``pipeline``) and trainers agree on.

It lives below both layers (``training.data``), so trainers read the build's output without importing
``pipeline``. A built output (``cafe build --out OUT``, a local path or an ``s3://`` URI) holds::

    OUT/dataset/      kept rows: data/train-<chunk>.parquet shards (HF ``Image`` feature) + README.md card;
                      ``datasets.load_dataset(OUT/dataset)``, ``ray.data.read_parquet(OUT/dataset/data)``
    OUT/candidates/   data/<chunk>.parquet: every scored row's ids, scores and decision (no images)
    OUT/quarantine/   data/<chunk>.parquet: every input or row that failed a stage, with the stage and reason
    OUT/manifest.json config + keys, model fingerprints, code version, per-stage counts and timings
    OUT/report/       report.md + figures (``cafe report OUT`` regenerates it)
    OUT/_work/        lease, plan shards, generation parts, score files, commit markers (resume ledger)
    OUT/_SUCCESS      written last
"""
from __future__ import annotations

SCHEMA_VERSION = 2  # 2: lineage columns parent_id, checkpoint (self-distillation rounds)

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
PARENT_ID = "parent_id"  # round r ≥ 1: the round r−1 row id of the same (source, instruction); null in round 0
CHECKPOINT = "checkpoint"  # round r ≥ 1: the id of the trained models that generated the target; null in round 0

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

# --- the synthetic world's oracle verdicts (candidates only; null unless build.scoring.oracle is set)
ORACLE_IDENTITY = "oracle_identity"  # the oracle reads the same class, colour and mark on source and target
ORACLE_INSTRUCTION = "oracle_instruction"  # it reads the attribute value the instruction asks for on the target
ORACLE_READING = "oracle_reading"  # what it read, as text
ORACLE_COLUMNS = (ORACLE_IDENTITY, ORACLE_INSTRUCTION, ORACLE_READING)

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

STAGES = ("sources", "generate", "score", "rules", "dialogue")

# --- in-flight bookkeeping columns (rows travelling between Ray Data stages; never published)
CHUNK = "_chunk"
STATUS = "_status"  # "row" (a live pair), "quarantined", "pending" (transient failure: retried next run)
STATUS_ROW, STATUS_QUARANTINED, STATUS_PENDING = "row", "quarantined", "pending"

#: columns of the published dataset, in order (work-file PNG columns are renamed to the Image columns)
DATASET_COLUMNS = (
    ID, ROUND, SOURCE_ID, SOURCE_URI, CLASS, INSTRUCTION, FILLED_PROMPT, INPUT_IMAGE, USER_TEXT, TARGET_IMAGE,
    ASSISTANT_TEXT, DIALOGUE_STYLE, GENERATOR, GENERATOR_PARAMS, PARENT_ID, CHECKPOINT, SEED, CLIP_T, DINO, CLIP_I,
)
#: what each published column holds (the dataset card's column table)
DESCRIPTIONS = {
    ID: "row id: stable hash of (round, source id, instruction)",
    ROUND: "0 = ProFusion targets; r ≥ 1 = self-distillation round r (CAFE Eq. 4)",
    SOURCE_ID: "stable hash of the source image's location and content",
    SOURCE_URI: "where the source image was read",
    CLASS: "the source's class word (from its folder or the configured mapping)",
    INSTRUCTION: "the instruction phrase applied to the source, e.g. \"on the beach\"",
    FILLED_PROMPT: "\"a {class} {phrase}\": the text CLIP-T scores the target against",
    INPUT_IMAGE: "the source image (the assistant's input)",
    USER_TEXT: "the user's request in the dialogue",
    TARGET_IMAGE: "the generated image (the assistant's target)",
    ASSISTANT_TEXT: "the assistant's answer in the dialogue",
    DIALOGUE_STYLE: "clear, ambiguous or question: how the request is phrased",
    GENERATOR: "what made the target (profusion, self_distill_eq4, self_distill_mix, …)",
    GENERATOR_PARAMS: "the generator's settings, JSON",
    PARENT_ID: "round r ≥ 1: the round r−1 row of the same source and instruction (null in round 0)",
    CHECKPOINT: "round r ≥ 1: the id of the trained models that generated the target (null in round 0)",
    SEED: "the generation seed of this row",
    CLIP_T: "CLIP similarity of the target to the filled prompt (instruction followed)",
    DINO: "DINO similarity of the target to the source (identity kept)",
    CLIP_I: "CLIP image similarity of the target to the source",
}
#: candidates keep ids, lineage, scores and the decision: no second copy of the images
CANDIDATE_COLUMNS = (ID, ROUND, SOURCE_ID, CLASS, INSTRUCTION, FILLED_PROMPT, PARENT_ID, CHECKPOINT, SEED, CLIP_T,
                     DINO, CLIP_I, KEEP,
                     FILTER_REASON, DIALOGUE_STYLE, *ORACLE_COLUMNS)
QUARANTINE_COLUMNS = (Q_ID, Q_STAGE, Q_REASON, Q_DETAIL, Q_INPUT)


def arrow_schema(kind: str):
    """pyarrow schema: ``pairs`` (work rows), ``quarantine``, ``flight`` (pairs + quarantine + bookkeeping,
    the rows travelling between Ray Data stages) or ``candidates``."""
    import pyarrow as pa

    if kind == "quarantine":
        return pa.schema([(c, pa.string()) for c in QUARANTINE_COLUMNS])
    if kind == "flight":
        pairs = arrow_schema("pairs")
        extra = [(CHUNK, pa.string()), (STATUS, pa.string())] + [
            (f"q_{c}", pa.string()) for c in (Q_STAGE, Q_REASON, Q_DETAIL, Q_INPUT)]
        return pa.schema(list(zip(pairs.names, pairs.types)) + extra)
    if kind == "candidates":
        pairs = arrow_schema("pairs")
        return pa.schema([pairs.field(c) for c in CANDIDATE_COLUMNS])
    if kind != "pairs":
        raise ValueError(f"unknown schema kind {kind!r}; allowed: pairs, quarantine, flight, candidates")
    return pa.schema([
        (ID, pa.string()), (ROUND, pa.int32()), (SOURCE_ID, pa.string()), (SOURCE_URI, pa.string()),
        (CLASS, pa.string()), (INSTRUCTION, pa.string()), (FILLED_PROMPT, pa.string()), (SEED, pa.int64()),
        (SOURCE_PNG, pa.binary()), (TARGET_PNG, pa.binary()), (GENERATOR, pa.string()),
        (GENERATOR_PARAMS, pa.string()), (PARENT_ID, pa.string()), (CHECKPOINT, pa.string()), (CLIP_T, pa.float32()), (DINO, pa.float32()), (CLIP_I, pa.float32()),
        (KEEP, pa.bool_()), (FILTER_REASON, pa.string()), (USER_TEXT, pa.string()), (ASSISTANT_TEXT, pa.string()),
        (DIALOGUE_STYLE, pa.string()), (ORACLE_IDENTITY, pa.bool_()), (ORACLE_INSTRUCTION, pa.bool_()),
        (ORACLE_READING, pa.string()),
    ])


def dataset_features(with_decision: bool = False):
    """``datasets.Features`` of the published dataset (``with_decision``: plus keep / filter_reason)."""
    from datasets import Features, Image, Value

    f = {
        ID: Value("string"), ROUND: Value("int32"), SOURCE_ID: Value("string"), SOURCE_URI: Value("string"),
        CLASS: Value("string"), INSTRUCTION: Value("string"), FILLED_PROMPT: Value("string"),
        INPUT_IMAGE: Image(), USER_TEXT: Value("string"), TARGET_IMAGE: Image(),
        ASSISTANT_TEXT: Value("string"), DIALOGUE_STYLE: Value("string"), GENERATOR: Value("string"),
        GENERATOR_PARAMS: Value("string"), PARENT_ID: Value("string"), CHECKPOINT: Value("string"), SEED: Value("int64"), CLIP_T: Value("float32"),
        DINO: Value("float32"), CLIP_I: Value("float32"),
    }
    if with_decision:
        f.update({KEEP: Value("bool"), FILTER_REASON: Value("string")})
    return Features(f)
