"""Compatibility alias: the schema lives in :mod:`training.data.schema` (below both pipeline and training)."""
from training.data.schema import *  # noqa: F401,F403
from training.data.schema import SCHEMA_VERSION, arrow_schema, dataset_features  # noqa: F401
