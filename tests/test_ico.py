"""ICO (SPEC §4.1): prompt layouts on the encoder's input, what is trained, precision, artifacts, determinism."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.attention.ico import IcoAttnProcessor, attention_module, cross_attention_names
from training.methods.ico import (IcoConcept, IcoParams, class_prior_images, concept_phrase, encode_prompts,
                                  inference_prompt_ids, sample, train_ico, training_prompt_ids)

WORLD_T2I = Path(__file__).resolve().parents[1] / "models" / "world" / "t2i"


def _load(path, dtype="float32"):
    from training.models.kit import load_role

    return load_role("t2i", path, dtype=dtype, device="cpu").components


@pytest.fixture(scope="module")
def t2i(tiny_models):
    return _load(tiny_models / "t2i")


def _images(n, seed=0, shape=(72, 60, 3)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def _capture_embeddings(text_encoder):
    """Collect the token+position embeddings the text encoder's transformer receives."""
    got = []
    embeddings = getattr(text_encoder, "text_model", text_encoder).embeddings
    handle = embeddings.register_forward_hook(lambda m, a, out: got.append(out.detach().clone()))
    return got, handle


def _table(text_encoder):
    emb = getattr(text_encoder, "text_model", text_encoder).embeddings
    return emb.token_embedding.weight.detach(), emb.position_embedding.weight.detach()


def _one(tok, word):
    ids = tok(word, add_special_tokens=False).input_ids
    assert len(ids) == 1
    return ids[0]


def _state(*modules):
    return {f"{k}.{n}": p.detach().clone() for k, m in enumerate(modules) for n, p in m.state_dict().items()}


# ------------------------------------------------------------------------------ prompt layouts


def test_training_layout_ids(t2i):
    tok = t2i.tokenizer
    lay = training_prompt_ids(tok, "cat", num_prefix=2, num_suffix=1, num_new=3)
    assert (lay.prefix, lay.new, lay.noun, lay.suffix, lay.eos) == ((1, 2), (3, 4, 5), (6,), (7,), 8)
    ids = lay.ids.tolist()
    assert len(ids) == tok.model_max_length
    assert ids[0] == tok.bos_token_id and ids[6] == _one(tok, "cat") and ids[8] == tok.eos_token_id
    assert set(ids[9:]) == {tok.pad_token_id}
    assert lay.position_ids(code_compat=True)[:9].tolist() == [0, 1, 2, 1, 2, 3, 6, 1, 8]


@pytest.mark.parametrize("code_compat", [False, True])
def test_training_prompt_on_encoder_input(t2i, code_compat):
    """[SOS] ctx(P=2) V(3) cat end_ctx(S=1) [EOS] [pad…] as the embedding tensor fed to the text encoder."""
    tok = t2i.tokenizer
    table, pos = _table(t2i.text_encoder)
    params = IcoParams(steps=1, num_prefix=2, num_suffix=1, init_word="dog", flip_p=0.0, code_compat=code_compat)
    got, handle = _capture_embeddings(t2i.text_encoder)
    try:
        train_ico(t2i, _images(1), "cat", params, seed=0)
    finally:
        handle.remove()
    a, dot, dog, cat = (_one(tok, w) for w in ("a", ".", "dog", "cat"))
    rows = [tok.bos_token_id, a, a, dog, dog, dog, cat, dot, tok.eos_token_id]
    rows += [tok.pad_token_id] * (tok.model_max_length - len(rows))
    positions = list(range(tok.model_max_length))
    if code_compat:  # the authors' quirk: contexts 1..P / 1..S, V tokens 1..|V|
        positions[1:8] = [1, 2, 1, 2, 3, 6, 1]
    want = table[rows] + pos[positions]  # (L, D)
    assert len(got) == 1 and got[0].shape == (1, *want.shape)
    torch.testing.assert_close(got[0][0], want, rtol=0, atol=1e-6)


