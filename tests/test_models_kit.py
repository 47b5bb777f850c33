"""Model kit: the tiny set round-trips through the real loaders; bad directories fail clearly."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.cli import EXIT_MODEL, EXIT_OK, main
from pipeline.config import ROLE_NAMES
from training.models.kit import ModelLoadError, fingerprint, load_role, smoke_forward

EXPECTED_OUTPUTS = {
    "t2i": {"text_hidden": (1, 77, 32), "eps": (1, 4, 32, 32), "image": (1, 3, 64, 64)},
    "clip_filter": {"image_embed": (1, 32), "text_embed": (1, 32)},
    "dino_filter": {"last_hidden_state": (1, 17, 64)},
    "clip_cond": {"last_hidden_state": (1, 17, 64), "image_embeds": (1, 32)},
    "dino_cond": {"last_hidden_state": (1, 17, 64)},
    "llm": {"logits": (1, 7, 400)},
    "dialogue_llm": {"logits": (1, 7, 400)},
    "promptnet": {"clip_hidden": (1, 17, 48), "s_star": (1, 1, 32)},
}

# role -> (module name in LoadedRole.modules, safetensors file, key prefix in file)
WEIGHT_FILES = {
    "t2i": [("unet", "unet/diffusion_pytorch_model.safetensors"), ("vae", "vae/diffusion_pytorch_model.safetensors")],
    "clip_filter": [("model", "open_clip_model.safetensors")],
    "promptnet": [("promptnet", "promptnet.safetensors")],
}


def test_roles_cover_config():
    assert set(EXPECTED_OUTPUTS) == set(ROLE_NAMES)


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_make_tiny_load_forward(tiny_models, role):
    loaded = load_role(role, tiny_models / role)
    assert smoke_forward(loaded) == EXPECTED_OUTPUTS[role]
    assert loaded.num_parameters > 0 and loaded.dtype == "float32"
    assert len(loaded.fingerprint) == 16


@pytest.mark.parametrize("role", sorted(WEIGHT_FILES))
def test_loaded_weights_equal_saved(tiny_models, role):
    loaded = load_role(role, tiny_models / role)
    for module_name, rel in WEIGHT_FILES[role]:
        saved = load_file(str(tiny_models / role / rel))
        state = loaded.modules[module_name].state_dict()
        assert set(saved) <= set(state)
        for k, v in saved.items():
            assert torch.equal(state[k], v), k


def test_transformers_weights_equal_saved(tiny_models):
    """transformers renames keys on load; compare through its own save_pretrained round trip."""
    loaded = load_role("llm", tiny_models / "llm")
    saved = load_file(str(tiny_models / "llm" / "model.safetensors"))
    emb = loaded.components.model.get_input_embeddings().weight
    assert torch.equal(emb, saved["model.embed_tokens.weight"])
    lm_head = loaded.components.model.lm_head.weight
    assert torch.equal(lm_head, saved["lm_head.weight"])


def test_make_tiny_is_seeded(tmp_path, tiny_models):
    from training.models.tiny import make_tiny

    make_tiny(tmp_path, seed=0)
    for role in ("clip_filter", "dino_filter", "llm"):
        assert fingerprint(tmp_path / role) == fingerprint(tiny_models / role)
    assert fingerprint(tiny_models / "llm") != fingerprint(tiny_models / "dialogue_llm")


def test_tokenizer_words_are_single_tokens(tiny_models):
    tok = load_role("t2i", tiny_models / "t2i").components.tokenizer
    ids = tok("a photo of holder").input_ids
    assert len(ids) == 6 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


# ------------------------------------------------------------------------------- bad directories


@pytest.fixture
def copy_role(tiny_models, tmp_path):
    def make(role):
        dst = tmp_path / role
        shutil.copytree(tiny_models / role, dst)
        return dst
    return make


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model role 'llm' at .*nowhere: directory not found"):
        load_role("llm", tmp_path / "nowhere")


def test_missing_weights_file(copy_role):
    d = copy_role("dino_filter")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_role("dino_filter", d)
    assert info.value.role == "dino_filter" and "missing weights: expected model.safetensors" in str(info.value)


def test_missing_config_file(copy_role):
    d = copy_role("t2i")
    (d / "unet" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"t2i.*unet/config.json: missing file: expected config.json"):
        load_role("t2i", d)


def test_truncated_safetensors(copy_role):
    d = copy_role("clip_cond")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelLoadError) as info:
        load_role("clip_cond", d)
    assert "truncated or corrupt safetensors" in str(info.value) and str(f) in str(info.value)


def test_garbage_safetensors(copy_role):
    d = copy_role("dino_cond")
    (d / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ModelLoadError, match="truncated or corrupt safetensors"):
        load_role("dino_cond", d)


@pytest.mark.parametrize("role, weights", [("clip_filter", "open_clip_model.safetensors"),
                                           ("llm", "model.safetensors")])
def test_pickle_only_checkpoint_refused_before_library(copy_role, role, weights):
    d = copy_role(role)
    state = load_file(str(d / weights))
    (d / weights).unlink()
    marker = d / "opened.txt"

    class Bomb:  # unpickling this would write a file: the kit must never unpickle
        def __reduce__(self):
            return (Path.write_text, (marker, "unpickled"))

    torch.save({"state_dict": state, "bomb": Bomb()}, d / "open_clip_pytorch_model.bin")
    with pytest.raises(ModelLoadError) as info:
        load_role(role, d)
    assert "pickle-only checkpoint refused (open_clip_pytorch_model.bin)" in str(info.value)
    assert not marker.exists()


def test_config_weights_mismatch_transformers(copy_role):
    d = copy_role("dino_filter")
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as info:
        load_role("dino_filter", d)
    assert "dino_filter" in str(info.value) and str(d) in str(info.value)


def test_config_weights_mismatch_open_clip(copy_role):
    d = copy_role("clip_filter")
    state = load_file(str(d / "open_clip_model.safetensors"))
    state["visual.extra_tensor"] = torch.zeros(2)
    save_file(state, str(d / "open_clip_model.safetensors"))
    with pytest.raises(ModelLoadError) as info:
        load_role("clip_filter", d)
    assert "config/weights mismatch" in str(info.value) or "Unexpected key" in str(info.value)


def test_config_weights_mismatch_promptnet(copy_role):
    d = copy_role("promptnet")
    cfg = json.loads((d / "config.json").read_text())
    cfg["proj_channels"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="config/weights mismatch: .*shape mismatch"):
        load_role("promptnet", d)


def test_cli_models_check_prints_table(tiny_models, capsys):
    assert main(["models", "check", str(tiny_models)]) == EXIT_OK
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split()[:5] == ["role", "class", "params", "dtype", "load"]
    assert [ln.split()[0] for ln in lines[2:]] == list(ROLE_NAMES)


def test_cli_models_check_bad_dir_exit_code(tmp_path, capsys):
    assert main(["models", "check", str(tmp_path), "--role", "llm"]) == EXIT_MODEL
    assert "model role 'llm'" in capsys.readouterr().err


def test_convert_authors_promptnet_checkpoint(tiny_models, tmp_path):
    """Our tiny PromptNet renamed into the authors' key layout (+ residual keys) converts back exactly."""
    from training.models.convert_promptnet import AUTHORS_KEY_MAP, convert_authors_checkpoint
    from training.models.promptnet import PromptNet

    ours = load_role("promptnet", tiny_models / "promptnet")
    net = ours.components.promptnet
    cfg = dict(net.config)
    # the converter builds 128-channel projections (the authors'); make a source net of that shape
    src_net = PromptNet(cfg["unet_config"], cfg["clip_vision_width"], cfg["text_width"], proj_channels=128)
    torch.manual_seed(3)
    for p in src_net.parameters():
        torch.nn.init.normal_(p, std=0.02)
    theirs = {}
    for k, v in src_net.state_dict().items():
        for their_prefix, our_prefix in AUTHORS_KEY_MAP:
            if k.startswith(our_prefix):
                theirs[their_prefix + k[len(our_prefix):]] = v
                break
    theirs["residual_projections.0.weight"] = torch.zeros(1)  # unused by the method: must be dropped
    torch.save(theirs, tmp_path / "promptnet.bin")
    out = convert_authors_checkpoint(tmp_path / "promptnet.bin", tiny_models / "t2i",
                                     tiny_models / "promptnet" / "image_encoder", tmp_path / "converted")
    loaded = load_role("promptnet", out)
    for k, v in src_net.state_dict().items():
        assert torch.equal(loaded.components.promptnet.state_dict()[k], v), k
    theirs["surprise.weight"] = torch.zeros(1)
    torch.save(theirs, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="unknown PromptNet keys"):
        convert_authors_checkpoint(tmp_path / "bad.bin", tiny_models / "t2i",
                                   tiny_models / "promptnet" / "image_encoder", tmp_path / "bad")
