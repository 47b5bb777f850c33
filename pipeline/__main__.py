"""``python -m pipeline …`` is ``cafe …`` (for a shell where the venv's ``bin`` is not on PATH)."""
import sys

from pipeline.cli import main

sys.exit(main())