def test_inference_prompt_has_no_contexts(t2i):
    """Plain text: the concept's V rows at their own slots, no context vectors, true positions."""
    tok = t2i.tokenizer
    table, pos = _table(t2i.text_encoder)
    concept = train_ico(t2i, _images(2), "cat", IcoParams(steps=2, learning_rate=1e-2), seed=0)
    assert concept_phrase(concept) == "<new1> <new2> <new3> cat"
    got, handle = _capture_embeddings(t2i.text_encoder)
    try:
        encode_prompts(t2i, concept, ["a photo of <new2> <new1> <new3> cat"], "cpu")
    finally:
        handle.remove()
    words = [tok.bos_token_id] + [_one(tok, w) for w in ("a", "photo", "of")]
    want = table[words + [0, 0, 0, _one(tok, "cat"), tok.eos_token_id]].clone()
    want[4:7] = concept.new_embeddings[[1, 0, 2]]  # order as written in the prompt
    want = want + pos[: len(want)]
    torch.testing.assert_close(got[0][0, : len(want)], want, rtol=0, atol=1e-6)
    for ctx in (*concept.prefix.reshape(-1, want.shape[1]), *concept.suffix.reshape(-1, want.shape[1])):
        assert not any(torch.allclose(row, ctx, atol=1e-4) for row in got[0][0] - pos)
    lay = inference_prompt_ids(tok, "a photo of <new1> <new2> <new3> cat", concept.tokens)
    assert (lay.prefix, lay.suffix, lay.new) == ((), (), (4, 5, 6))


# ------------------------------------------------------------------------------ what changes


def test_only_the_specified_parameters_change(t2i):
    base = _state(t2i.unet, t2i.text_encoder, t2i.vae)
    procs = dict(t2i.unet.attn_processors)
    tok = t2i.tokenizer
    table = _table(t2i.text_encoder)[0]
    prior = [(img, "a photo of a cat") for img in _images(2, seed=5, shape=(64, 64, 3))]
    concept = train_ico(t2i, _images(2), "cat", IcoParams(steps=6, learning_rate=1e-3, batch_size=2), seed=0,
                        prior=prior)
    after = _state(t2i.unet, t2i.text_encoder, t2i.vae)
    assert base.keys() == after.keys() and all(torch.equal(base[k], after[k]) for k in base)  # incl. token table
    assert all(t2i.unet.attn_processors[k] is procs[k] for k in procs)  # processors restored
    assert len(tok) == table.shape[0] and all(not p.requires_grad for p in t2i.unet.parameters())
    # trained: every attn2 to_k/to_v copy, the V rows, the contexts
    names = cross_attention_names(t2i.unet)
    assert concept.layer_names == names and len(names) > 1
    for name in names:
        attn = attention_module(t2i.unet, name)
        layer = concept.layers[name]
        assert layer.to_k.weight.dtype == torch.float32
        assert not torch.equal(layer.to_k.weight, attn.to_k.weight) and not torch.equal(layer.to_v.weight,
                                                                                          attn.to_v.weight)
    assert not torch.equal(concept.new_embeddings, table[_one(tok, "cat")].expand(3, -1))
    assert not torch.equal(concept.prefix[0, 0], table[_one(tok, "a")])
    assert not torch.equal(concept.suffix[0, 0], table[_one(tok, ".")])
    # the manual-prompt baseline trains the same k/v and V, never the contexts
    manual = train_ico(t2i, _images(1), "cat", IcoParams(steps=3, learning_rate=1e-3, prompt="manual"), seed=0)
    assert torch.equal(manual.prefix[0, 0], table[_one(tok, "a")])
    assert not torch.equal(manual.new_embeddings, table[_one(tok, "cat")].expand(3, -1))


