"""The world's ``llm``: the tiny Llama trained as a causal LM on the world's dialogues.

Usage::

    model, tokenizer = train_llm(model, tokenizer, LLMTrainConfig(), seed=0)     # LlamaForCausalLM, in place
    replies = reply(model, tokenizer, ["Can you generate an image for this star on the left?"])
    rate = reply_accuracy(model, tokenizer)        # held-out (class, phrase) requests answered correctly

The text is what the datasets the MLLM is trained on say: every user template of every request style
(:mod:`training.data.dialogue_templates`) × every class × every instruction phrase, each followed by every
assistant template, in the format :class:`training.models.mllm.CafeMLLM` feeds the LLM (the chat template's
generation prompt, then ``" " + reply + EOS``). The loss covers the reply only (supervised fine-tuning): a loss on
the request too teaches which phrases go with which class, and the model then answers an unseen (class, phrase)
request with a phrase it saw beside that class (held-out replies 0.83 with it, 0.94 without, 3,000 steps). A
stable 15 % of the (class, phrase) pairs never appear in training: a reply to such a request that names its class
and its phrase shows the model composes them (the ``llm.reply`` gate).

``dialogue_llm`` (the build's dialogue-synthesis role) is not trained here: the world's builds use the template
backend, and its model stays the random tiny Llama (``cafe_world.json`` says so).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from training.data.dialogue_templates import ASSISTANT_TEMPLATES, USER_TEMPLATES
from training.data.ids import stable_hash
from training.models.mllm import chat_prompt_ids, chat_response_ids
from training.world import domain as D
from training.world.optim import optimizer_step, warmup_cosine

HELD_OUT_FRACTION = 0.15


@dataclass(frozen=True)
class LLMTrainConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0


def is_held_out_request(cls: str, phrase: str) -> bool:
    """A stable 15 % of the (class, phrase) pairs, never in the LLM's training text."""
    return int(stable_hash("world-llm-held-out", cls, phrase)[:8], 16) / 16**8 < HELD_OUT_FRACTION


def requests(split: str = "train") -> list[tuple[str, str, str]]:
    """(user text, class, phrase) for every user template × class × phrase of ``split`` (train / held_out)."""
    out = []
    for cls in D.CLASSES:
        for phrase in D.PHRASES:
            if is_held_out_request(cls, phrase) != (split == "held_out"):
                continue
            for templates in USER_TEMPLATES.values():
                out += [(t.format(class_name=cls, phrase=phrase), cls, phrase) for t in templates]
    return out


def training_sequences(tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids) of every training dialogue, built by the MLLM's own sequence functions (the reply
    ends with EOS)."""
    seqs = []
    for user, cls, phrase in requests("train"):
        prompt = chat_prompt_ids(tokenizer, user)
        for reply_t in ASSISTANT_TEMPLATES:
            seqs.append((prompt, chat_response_ids(tokenizer, reply_t.format(class_name=cls, phrase=phrase))))
    return seqs


def _batch(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (the reply's ids; -100 on the prompt and the padding)."""
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (prompt, resp) in enumerate(seqs):
        n = len(prompt) + len(resp)
        ids[i, :n] = torch.tensor(prompt + resp)
        mask[i, :n] = 1
        labels[i, len(prompt): n] = torch.tensor(resp)
    return ids, mask, labels


def train_llm(model, tokenizer, cfg: LLMTrainConfig, seed: int, progress=None, device: str = "cpu"):
    """Train ``model`` (a causal LM, float32) on :func:`training_sequences`; batches drawn on the CPU from a
    seeded generator. Returns the model in eval mode on the CPU."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    seqs = training_sequences(tokenizer)
    model = model.float().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, cfg.steps, 0.05)
    for step in range(cfg.steps):
        idx = torch.randint(len(seqs), (cfg.batch_size,), generator=gen).tolist()
        ids, mask, labels = (t.to(device) for t in _batch([seqs[i] for i in idx], tokenizer.pad_token_id))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        value = optimizer_step(opt, sched, loss, model.parameters())
        if progress is not None:
            progress(step, {"loss": value})
    return model.eval().cpu()


@torch.no_grad()
def reply(model, tokenizer, user_texts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy replies, one request at a time (no padding subtleties)."""
    out = []
    dev = next(model.parameters()).device
    for text in user_texts:
        ids = torch.tensor([chat_prompt_ids(tokenizer, text)], device=dev)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


def reply_is_correct(text: str, cls: str, phrase: str) -> bool:
    """The reply names the requested class and phrase, and no other class."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    return cls in words and phrase in text and not any(o in words for o in D.CLASSES if o != cls)


def reply_accuracy(model, tokenizer, split: str = "held_out", stride: int = 1) -> tuple[float, list[tuple[str, str]]]:
    """Fraction of ``split`` requests (every ``stride``-th) whose greedy reply is correct, and the first
    (request, reply) pairs."""
    reqs = requests(split)[::stride]
    texts = reply(model, tokenizer, [u for u, _, _ in reqs])
    ok = [reply_is_correct(t, c, p) for t, (_, c, p) in zip(texts, reqs)]
    return sum(ok) / max(1, len(ok)), [(u, t) for (u, _, _), t in zip(reqs[:3], texts[:3])]
