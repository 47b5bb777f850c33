"""ProFusion precision (SPEC §4.5, issue 7): half-precision roles, float32 trained parameters under autocast.

The roles are loaded in float16 as configs/paper.yaml loads them. Fine-tuning must hold and update the trained
parameters (PromptNet + UNet attn1/attn2 to_q/to_k/to_v) in float32 while the frozen parts keep their storage
dtype under ``torch.autocast``; afterwards sampling runs in the storage dtype and ``restore()`` is bit-exact.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.build_config import ProFusionConfig
from training.methods.profusion import ProFusionGenerator


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models are latency-bound; one thread avoids spinning against other processes on shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _load(tiny_models, dtype: str, device: str = "cpu"):
    from training.models.kit import load_role

    return (load_role("t2i", tiny_models / "t2i", dtype=dtype, device=device).components,
            load_role("promptnet", tiny_models / "promptnet", dtype=dtype, device=device).components)


@pytest.fixture(scope="module")
def half(tiny_models):
    return _load(tiny_models, "float16")


def _cfg(**kw) -> ProFusionConfig:
    base = dict(num_inference_steps=1, s1=3.0, s2=2.0, refine_step=1, gamma=0.6, w_r=3.0, refine_eta=1.0,
                finetune=True, finetune_steps=2, finetune_batch_size=1, finetune_lr=1e-3,
                finetune_weight_decay=1e-2, finetune_prompt="a photo of holder", num_augmentations=1,
                augmentation="generic")
    base.update(kw)
    return ProFusionConfig(**base)


def _source(seed: int, side: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(side, side, 3), dtype=np.uint8)


def _snapshot(gen: ProFusionGenerator) -> dict[str, torch.Tensor]:
    """Every weight of every role module, cloned (dtype kept)."""
    modules = {"unet": gen.unet, "text": gen.text_encoder, "vae": gen.vae, "pn": gen.promptnet,
               "clip": gen.image_encoder}
    return {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_bit_identical(gen: ProFusionGenerator, before: dict[str, torch.Tensor]) -> None:
    after = _snapshot(gen)
    assert after.keys() == before.keys()
    for n, p in after.items():
        assert p.dtype == before[n].dtype, n
        assert torch.equal(_bits(p), _bits(before[n])), n  # bit for bit (NaN-safe, −0 ≠ +0)


def _watch_unet(gen: ProFusionGenerator, q: torch.nn.Parameter, device: str = "cpu"):
    seen = []

    def hook(module, args, kwargs):
        seen.append({"autocast": torch.is_autocast_enabled(device), "autocast_dtype": torch.get_autocast_dtype(device),
                     "trained": q.dtype, "frozen": module.conv_in.weight.dtype,
                     "context": tuple(kwargs["encoder_hidden_states"].shape)})

    return seen, gen.unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("precision,autocast_dtype", [("auto", torch.float16), ("fp32", None)])
def test_fp16_roles_finetune_in_fp32_then_sample_and_restore_exactly(half, precision, autocast_dtype):
    """Before the fix AdamW stepped the float16 weights directly: every trained weight was NaN after one step."""
    kw = {} if precision == "auto" else {"finetune_precision": precision}  # auto: the default config
    gen = ProFusionGenerator(*half, _cfg(**kw))
    trained = gen.trainable_parameters()
    assert {p.dtype for p in trained.values()} == {torch.float16}
    before, base = _snapshot(gen), {n: p.detach().clone() for n, p in trained.items()}
    q = next(p for n, p in trained.items() if ".attn1.to_q." in n)
    seen, handle = _watch_unet(gen, q)
    try:
        with gen.finetuned(_source(4), seed=7) as losses:
            training, seen[:] = list(seen), []
            assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
            for n, p in trained.items():
                assert p.dtype == torch.float16, n  # back in the storage dtype for sampling
                assert bool(torch.isfinite(p).all()), n
            changed = [n for n, p in trained.items() if not torch.equal(p, base[n])]
            assert len(changed) == len(trained)
            images = gen.sample([_source(4)], ["a holder on the beach"], ["a person on the beach"],
                                [1])  # raises on non-finite latents or pixels
            sampling = list(seen)
    finally:
        handle.remove()
    # training: trained weights float32; frozen weights float16 under autocast, or up-cast for fp32 compute
    assert len(training) == 2
    for s in training:
        assert s["trained"] == torch.float32
        if autocast_dtype is None:
            assert s["autocast"] is False and s["frozen"] == torch.float32
        else:
            assert s["autocast"] is True and s["autocast_dtype"] == autocast_dtype and s["frozen"] == torch.float16
    # sampling: the role's dtype, no autocast
    assert sampling and all(s["trained"] == s["frozen"] == torch.float16 and not s["autocast"] for s in sampling)
    assert len(images) == 1
    for img in images:
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 0
    _assert_bit_identical(gen, before)  # restore() put every base weight back, in float16


def test_fp16_roles_restore_exactly_after_a_failure(half):
    gen = ProFusionGenerator(*half, _cfg(finetune_precision="fp32"))
    before = _snapshot(gen)
    boom = RuntimeError("boom")

    def fail(module, args, kwargs):  # the second UNet call, mid-training: weights are float32 then
        if fail.calls == 1:
            raise boom
        fail.calls += 1

    fail.calls = 0
    handle = gen.unet.register_forward_pre_hook(fail, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with gen.finetuned(_source(4), seed=7):
                pass
    finally:
        handle.remove()
    _assert_bit_identical(gen, before)
    assert not any(p.requires_grad for p in gen.trainable_parameters().values())


def test_finetune_precision_resolution(half, tiny_models):
    """``auto`` follows the t2i UNet's storage dtype; an explicit mode is taken as given (float32 roles)."""
    expected_half = {"auto": torch.float16, "fp16": torch.float16, "fp32": None}
    for precision, dtype in expected_half.items():
        assert ProFusionGenerator(*half, _cfg(finetune_precision=precision)).finetune_autocast_dtype() == dtype
    full = _load(tiny_models, "float32")
    expected_full = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
    for precision, dtype in expected_full.items():
        assert ProFusionGenerator(*full, _cfg(finetune_precision=precision)).finetune_autocast_dtype() == dtype


