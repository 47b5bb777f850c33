"""Turn on every library's offline switch before any of them is imported: no hub is ever contacted.

Imported for its side effect by the model kit and the tiny writer. A user who really wants hub access
can export the variables with other values before starting; the project itself never needs it.
"""
import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DISABLE_TELEMETRY", "1")