def test_sos_key_value_get_no_gradient(t2i):
    """Grad of to_k/to_v equals an independent computation with the SOS row's k/v made constants."""
    name = cross_attention_names(t2i.unet)[0]
    attn = attention_module(t2i.unet, name)
    proc = IcoAttnProcessor.from_attention(attn)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    ctx = torch.randn(2, 6, attn.to_k.in_features, generator=g)
    weight = torch.randn(2, 16, attn.to_out[0].out_features, generator=g)
    (proc(attn, hidden, ctx) * weight).sum().backward()

    def reference(detach_sos: bool):
        wk = proc.to_k.weight.detach().clone().requires_grad_(True)
        wv = proc.to_v.weight.detach().clone().requires_grad_(True)
        k, v = ctx @ wk.T, ctx @ wv.T  # (B, L, inner)
        if detach_sos:
            k = torch.cat([ctx[:, :1] @ wk.detach().T, k[:, 1:]], 1)
            v = torch.cat([ctx[:, :1] @ wv.detach().T, v[:, 1:]], 1)
        h, d = attn.heads, k.shape[-1] // attn.heads
        q = attn.to_q(hidden).view(2, 16, h, d).transpose(1, 2)
        k, v = (t.view(2, 6, h, d).transpose(1, 2) for t in (k, v))
        o = ((q @ k.transpose(-1, -2)) * d**-0.5).softmax(-1) @ v  # (B, H, N, d)
        out = attn.to_out[0](o.transpose(1, 2).reshape(2, 16, h * d))
        (out * weight).sum().backward()
        return wk.grad, wv.grad

    gk, gv = reference(True)
    torch.testing.assert_close(proc.to_k.weight.grad, gk, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(proc.to_v.weight.grad, gv, rtol=1e-4, atol=1e-6)
    gk_full, _ = reference(False)
    assert (gk_full - gk).abs().max() > 1e-4  # the SOS path would contribute if it were not detached
    # a context whose only non-zero row is SOS: keys/values of the others do not depend on W → zero gradient
    proc.zero_grad()
    only_sos = torch.zeros_like(ctx)
    only_sos[:, 0] = ctx[:, 0]
    (proc(attn, hidden, only_sos) * weight).sum().backward()
    assert torch.count_nonzero(proc.to_k.weight.grad) == 0 and torch.count_nonzero(proc.to_v.weight.grad) == 0


# ------------------------------------------------------------------------------ training behaviour


def test_loss_falls_on_a_few_image_overfit():
    """World t2i (v-prediction): held-out-draw loss on the training prompt before vs after 60 steps.

    Measured (CPU, fp32): eval loss 0.261 → 0.187 on a fixed set of 16 (t, noise) draws of the 2 images;
    training loss, mean of the first vs last 15 steps: 0.467 → 0.199.
    """
    from PIL import Image

    from training.methods.ico import image_size, make_scheduler, preprocess_images

    t2i = _load(WORLD_T2I)
    folder = WORLD_T2I.parent / "eval" / "subjects" / "purple-square-whitedot"
    images = [np.asarray(Image.open(folder / f"{k}.png").convert("RGB")) for k in range(2)]
    params = IcoParams(steps=60, learning_rate=1e-3, prompt="manual", flip_p=0.0)
    untrained = train_ico(t2i, images, "square", IcoParams(steps=1, learning_rate=0.0, prompt="manual"), seed=0)
    trained = train_ico(t2i, images, "square", params, seed=0)

    sched = make_scheduler(t2i)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        z0 = t2i.vae.encode(preprocess_images(images, image_size(t2i)) * 2 - 1).latent_dist.mean
        z0 = (z0 * t2i.vae.config.scaling_factor).repeat(8, 1, 1, 1)  # (16, 4, 8, 8)
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, 1000, (len(z0),), generator=g)
    target = sched.get_velocity(z0, noise, t)

    def eval_loss(concept):
        from training.attention.ico import installed_processors

        with torch.no_grad(), installed_processors(t2i.unet, concept.processors_for(t2i.unet, "cpu")):
            hidden = encode_prompts(t2i, concept, ["a photo of <new1> <new2> <new3> square"] * len(z0), "cpu")
            pred = t2i.unet(sched.add_noise(z0, noise, t), t, encoder_hidden_states=hidden).sample
        return float(((pred - target) ** 2).mean())

    before, after = eval_loss(untrained), eval_loss(trained)
    print(f"eval loss {before:.3f} -> {after:.3f}; train loss first/last 15 steps "
          f"{np.mean(trained.losses[:15]):.3f} -> {np.mean(trained.losses[-15:]):.3f}")
    assert after < 0.9 * before, (before, after)
    assert np.mean(trained.losses[-15:]) < 0.8 * np.mean(trained.losses[:15])


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_float16_base_trains_without_nan(tiny_models, precision):
    t2i16 = _load(tiny_models / "t2i", dtype="float16")
    base = _state(t2i16.unet, t2i16.text_encoder)
    concept = train_ico(t2i16, _images(2), "cat", IcoParams(steps=4, learning_rate=1e-3, precision=precision),
                        seed=0)
    assert all(np.isfinite(concept.losses))
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for layer in concept.layers.values()
               for p in layer.parameters())
    assert torch.isfinite(concept.new_embeddings).all() and torch.isfinite(concept.prefix).all()
    name = concept.layer_names[0]
    assert not torch.equal(concept.layers[name].to_k.weight,
                           attention_module(t2i16.unet, name).to_k.weight.float())  # it did train
    after = _state(t2i16.unet, t2i16.text_encoder)
    assert all(torch.equal(base[k], after[k]) and after[k].dtype == base[k].dtype for k in base)
    image = sample(t2i16, concept, ["a photo of <new1> <new2> <new3> cat"], [0], steps=2)[0]
    assert image.shape == (64, 64, 3)


