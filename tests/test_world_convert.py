"""The conditioners are exact conversions of the trained filters (random weights prove the equivalence)."""
from __future__ import annotations

import torch

from training.world import domain as D
from training.world import encoders as E


def _images(n=6):
    return D.render_pairs(D.sample_pairs(n, 3, "all"), 3)[0]


def test_open_clip_tower_equals_transformers_clip_vision():
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.CLIP(**E.open_clip_config(E.CLIPTrainConfig())).eval()
    for p in clip.parameters():  # move every weight off its init so nothing matches by accident
        p.data.add_(0.02 * torch.randn_like(p))
    x = E.normalize(_images(), E.OPENAI_MEAN, E.OPENAI_STD)
    with torch.no_grad():
        want = clip.encode_image(x)
        got = E.open_clip_to_hf_vision(clip, projection=True)(pixel_values=x).image_embeds
        plain = E.open_clip_to_hf_vision(clip, projection=False)(pixel_values=x)
        tower = E.open_clip_to_hf_vision(clip, projection=True).vision_model(pixel_values=x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.last_hidden_state, tower.last_hidden_state)
    assert want.abs().max() > 0.1


def test_vit_equals_dinov2_with_unit_layer_scale():
    torch.manual_seed(1)
    vit = E.make_vit(E.DinoTrainConfig()).eval()
    for p in vit.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    x = E.normalize(_images(), E.IMAGENET_MEAN, E.IMAGENET_STD)
    with torch.no_grad():
        want = vit(pixel_values=x).last_hidden_state
        got = E.vit_to_dinov2(vit)(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_supcon_loss_prefers_grouped_embeddings():
    labels = torch.tensor([0, 0, 1, 1])
    grouped = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]]), dim=-1)
    mixed = grouped[[0, 2, 1, 3]]
    assert E.supcon_loss(grouped, labels, 0.1) < E.supcon_loss(mixed, labels, 0.1)


def test_multi_positive_targets():
    # image truth rows; caption j states some labels (-1 = not said)
    truth = torch.tensor([[0, 1], [0, 2], [3, 1]])
    stated = torch.tensor([[0, -1], [-1, 1], [3, 1]])
    c = E.compatible(stated, truth)
    assert c.tolist() == [[True, True, False], [True, False, False], [False, True, True]]


def test_hard_clip_batch_holds_every_class_of_a_few_colours():
    """Hard CLIP batches: every class of ``hard_colours`` colours, the batch split evenly among those groups."""
    pairs = D.sample_pairs(3000, 5, "train")
    by_cc = {}
    for i, (inst, _) in enumerate(pairs):
        by_cc.setdefault((D.CLASSES.index(inst.cls), list(D.COLOURS).index(inst.colour)), []).append(i)
    by_cc = {k: torch.tensor(v) for k, v in by_cc.items()}
    cfg = E.CLIPTrainConfig(batch_size=120, hard_colours=2)
    idx = E._hard_clip_batch(by_cc, cfg, torch.Generator().manual_seed(0))
    assert len(idx) == 120
    groups = [(D.CLASSES.index(pairs[i][0].cls), list(D.COLOURS).index(pairs[i][0].colour)) for i in idx.tolist()]
    assert len({c for _, c in groups}) == 2
    counts = {g: groups.count(g) for g in set(groups)}
    assert len(counts) == 2 * len(D.CLASSES) and set(counts.values()) == {10}


def test_dino_proxy_objective_trains_instance_separation():
    """SupCon + the instance-proxy term on a few steps: the loss falls and the proxies are not saved (a plain
    ViTModel comes back)."""
    from transformers import ViTModel

    pairs = D.sample_pairs(400, 3, "train")
    images, _ = D.render_pairs(pairs, 3)
    index = {inst.id: k for k, inst in enumerate(D.all_instances())}
    ids = __import__("numpy").array([index[i.id] for i, _ in pairs])
    losses = []
    cfg = E.DinoTrainConfig(width=32, layers=1, heads=2, steps=30, instances_per_batch=16, proxy_weight=1.0)
    vit = E.train_dino(images, ids, cfg, seed=0, progress=lambda s, m: losses.append(m["loss"]))
    assert type(vit) is ViTModel
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_dino_hard_batches_share_a_colour(monkeypatch):
    """``hard_batches=1`` with colour groups: every batch's instances have one colour (18 instances per colour)."""
    import numpy as np

    pairs = D.sample_pairs(2500, 4, "train")
    images, _ = D.render_pairs(pairs, 4)
    insts = D.all_instances()
    index = {inst.id: k for k, inst in enumerate(insts)}
    ids = np.array([index[i.id] for i, _ in pairs])
    assert len(set(ids.tolist())) == len(insts)  # every instance present: batch label g is the instance index
    colour = np.array([list(D.COLOURS).index(i.colour) for i in insts])
    seen = []
    real = E.supcon_loss
    monkeypatch.setattr(E, "supcon_loss", lambda z, lab, t: seen.append(lab.tolist()) or real(z, lab, t))
    cfg = E.DinoTrainConfig(width=32, layers=1, heads=2, steps=4, instances_per_batch=18, hard_batches=1.0,
                            proxy_weight=0.0)
    E.train_dino(images, ids, cfg, seed=0, groups_of=colour)
    assert len(seen) == 4
    for lab in seen:
        assert len(set(lab)) == 18 and len({int(colour[g]) for g in lab}) == 1
