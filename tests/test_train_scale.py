"""What training and inference at scale rest on, checked in one process (no Ray; two ranks where it matters):

* every collective of the loop runs on the device it is given (NCCL takes CUDA tensors only), and two gloo ranks
  average their loss terms;
* micro-batches are full, every row of an epoch is trained on (the last one is completed with the epoch's first
  rows), an in-memory epoch is a permutation seeded by (seed, epoch) — the same when called again (resume);
* gradient checkpointing (frozen LLM, UNet) gives the same loss and gradients and keeps far fewer activations;
* cached features in float16 / bfloat16 read back to the float32 features within the dtype's rounding;
* the two-scale guidance of D1 equals the one-scale form at equal scales, and with a zero DINO scale the image
  does not depend on the DINO tokens (exact).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import trainutil as tu

# -- collectives ------------------------------------------------------------------------------------


class _Reached(Exception):
    def __init__(self, device):
        self.device = device


def test_the_loss_reduction_runs_on_the_engines_device(monkeypatch, tmp_path):
    """The tensor handed to all_reduce lies on the device given (the engine's): with NCCL a CPU tensor fails at
    the first optimizer step of a multi-GPU run, which is what this helper did before."""
    import torch.distributed as dist

    from training.trainers import engine

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)

    def all_reduce(t, *a, **k):
        raise _Reached(t.device)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    for device in ("meta", "cpu"):
        with pytest.raises(_Reached) as hit:
            engine.mean_over_ranks({"loss": 1.0, "mse": 2.0}, torch.device(device))
        assert hit.value.device.type == device


def test_two_gloo_ranks_average_their_loss_terms(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=tu.reduce_rank, args=(r, 2, str(tmp_path / "store"), out)) for r in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    for rank, terms in got:
        assert terms == {"loss": pytest.approx(1.5), "mse": pytest.approx(15.0)}, (rank, terms)


# -- batches ----------------------------------------------------------------------------------------


def _stream(n: int, sizes):
    ids = np.array([f"r{i:02d}" for i in range(n)], dtype=object)
    feats = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    start = 0
    for size in sizes:
        if start >= n:
            break
        yield {"id": ids[start:start + size], "x": feats[start:start + size]}
        start += size


@pytest.mark.parametrize("n,micro,sizes", [(11, 4, [4, 4, 4]), (11, 4, [3, 5, 1, 2]), (3, 4, [3]), (8, 4, [8]),
                                           (1, 5, [1])])
def test_full_batches_train_every_row_in_full_micro_batches(n, micro, sizes):
    from training.trainers.engine import full_batches

    batches = list(full_batches(_stream(n, sizes), micro))
    assert len(batches) == -(-n // micro)
    assert all(len(b["id"]) == micro and b["x"].shape == (micro, 3) for b in batches)
    seen = np.concatenate([b["id"] for b in batches])
    assert set(seen) == {f"r{i:02d}" for i in range(n)}
    assert list(seen[:n]) == [f"r{i:02d}" for i in range(n)]  # order kept
    assert list(seen[n:]) == [f"r{i % n:02d}" for i in range(len(seen) - n)]  # the wrap: the epoch's first rows
    for b in batches:  # rows stay whole (id and features travel together)
        assert all(b["x"][j, 0] == 3 * int(b["id"][j][1:]) for j in range(micro))


def test_in_memory_epochs_are_seeded_permutations():
    from training.trainers.engine import full_batches, permuted

    rows = next(_stream(10, [10]))
    epoch = lambda e: np.concatenate([b["id"] for b in full_batches(permuted(rows, 0, e, True), 4)])  # noqa: E731
    e0, e0_again, e1 = epoch(0), epoch(0), epoch(1)
    assert list(e0) == list(e0_again)  # a resumed run replays the same epoch
    assert list(e0[:10]) != list(e1[:10])  # and the next epoch is another order
    assert set(e0[:10]) == set(e1[:10]) == set(rows["id"])
    plain = np.concatenate([b["id"] for b in full_batches(permuted(rows, 0, 3, False), 4)])
    assert list(plain[:10]) == list(rows["id"])


def test_steps_count_the_completed_last_micro_batch():
    from training.trainers.engine import steps_for

    assert steps_for(11, 4, 1, 1, None) == 3
    assert steps_for(11, 4, 2, 2, None) == 3  # 6 micro-batches over 2 epochs, 2 per step
    assert steps_for(3, 16, 1, 5, None) == 5  # fewer rows than a micro-batch still train
    assert steps_for(11, 4, 1, 10, 7) == 7


# -- gradient checkpointing -------------------------------------------------------------------------


def _saved_bytes(fn) -> tuple[object, int]:
    """``fn()``'s result and the bytes autograd kept for the backward pass while it ran."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def _loss_and_grads(model: str, checkpointing: bool, llm: str | None, batch: dict):
    from types import SimpleNamespace

    from pipeline.train import recipe_class

    section = SimpleNamespace(**vars(tu.sections()[model]), gradient_checkpointing=checkpointing)
    recipe = recipe_class(model)(section, tu.roles(llm)).setup("cpu")
    recipe.module_train_mode(recipe.module)
    inputs = recipe.prepare(batch, 0, 0)
    terms, saved = _saved_bytes(lambda: recipe.module(**inputs))
    terms["loss"].backward()
    grads = {n: p.grad.clone() for n, p in recipe.module.named_parameters() if p.requires_grad and p.grad is not None}
    return float(terms["loss"].detach()), grads, saved


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mllm", "diffusion"])
def test_gradient_checkpointing_keeps_loss_and_gradients_and_saves_activations(model, tmp_path):
    data = tu.write_dataset(tmp_path / "data", n=4)
    batch = tu.numpy_batch(data)
    llm = tu.sensitive_llama(tmp_path / "llm") if model == "mllm" else None
    loss_off, grads_off, saved_off = _loss_and_grads(model, False, llm, batch)
    loss_on, grads_on, saved_on = _loss_and_grads(model, True, llm, batch)
    print(model, "saved activation bytes: off", saved_off, "on", saved_on, f"ratio {saved_on / saved_off:.3f}")
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    assert grads_on.keys() == grads_off.keys() and grads_on
    for n in grads_off:
        torch.testing.assert_close(grads_on[n], grads_off[n], rtol=1e-4, atol=1e-6, msg=n)
    assert saved_on < 0.6 * saved_off  # the layers' activations are recomputed, not kept


# -- the cache's dtypes -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,rel", [("float32", 0.0), ("float16", 1e-3), ("bfloat16", 8e-3)])
def test_cached_features_read_back_within_their_dtype(dtype, rel, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.trainers.base import read_features, store_features

    x = torch.randn(4, 17, 33) * 3
    stored = store_features(x, dtype)
    assert stored.dtype == {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]
    assert stored.nbytes == x.numel() * (4 if dtype == "float32" else 2)
    # through Parquet as a fixed-shape tensor column, as the cache writes it
    table = pa.table({"f": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(stored))})
    pq.write_table(table, tmp_path / "c.parquet")
    back = pq.read_table(tmp_path / "c.parquet").column("f").combine_chunks().to_numpy_ndarray()
    y = read_features(back)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y, x, rtol=rel, atol=rel * 3)
    if dtype == "bfloat16":
        assert torch.equal(y, x.to(torch.bfloat16).float())  # exactly bf16's rounding


