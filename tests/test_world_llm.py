"""The world ``llm`` stage: its text, its held-out split, its reply check, and that training makes it answer.

Unit tier: the split and the text format are checked against independent computations (the MLLM's own
sequence builders, the build's template backend); a short training run of the random tiny Llama must lower the
loss and beat the untrained model on the held-out reply rate. The shipped model's gate is in
``test_world_models.py``.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from training.world import domain as D
from training.world import llm as L


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.models.tiny import TINY_WRITERS

    d = tmp_path_factory.mktemp("llama")
    TINY_WRITERS["llm"](d, 123)
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), AutoTokenizer.from_pretrained(d)


def test_held_out_split_is_disjoint_stable_and_covers_every_class():
    train = {(c, p) for _, c, p in L.requests("train")}
    held = {(c, p) for _, c, p in L.requests("held_out")}
    assert train and held and not train & held
    assert train | held == {(c, p) for c in D.CLASSES for p in D.PHRASES}
    assert 0.05 < len(held) / (len(train) + len(held)) < 0.30
    assert {c for c, _ in train} == set(D.CLASSES)  # every class is taught with some phrase
    assert held == {(c, p) for c in D.CLASSES for p in D.PHRASES if L.is_held_out_request(c, p)}


def test_sequences_are_what_the_mllm_feeds_the_llm(tiny_llama):
    from training.data.dialogue_templates import ASSISTANT_TEMPLATES
    from training.models.mllm import CafeMLLM

    _, tok = tiny_llama
    fake = SimpleNamespace(tokenizer=tok)
    seqs = L.training_sequences(tok)
    user, cls, phrase = L.requests("train")[0]
    reply = ASSISTANT_TEMPLATES[0].format(class_name=cls, phrase=phrase)
    assert seqs[0] == (CafeMLLM.prompt_ids(fake, user), CafeMLLM.response_ids(fake, reply))
    assert len(seqs) == len(L.requests("train")) * len(ASSISTANT_TEMPLATES)


def test_the_loss_covers_the_reply_only():
    ids, mask, labels = L._batch([([5, 6, 7], [8, 9]), ([5], [8, 9, 10, 11])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 10, 11]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert labels.tolist() == [[-100, -100, -100, 8, 9], [-100, 8, 9, 10, 11]]
    ids, mask, labels = L._batch([([5], [8]), ([5, 6], [8, 9])], pad_id=0)
    assert ids.tolist() == [[5, 8, 0, 0], [5, 6, 8, 9]] and mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert labels.tolist() == [[-100, 8, -100, -100], [-100, -100, 8, 9]]


def test_build_template_backend_uses_the_same_templates():
    from pipeline.build_config import DialogueConfig
    from pipeline.dialogue import DialogueRequest, TemplateBackend
    from training.data.dialogue_templates import ASSISTANT_TEMPLATES, USER_TEMPLATES

    fields = dict(class_name="star", phrase="on the left")
    req = DialogueRequest(row_id="r1", class_name="star", phrase="on the left", style="question")
    res = TemplateBackend(DialogueConfig()).generate([req])[0]
    assert res.user in {t.format(**fields) for t in USER_TEMPLATES["question"]}
    assert res.assistant in {t.format(**fields) for t in ASSISTANT_TEMPLATES}


def test_reply_check():
    assert L.reply_is_correct("Here is the star on the left. I kept the star.", "star", "on the left")
    assert not L.reply_is_correct("Here is the star on the right.", "star", "on the left")
    assert not L.reply_is_correct("Here is the heart on the left.", "star", "on the left")
    assert not L.reply_is_correct("Here is the star on the left, a heart too.", "star", "on the left")


def test_training_lowers_loss_and_answers_held_out_requests(tiny_llama):
    import copy

    model, tok = tiny_llama
    before, _ = L.reply_accuracy(model, tok, stride=3)
    losses = []
    trained = L.train_llm(copy.deepcopy(model), tok, L.LLMTrainConfig(steps=250), seed=0,
                          progress=lambda step, m: losses.append(m["loss"]))
    after, examples = L.reply_accuracy(trained, tok, stride=3)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert before == 0.0
    # 250 steps (a short run); the shipped 3,000-step model is held to 0.90 by the gate
    assert after >= 0.3, examples