def test_bad_parameters_are_refused(t2i):
    with pytest.raises(ValueError, match="init_token_ids"):
        train_ico(t2i, _images(1), "cat", IcoParams(steps=1, init_token_ids=(43514, 47629, 42170)), seed=0)
    with pytest.raises(ValueError, match="prompt"):
        IcoParams(prompt="fancy")
    with pytest.raises(ValueError, match="precision"):
        IcoParams(precision="fp8")
    with pytest.raises(ValueError, match="images"):
        train_ico(t2i, [np.zeros((8, 8), np.uint8)], "cat", IcoParams(steps=1), seed=0)


# ------------------------------------------------------------------------------ artifacts and determinism


def test_save_load_round_trip_gives_identical_samples(t2i, tmp_path):
    concept = train_ico(t2i, _images(2), "cat", IcoParams(steps=3, learning_rate=1e-3), seed=0)
    paths = concept.save(tmp_path / "c")
    assert sorted(Path(p).name for p in paths) == ["ico.json", "ico.safetensors"]
    assert not list((tmp_path / "c").glob(".*tmp"))
    loaded = IcoConcept.load(tmp_path / "c")
    assert (loaded.tokens, loaded.noun, loaded.layer_names, loaded.losses) == \
        (concept.tokens, concept.noun, concept.layer_names, concept.losses)
    assert torch.equal(loaded.prefix, concept.prefix) and torch.equal(loaded.new_embeddings, concept.new_embeddings)
    prompts, seeds = ["a photo of <new1> <new2> <new3> cat", "a photo of a dog"], [1, 2]
    a = sample(t2i, concept, prompts, seeds, steps=3)
    b = sample(t2i, loaded, prompts, seeds, steps=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    base = sample(t2i, None, prompts, seeds, steps=3)
    assert not np.array_equal(a[0], base[0])


def test_same_job_alone_or_after_another_job_is_bit_identical(t2i):
    params = IcoParams(steps=4, learning_rate=1e-3, batch_size=2)
    prompts = ["a photo of <new1> <new2> <new3> cat"]
    first = train_ico(t2i, _images(2), "cat", params, seed=3)
    first_image = sample(t2i, first, prompts, [7], steps=3)[0]
    other = train_ico(t2i, _images(3, seed=9), "dog", IcoParams(steps=3, learning_rate=1e-2), seed=4,
                      prior=class_prior_images(t2i, "dog", n=2, seed=0, steps=2))
    sample(t2i, other, ["a photo of <new1> <new2> <new3> dog"], [7], steps=2)
    again = train_ico(t2i, _images(2), "cat", params, seed=3)
    assert first.losses == again.losses
    for name in first.layer_names:
        assert torch.equal(first.layers[name].to_k.weight, again.layers[name].to_k.weight)
        assert torch.equal(first.layers[name].to_v.weight, again.layers[name].to_v.weight)
    assert torch.equal(first.new_embeddings, again.new_embeddings) and torch.equal(first.suffix, again.suffix)
    assert np.array_equal(first_image, sample(t2i, again, prompts, [7], steps=3)[0])


def test_class_prior_images_are_base_samples_with_caption(t2i):
    prior = class_prior_images(t2i, "dog", n=3, seed=10, steps=2, batch_size=2)
    assert [c for _, c in prior] == ["a photo of a dog"] * 3
    # chunks of batch_size rows (CPU GEMMs may round differently for other batch sizes, so compare like for like)
    direct = sample(t2i, None, ["a photo of a dog"] * 2, [10, 11], steps=2) + \
        sample(t2i, None, ["a photo of a dog"], [12], steps=2)
    assert all(np.array_equal(a, b) for (a, _), b in zip(prior, direct))
    assert not np.array_equal(prior[0][0], prior[1][0])


# ------------------------------------------------------------------------------ prior preservation, learning rates

LONG_CAPTION = "a red dog with a hat on the beach and " * 12  # ≈ 110 tokens: longer than model_max_length (77)


def _latents(t2i, images):
    """Independent VAE posterior means × scaling of the images (centre crop + resize via the module's helper)."""
    from training.methods.ico import image_size, preprocess_images

    with torch.no_grad():
        z = t2i.vae.encode(preprocess_images(images, image_size(t2i)) * 2 - 1).latent_dist.mean
    return z * t2i.vae.config.scaling_factor


def test_prior_preservation_mixes_1_to_1_with_own_captions(t2i, monkeypatch):
    """Two references, three class images: every epoch of the loader (2·max(2, 3) = 6 draws) holds 3 reference
    rows (cycled 0, 1, 0) and each class image once; a class row's z0 is its image's latent, its ids are its own
    caption (the long one truncated like ``tokenizer(truncation=True)``), with no contexts and plain positions
    (``code_compat=True`` gives the reference rows other positions, so this is a real check)."""
    from diffusers import DDIMScheduler

    tok = t2i.tokenizer
    length = tok.model_max_length
    table, pos = _table(t2i.text_encoder)
    refs = _images(2, seed=1)
    prior_imgs = _images(3, seed=2, shape=(64, 64, 3))
    captions = ["a photo of a dog", "a dog on the beach", LONG_CAPTION]
    assert len(tok(LONG_CAPTION).input_ids) > length
    want_ids = [tok(c, truncation=True, max_length=length, padding="max_length").input_ids for c in captions]
    assert want_ids[2][-1] == tok.eos_token_id  # truncated: SOS, 75 words, EOS

    z_ref, z_prior = _latents(t2i, refs), _latents(t2i, prior_imgs)
    seen_z0 = []
    real_add_noise = DDIMScheduler.add_noise
    monkeypatch.setattr(DDIMScheduler, "add_noise",
                        lambda self, z0, noise, t: (seen_z0.append(z0.detach().clone()),
                                                    real_add_noise(self, z0, noise, t))[1])
    seen_ids, seen_pos = [], []

    def record(module, args, kwargs):
        seen_ids.append(args[0].clone())
        seen_pos.append(kwargs["position_ids"].clone())

    pre = t2i.text_encoder.register_forward_pre_hook(record, with_kwargs=True)
    emb, handle = _capture_embeddings(t2i.text_encoder)
    try:
        params = IcoParams(steps=12, learning_rate=1e-4, flip_p=0.0, code_compat=True)
        train_ico(t2i, refs, "cat", params, seed=0, prior=list(zip(prior_imgs, captions)))
    finally:
        pre.remove()
        handle.remove()
    assert len(seen_z0) == len(seen_ids) == len(emb) == 12

    ref_layout = training_prompt_ids(tok, "cat")
    drawn = []
    for z0, ids, position, e in zip(seen_z0, seen_ids, seen_pos, emb):
        assert z0.shape[0] == ids.shape[0] == 1  # batch_size 1
        d_ref = (z_ref - z0).flatten(1).abs().amax(1)
        d_pri = (z_prior - z0).flatten(1).abs().amax(1)
        if d_ref.min() < 1e-5:
            drawn.append(("ref", int(d_ref.argmin())))
            assert torch.equal(ids[0], ref_layout.ids)
            assert not torch.equal(position[0], torch.arange(length))  # code_compat positions on reference rows
        else:
            j = int(d_pri.argmin())
            assert d_pri[j] < 1e-5
            drawn.append(("prior", j))
            assert ids[0].tolist() == want_ids[j]  # its own caption
            assert torch.equal(position[0], torch.arange(length))  # plain positions
            # nothing spliced: the encoder input is the plain token + position embedding of the caption
            torch.testing.assert_close(e[0], table[torch.tensor(want_ids[j])] + pos[:length], rtol=0, atol=1e-6)
    for epoch in (drawn[:6], drawn[6:]):  # 1:1 at the dataset level, one shuffled loader
        assert sorted(epoch) == [("prior", 0), ("prior", 1), ("prior", 2), ("ref", 0), ("ref", 0), ("ref", 1)]
    assert drawn[:6] != drawn[6:]  # reshuffled every epoch (this seed)


def test_caption_ids_truncate_like_the_tokenizer(t2i):
    from training.methods.ico import caption_ids

    tok = t2i.tokenizer
    for caption in (LONG_CAPTION, "a photo of a dog", ""):
        want = tok(caption, truncation=True, max_length=tok.model_max_length, padding="max_length").input_ids
        assert caption_ids(tok, caption).tolist() == want
    with pytest.raises(ValueError, match="model_max_length"):  # user prompts with V slots are still refused
        inference_prompt_ids(tok, LONG_CAPTION + " <new1>", ("<new1>",))


def test_contexts_take_ten_times_the_learning_rate(t2i):
    """One AdamW step from a zero state moves each parameter by lr · g/(|g| + eps) ≈ lr (weight decay 0):
    the V rows and to_k/to_v by learning_rate · batch_size, both images' contexts by 10× that."""
    tok = t2i.tokenizer
    table = _table(t2i.text_encoder)[0]
    lr = 1e-3 * 2  # learning_rate · batch_size
    params = IcoParams(steps=1, learning_rate=1e-3, batch_size=2, weight_decay=0.0, flip_p=0.0)
    concept = train_ico(t2i, _images(2), "cat", params, seed=0)
    d_v = (concept.new_embeddings - table[_one(tok, "cat")]).abs()  # (3, D)
    d_ctx = torch.cat([(concept.prefix - table[_one(tok, "a")]).abs().flatten(),
                       (concept.suffix - table[_one(tok, ".")]).abs().flatten()])  # both images, P + S
    name = concept.layer_names[0]
    d_k = (concept.layers[name].to_k.weight - attention_module(t2i.unet, name).to_k.weight).abs()
    for delta, rate in ((d_v, lr), (d_k, lr), (d_ctx, 10 * lr)):
        assert float(delta.max()) <= rate * (1 + 1e-3)  # Adam's first step is bounded by lr
        assert abs(float(delta.median()) / rate - 1) < 1e-2  # … and ≈ lr where |g| ≫ eps (1e-8)
    print(f"median |Δctx| / median |ΔV| = {float(d_ctx.median() / d_v.median()):.4f}")
    assert abs(float(d_ctx.median() / d_v.median()) - 10) < 1e-2


def test_serving_never_moves_the_concept_and_the_cache_is_bounded(t2i):
    """A served concept is copied to the sampling device, never moved there (its cached weights stay on the host);
    the concept cache holds at most its byte budget, least recently used evicted first, bytes counted exactly."""
    from pipeline import concepts as C

    concept = train_ico(t2i, _images(1), "cat", IcoParams(steps=1, learning_rate=1e-3), seed=0)
    procs = concept.processors_for(t2i.unet, "meta")
    assert all(p.to_k.weight.device.type == "meta" for p in procs.values())
    assert all(layer.to_k.weight.device.type == "cpu" for layer in concept.layers.values())  # untouched
    assert all(concept.processors_for(t2i.unet, "cpu")[n] is concept.layers[n] for n in concept.layers)  # no copy
    size = C.concept_bytes(concept)
    params = sum(p.numel() * 4 for layer in concept.layers.values() for p in layer.parameters())
    assert size == params + 4 * (concept.new_embeddings.numel() + concept.prefix.numel() + concept.suffix.numel())
    C._CONCEPT_CACHE.clear()
    try:
        for name in "abc":
            C.remember((name, "ico"), concept, cache_bytes=2 * size)
        assert list(C._CONCEPT_CACHE) == [("b", "ico"), ("c", "ico")]  # a, the least recently used, evicted
        C.remember(("huge", "ico"), concept, cache_bytes=size - 1)  # larger than the whole budget: not cached
        assert ("huge", "ico") not in C._CONCEPT_CACHE
    finally:
        C._CONCEPT_CACHE.clear()
