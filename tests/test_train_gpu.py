"""One bf16 DeepSpeed step of each CAFE model on a GPU (skipped without CUDA): finite losses, bf16 module,
float32 master weights."""
import pytest

pytestmark = pytest.mark.gpu


def test_one_bf16_step_of_each_model():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gpu_train_step", Path(__file__).parents[1] / "bench" / "gpu_train_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.run(steps=2)
    for model in ("diffusion", "mllm", "promptnet"):
        assert res[model]["finite"], res[model]
        assert res[model]["module_dtype"] == "bfloat16"
        assert res[model]["master_dtype"] in (None, "float32")
