"""The import contracts in ``.importlinter`` hold: pipeline -> filtering -> training, Ray only in pipeline, and the
PromptNet model imports none of its loader, tiny writer or converter."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def _lint(cwd: Path, config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([LINT_IMPORTS, "--config", str(config), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_layer_contracts_are_kept():
    result = _lint(REPO, REPO / ".importlinter")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_contracts_catch_an_upward_import_ray_outside_pipeline_and_a_promptnet_cycle(tmp_path):
    """The same contract file fails on a tree where training imports pipeline, filtering imports Ray and the
    PromptNet model imports the model kit."""
    files = {
        "pipeline/__init__.py": "import filtering\n",
        "filtering/__init__.py": "import training\n",
        "filtering/scorer.py": "import ray\n",
        "training/__init__.py": "",
        "training/bad.py": "from pipeline import config\n",
        "pipeline/config.py": "",
        "training/models/__init__.py": "",
        "training/models/kit.py": "from training.models import promptnet\n",
        "training/models/tiny.py": "",
        "training/models/convert_promptnet.py": "",
        "training/models/promptnet.py": "from training.models.kit import _weights\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    result = _lint(tmp_path, REPO / ".importlinter")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "0 kept, 3 broken" in result.stdout
    assert "training.bad -> pipeline.config" in result.stdout and "filtering.scorer -> ray" in result.stdout
    assert "training.models.promptnet -> training.models.kit" in result.stdout