def test_bf16_autocast_over_fp16_roles_is_refused_on_cpu(half):
    """CPU autocast leaves LayerNorm/GroupNorm to the storage dtype, which refuses bf16 inputs with float16 weights."""
    gen = ProFusionGenerator(*half, _cfg(finetune_precision="bf16"))
    before = _snapshot(gen)
    with pytest.raises(ValueError, match="finetune_precision='bf16'.*float16"):
        gen.finetune(_source(4), seed=1)
    _assert_bit_identical(gen, before)


def test_finetune_precision_is_validated():
    with pytest.raises(ValueError):
        ProFusionConfig(finetune_precision="fp8")
    assert ProFusionConfig().finetune_precision == "auto"


def test_paper_generation_settings_in_fp16_on_cpu(half):
    """configs/paper.yaml's fusion sampling (s₁ 7, s₂ 5, w_r 7, γ 0.6, η_r 1) on the float16 tiny set gives finite
    images on CPU (float16 convolutions run, slowly, on the CPU reference kernels: 2 steps here; the 50-step run
    is the gpu test below). Its fine-tuning settings run too, shortened."""
    from pipeline.config import load_config

    paper = load_config("configs/paper.yaml").build.profusion
    assert paper.finetune and paper.finetune_precision == "fp16"
    cfg = paper.model_copy(update={"num_inference_steps": 2, "finetune_steps": 1, "finetune_batch_size": 1,
                                   "num_augmentations": 1})
    gen = ProFusionGenerator(*half, cfg)
    decoded = []
    handle = gen.vae.decoder.register_forward_hook(lambda m, a, out: decoded.append(out.detach().clone()))
    try:
        with gen.finetuned(_source(8), seed=2) as losses:
            assert all(math.isfinite(x) for x in losses)
            images = gen.sample([_source(8)], ["a holder in the snow"], ["a person in the snow"], [3])
    finally:
        handle.remove()
    assert decoded[-1].dtype == torch.float16 and bool(torch.isfinite(decoded[-1]).all())
    assert images[0].shape == (64, 64, 3) and images[0].std() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("precision,autocast_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_paper_config_fp16_roles_on_cuda(tiny_models, precision, autocast_dtype):
    """The full paper.yaml ProFusion block (100 fine-tuning steps of batch 4 on 1 + 31 augmentations, 50 fusion
    steps) on the float16 tiny set on CUDA: autocast (fp16 with a GradScaler, as paper.yaml; bf16 too: CUDA
    autocast runs the norms in float32), float32 trained weights, finite images, exact restore."""
    from pipeline.config import load_config

    cfg = load_config("configs/paper.yaml").build.profusion.model_copy(update={"finetune_precision": precision})
    gen = ProFusionGenerator(*_load(tiny_models, "float16", "cuda"), cfg, device="cuda")
    before = _snapshot(gen)
    q = next(p for n, p in gen.trainable_parameters().items() if ".attn2.to_k." in n)
    seen, handle = _watch_unet(gen, q, device="cuda")
    try:
        with gen.finetuned(_source(9), seed=5) as losses:
            training, seen[:] = list(seen), []
            assert len(losses) == 100 and all(math.isfinite(x) for x in losses)
            for p in gen.trainable_parameters().values():
                assert p.dtype == torch.float16 and bool(torch.isfinite(p).all())
            images = gen.sample([_source(9)] * 4, ["a holder in the snow", "a holder on the beach",
                                                   "a holder wearing a red hat", "a holder in comic book style"],
                                ["a person"] * 4, [1, 2, 3, 4])
            sampling = list(seen)
    finally:
        handle.remove()
    width = gen.text_encoder.config.hidden_size
    assert len(training) == 100
    assert all(s["autocast"] and s["autocast_dtype"] == autocast_dtype and s["trained"] == torch.float32
               and s["frozen"] == torch.float16 and s["context"] == (4, 6, width) for s in training)
    assert all(not s["autocast"] and s["trained"] == torch.float16 and s["context"][1] == 77 for s in sampling)
    assert len(images) == 4 and all(img.shape == (64, 64, 3) and img.std() > 0 for img in images)
    _assert_bit_identical(gen, before)