# -- guidance ---------------------------------------------------------------------------------------


def _assistant():
    from training.assistant import Assistant
    from training.encoders import ConditionEncoders
    from training.models.conditioned import ConditionedUNet
    from training.trainers.base import load

    t2i = load("t2i", tu.roles()["t2i"], "cpu").components
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ConditionedUNet.from_unet(t2i.unet, clip_dim=64, dino_width=96)
        for p in (model.dino_proj.weight, model.clip_proj.weight):  # a conditioner that matters (untrained: small)
            p.data.normal_(0, 0.5)
    return Assistant(model.eval(), ConditionEncoders(device="cpu"), t2i.vae, t2i.scheduler)


@pytest.mark.slow
def test_two_guidance_scales_reduce_to_one_and_a_zero_dino_scale_ignores_dino():
    a = _assistant()
    g = torch.Generator().manual_seed(1)
    clip, dino, other = torch.randn(2, 64, generator=g), torch.randn(2, 65, 96, generator=g), \
        torch.randn(2, 65, 96, generator=g) * 2
    one = a.sample(clip, dino, [0, 1], steps=4, guidance=3.0)
    two = a.sample(clip, dino, [0, 1], steps=4, guidance=3.0, guidance_dino=3.0)
    for x, y in zip(one, two):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1  # the same image (float rounding: ≤ 1 level)
    no_dino = a.sample(clip, dino, [0, 1], steps=4, guidance=3.0, guidance_dino=0.0)
    no_dino_other = a.sample(clip, other, [0, 1], steps=4, guidance=3.0, guidance_dino=0.0)
    assert all(np.array_equal(x, y) for x, y in zip(no_dino, no_dino_other))
    live = a.sample(clip, other, [0, 1], steps=4, guidance=3.0, guidance_dino=3.0)
    assert any(not np.array_equal(x, y) for x, y in zip(two, live))  # and the DINO scale is live
