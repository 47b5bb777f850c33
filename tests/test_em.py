"""EM concept masks (SPEC §4.4): capture processor, mask extraction, K-label DenseCRF, losses, the schedule.

Runs on the synthetic world's t2i (trained, loaded through the kit) with world scenes and their exact masks.
The CRF is compared with direct pydensecrf calls written here (and with CutLER's binary form for K = 1); maps
and losses with independent softmax / numpy computations.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.attention.em import AttentionStore, CaptureAttnProcessor, capturing
from training.attention.ico import cross_attention_names
from training.methods.em import (EmConcept, EmParams, attention_loss, concept_masks, crf_labels, label_probabilities,
                                 masked_diffusion_loss, masks_from_maps, sample, token_columns, train_em)
from training.methods.ico import inference_prompt_ids
from training.world import domain as D

ROOT = Path(__file__).resolve().parents[1]
WORLD_T2I = ROOT / "models" / "world" / "t2i"
SCENES = ROOT / "models" / "world" / "scenes"
# small schedules: the world's maps are 8×8
FAST = dict(attn_res=8, mask_timesteps=4, init="word", init_steps=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world():
    if not (WORLD_T2I / "unet").is_dir():
        pytest.skip("models/world/t2i is not built")
    from training.models.kit import load_role

    return load_role("t2i", WORLD_T2I, dtype="float32", device="cpu").components


@pytest.fixture(scope="module")
def scene():
    """World scene 001 (a heart and a triangle) with its exact per-object masks."""
    sc = D.Scene("striped", (D.SceneObject(D.instance_from_id("cyan-heart-whitedot"), "left", "small", "solid"),
                             D.SceneObject(D.instance_from_id("green-triangle-blackdot"), "center", "small", "solid")))
    image, masks = D.render(sc, 1)
    return image, masks


def _cutler_densecrf(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """CutLER's ``densecrf`` (binary), written out as in its repository, with SPEC §4.4's parameters."""
    import pydensecrf.densecrf as dcrf
    import pydensecrf.utils as utils

    h, w = mask.shape
    fg = mask.reshape(1, h, w).astype(float)
    logits = torch.from_numpy(np.concatenate((1 - fg, fg), axis=0))
    H, W = image.shape[:2]
    logits = F.interpolate(logits.unsqueeze(0), size=(H, W), mode="bilinear").squeeze()
    probs = F.softmax(logits, dim=0).cpu().numpy()
    c = probs.shape[0]
    d = dcrf.DenseCRF2D(W, H, c)
    d.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=3, compat=7)
    d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(image), compat=10)
    q = d.inference(10)
    return np.argmax(np.array(q), axis=0).reshape((H, W)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ CRF


def test_crf_k_labels_equal_a_direct_pydensecrf_call(scene):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    image, masks = scene
    rng = np.random.default_rng(0)
    maps = (rng.random((2, 8, 8)) > 0.6).astype(np.float32)  # two overlapping binary token maps
    params = EmParams()
    ours = crf_labels(image, label_probabilities(maps, image.shape[:2]), params)
    # independent: stack [1 - max, maps], upsample, softmax, CRF by hand
    fg = torch.from_numpy(maps)
    stack = torch.cat([1 - fg.max(0, keepdim=True).values, fg])[None]
    probs = torch.softmax(F.interpolate(stack, size=(32, 32), mode="bilinear", align_corners=False)[0], 0).numpy()
    d = dcrf.DenseCRF2D(32, 32, 3)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=3.0, compat=7.0)
    d.addPairwiseBilateral(sxy=50.0, srgb=5.0, rgbim=np.ascontiguousarray(image), compat=10.0)
    direct = np.argmax(np.array(d.inference(10)), axis=0).reshape(32, 32)
    assert np.array_equal(ours, direct)
    assert set(np.unique(ours)) <= {0, 1, 2}


def test_crf_reference_size_scales_the_spatial_widths(scene):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    image, masks = scene
    maps = np.zeros((2, 8, 8), np.float32)
    maps[0, 2:6, 0:4], maps[1, 2:6, 3:7] = 1.0, 1.0
    probs = label_probabilities(maps, (32, 32))
    ours = crf_labels(image, probs, EmParams(crf_reference_size=512))
    d = dcrf.DenseCRF2D(32, 32, 3)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=3.0 * 32 / 512, compat=7.0)
    d.addPairwiseBilateral(sxy=50.0 * 32 / 512, srgb=5.0, rgbim=np.ascontiguousarray(image), compat=10.0)
    assert np.array_equal(ours, np.argmax(np.array(d.inference(10)), axis=0).reshape(32, 32))
    with pytest.raises(ValueError, match="crf_reference_size"):
        EmParams(crf_reference_size=0)


def test_crf_with_one_token_is_cutlers_binary_form(scene):
    image, masks = scene
    coarse = F.avg_pool2d(torch.from_numpy(masks[0].astype(np.float32))[None, None], 4)[0, 0].numpy() >= 0.25
    ours = crf_labels(image, label_probabilities(coarse[None].astype(np.float32), (32, 32)), EmParams())
    assert np.array_equal(ours.astype(np.float32), _cutler_densecrf(image, coarse.astype(np.float32)))
    # and it refines: the CRF mask of the heart is closer to the truth than the blocky 8×8 mask upsampled
    blocky = np.kron(coarse, np.ones((4, 4), bool))
    iou = lambda a, b: (a & b).sum() / (a | b).sum()  # noqa: E731
    assert iou(ours == 1, masks[0]) > iou(blocky, masks[0])


def test_masks_without_crf_are_the_argmax_of_the_unary(scene):
    image, _ = scene
    maps = np.zeros((2, 8, 8), np.float32)
    maps[0, 2:6, 0:3] = 1.0
    maps[1, 2:6, 4:7] = 0.7
    labels, masks = masks_from_maps(image, maps, EmParams(crf=False))
    probs = label_probabilities((maps >= 0.5).astype(np.float32), (32, 32))
    assert np.array_equal(labels, probs.argmax(0))
    assert masks.shape == (2, 32, 32) and not (masks[0] & masks[1]).any()
    assert masks[0][12, 4] and masks[1][12, 22] and not masks.any(axis=0)[0, 0]


# ------------------------------------------------------------------------------------------------ maps


def test_capture_records_each_layers_head_mean_probabilities(world):
    unet, te, tok = world.unet, world.text_encoder, world.tokenizer
    lay = inference_prompt_ids(tok, "a photo of a red star on the left")
    ctx = te(lay.ids[None])[0]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    before = {n: type(p) for n, p in unet.attn_processors.items()}
    store = AttentionStore()
    with torch.no_grad(), capturing(unet, store):
        out_c = unet(z, t, encoder_hidden_states=ctx.expand(2, -1, -1)).sample
    out_plain = unet(z, t, encoder_hidden_states=ctx.expand(2, -1, -1)).sample.detach()
    assert {n: type(p) for n, p in unet.attn_processors.items()} == before  # capture off: the UNet's own processors
    torch.testing.assert_close(out_c, out_plain, rtol=1e-4, atol=1e-5)  # capture does not change the output
    assert set(store.maps) == set(cross_attention_names(unet))
    # independent: one layer's softmax(QK^T / sqrt(d)) averaged over heads, from hooks on to_q / to_k
    name = cross_attention_names(unet)[0]
    attn = unet.get_submodule(name[: -len(".processor")])
    seen = {}
    hq = attn.to_q.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o))
    hk = attn.to_k.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o))
    with torch.no_grad():
        unet(z, t, encoder_hidden_states=ctx.expand(2, -1, -1))
    hq.remove(), hk.remove()
    b, n, inner = seen["q"].shape
    h = attn.heads
    q = seen["q"].view(b, n, h, inner // h).transpose(1, 2)
    k = seen["k"].view(b, -1, h, inner // h).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / (inner // h) ** 0.5, dim=-1).mean(1)
    torch.testing.assert_close(store.maps[name], probs, rtol=1e-4, atol=1e-6)


def test_aggregate_shapes_layer_choice_and_errors(world):
    unet, te, tok = world.unet, world.text_encoder, world.tokenizer
    lay = inference_prompt_ids(tok, "a photo of [v1] and a star", ["[v1]"])
    store = AttentionStore()
    with torch.no_grad(), capturing(unet, store):
        unet(torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900]), encoder_hidden_states=te(lay.ids[None])[0].expand(3, -1, -1))
    sides = store.sides()
    assert sorted(set(sides.values())) == [2, 4, 8]
    for layers, res in (("all", 8), ("all", 16), (8, 8), (4, 8), (2, 4)):
        agg = store.aggregate(res, layers)
        assert agg.shape == (3, res, res, lay.ids.numel())
        # every layer's maps sum to 1 over the tokens; resizing and averaging keep that
        torch.testing.assert_close(agg.sum(-1), torch.ones(3, res, res), rtol=1e-4, atol=1e-4)
    # layers=8 at res 8 is exactly the mean of the 8×8 layers, no resizing
    eight = [store.maps[n] for n, s in sides.items() if s == 8]
    torch.testing.assert_close(store.aggregate(8, 8), torch.stack(eight).mean(0).view(3, 8, 8, -1))
    with pytest.raises(ValueError, match="no cross-attention layer at 16×16"):
        store.aggregate(16, 16)
    with pytest.raises(RuntimeError, match="captured twice"):
        store.put(next(iter(store.maps)), torch.zeros(1))
    cols = token_columns(lay, ["[v1]", "[v2]"], [0])
    assert lay.ids[cols[0]].item() == 0 and cols == [4]
    with pytest.raises(ValueError, match=r"\[v2\].*does not occur"):
        token_columns(lay, ["[v1]", "[v2]"], [0, 1])


# ------------------------------------------------------------------------------------------------ losses


def test_masked_diffusion_loss_equals_plain_with_ones_and_numpy_otherwise():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ones = torch.ones(2, 1, 8, 8)
    assert torch.equal(masked_diffusion_loss(pred, target, ones), F.mse_loss(pred, target))
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    p, t, m = pred.numpy(), target.numpy(), mask.numpy()
    expected = np.mean(((p - t) * m) ** 2)
    assert masked_diffusion_loss(pred, target, mask).item() == pytest.approx(float(expected), rel=1e-6)


def test_attention_loss_zero_at_the_mask_and_equal_to_numpy():
    g = torch.Generator().manual_seed(1)
    masks = [(torch.rand(8, 8, generator=g) > 0.5).float() for _ in range(3)]
    masks[0][0, 0] = 1.0
    scaled = [m * 0.37 + 0.0 for m in masks]  # attention proportional to the mask: normalised it is the mask
    assert attention_loss(scaled, masks, batch=2).item() == pytest.approx(0.0, abs=1e-12)
    maps = [torch.rand(8, 8, generator=g) for _ in range(3)]
    expected = sum(np.mean((a.numpy() / a.numpy().max() - m.numpy()) ** 2) for a, m in zip(maps, masks)) / 2
    assert attention_loss(maps, masks, batch=2).item() == pytest.approx(float(expected), rel=1e-6)


# ------------------------------------------------------------------------------------------------ the schedule


def test_schedule_reestimates_every_n_in_stage_2_never_in_stage_3_and_trains_only_what_it_should(world, scene):
    image, masks = scene
    unet_before = {k: v.clone() for k, v in world.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in world.text_encoder.state_dict().items()}
    params = EmParams(tokens=("[v1]", "[v2]"), init_words=("heart", "triangle"), steps_tokens=6, reestimate_every=3,
                      steps_joint=2, unet_params="cross_attention", **FAST)
    concept = train_em(world, [image], params, seed=0, gt_masks={"[v1]": masks[0], "[v2]": masks[1]})
    assert [(h["stage"], h["step"]) for h in concept.history] == [(1, 0), (2, 3), (2, 6)]
    assert len(concept.losses) == 8
    assert all(set(h["iou"]) == {"[v1]", "[v2]"} and 0 <= min(h["iou"].values()) for h in concept.history)
    # the base model is untouched, bit for bit
    assert all(torch.equal(v, unet_before[k]) for k, v in world.unet.state_dict().items())
    assert all(torch.equal(v, te_before[k]) for k, v in world.text_encoder.state_dict().items())
    # stage 3 trained exactly the attn2 parameters (and moved them); the tokens moved from their words
    assert concept.unet_delta and all(".attn2." in n for n in concept.unet_delta)
    attn2 = {n for n, _ in world.unet.named_parameters() if ".attn2." in n}
    assert set(concept.unet_delta) == attn2
    assert any(float(d.abs().max()) > 0 for d in concept.unet_delta.values())
    word_rows = world.text_encoder.get_input_embeddings().weight[
        [world.tokenizer("heart", add_special_tokens=False).input_ids[0],
         world.tokenizer("triangle", add_special_tokens=False).input_ids[0]]]
    assert not torch.equal(concept.embeddings, word_rows.float())
    # no stage 3: no UNet delta at all; stage 2 alone changes only the tokens
    only2 = train_em(world, [image], EmParams(tokens=("[v1]", "[v2]"), init_words=("heart", "triangle"), steps_tokens=2,
                                              reestimate_every=5, steps_joint=0, **FAST), seed=0)
    assert only2.unet_delta == {} and [(h["stage"], h["step"]) for h in only2.history] == [(1, 0)]


def _denoise_loss(world, rows, image, tokens, seed=5, n=16):
    """The plain denoising loss of ``rows`` on fixed (t, noise) draws (an independent evaluation)."""
    from training.methods.ico import encode_spliced, preprocess_images

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z0 = world.vae.encode(preprocess_images([image], 32) * 2 - 1).latent_dist.mean * world.vae.config.scaling_factor
        z0 = z0.expand(n, -1, -1, -1)
        noise, t = torch.randn(z0.shape, generator=g), torch.randint(0, 1000, (n,), generator=g)
        lay = inference_prompt_ids(world.tokenizer, "a photo of " + " and ".join(tokens), tokens)
        ids = lay.ids[None].expand(n, -1)
        rr = torch.arange(n).repeat_interleave(len(lay.new))
        cc = torch.tensor(list(lay.new) * n)
        ctx = encode_spliced(world.text_encoder, ids, rr, cc, rows[list(lay.new_index) * n])
        pred = world.unet(world.scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=ctx).sample
        return F.mse_loss(pred, world.scheduler.get_velocity(z0, noise, t)).item()


def test_a_tiny_em_job_lowers_its_loss_and_round_trips(world, scene, tmp_path):
    image, masks = scene
    base = dict(tokens=("[v1]", "[v2]"), init="random", init_steps=0, attn_res=8, mask_timesteps=4, steps_joint=0,
                reestimate_every=10, lr_tokens=5e-3, attn_weight=0.0, flip_p=0.0, batch_size=4)
    start = train_em(world, [image], EmParams(steps_tokens=0, **base), seed=3)
    trained = train_em(world, [image], EmParams(steps_tokens=40, **base), seed=3)
    assert torch.equal(start.embeddings, train_em(world, [image], EmParams(steps_tokens=0, **base), seed=3).embeddings)
    before = _denoise_loss(world, start.embeddings, image, ["[v1]", "[v2]"])
    after = _denoise_loss(world, trained.embeddings, image, ["[v1]", "[v2]"])
    assert after < 0.9 * before, (before, after)
    # artifacts: tokens, masks for every token, the figure, history; load equals what was saved
    with_unet = train_em(world, [image], EmParams(**{**base, "steps_tokens": 2, "steps_joint": 1, "unet_params": "attention"}),
                         seed=3, gt_masks={"[v1]": masks[0]})
    files = with_unet.save(tmp_path)
    assert {Path(f).name for f in files} >= {"em.safetensors", "em_unet_delta.safetensors", "em.json", "00.png",
                                             "01.png", "mask_history.png"}
    loaded = EmConcept.load(tmp_path)
    assert torch.equal(loaded.embeddings, with_unet.embeddings)
    assert np.array_equal(loaded.masks, with_unet.masks)
    for n, d in with_unet.unet_delta.items():
        torch.testing.assert_close(loaded.unet_delta[n].float(), d, rtol=1e-3, atol=1e-7)
    meta = json.loads((tmp_path / "em.json").read_text())
    assert [h["step"] for h in meta["history"]] == [0] and set(meta["history"][0]["iou"]) == {"[v1]"}
    imgs = sample(world, loaded, ["a photo of [v1] and [v2] on a striped background"], [0], steps=4)
    assert imgs[0].shape == (32, 32, 3) and imgs[0].dtype == np.uint8
    labels, found = concept_masks(world, loaded, image, seed=0)
    assert labels.shape == (32, 32) and set(found) == {"[v1]", "[v2]"}
    assert all(m.shape == (32, 32) and m.dtype == bool for m in found.values())
    with pytest.raises(ValueError, match="not this concept"):
        concept_masks(world, loaded, image, tokens=["[v9]"])


def test_bad_em_inputs_fail_with_clear_errors(world, scene):
    image, masks = scene
    with pytest.raises(ValueError, match="no images"):
        train_em(world, [], EmParams(**FAST, init_words=("heart", "triangle")), seed=0)
    with pytest.raises(ValueError, match="beyond the 1 given"):
        train_em(world, [image], EmParams(**FAST, init_words=("heart", "triangle"), token_images=(0, 1)), seed=0)
    with pytest.raises(ValueError, match=r"shape \(16, 16\)"):
        train_em(world, [image], EmParams(**FAST, init_words=("heart", "triangle")), seed=0,
                 gt_masks={"[v1]": np.ones((16, 16), bool)})
    with pytest.raises(ValueError, match="unknown tokens"):
        train_em(world, [image], EmParams(**FAST, init_words=("heart", "triangle")), seed=0,
                 gt_masks={"[x]": masks[0]})
    with pytest.raises(ValueError, match="one word per token"):
        EmParams(init="word", init_words=("heart",))
    with pytest.raises(ValueError, match="not among tokens"):
        EmParams(background_tokens=("[bg]",))
    with pytest.raises(ValueError, match="layers"):
        EmParams(layers="some")
