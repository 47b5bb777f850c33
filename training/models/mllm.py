"""CAFE's multimodal LLM (SPEC §2): a frozen LLM reading projected CLIP image tokens, plus a learnable token
whose last hidden state a head H maps into the CLIP image-embedding space.

Usage::

    mllm = CafeMLLM(llm.model, llm.tokenizer, vision_width=1024, clip_dim=768)
    out = mllm.loss(vision_feats, user_texts, responses, clip_targets)    # {"loss", "lm", "mse"}
    text, embedding = mllm.respond(vision_feats[0], "Can you generate ...?")
    mllm.save_trainable("out/mllm"); mllm.load_trainable("out/mllm")

Sequence per row (training)::

    [V(image patch features)] [prompt tokens] [response tokens + EOS] [learnable token]

* the prompt is the tokenizer's chat template applied to the user text (with the generation prompt), or
  ``"USER: {text}\\nASSISTANT:"`` when the tokenizer has none;
* ``L_LM``: next-token cross-entropy over the response tokens (EOS included) only, averaged per row and then
  over rows (so that a batch split over data-parallel ranks has the loss of the whole batch);
* ``MSE``: ``H(h_token)`` against the target's CLIP image embedding (``clip_cond``'s ``image_embeds``,
  L2-normalised — the same quantity that conditions the diffusion model); ``L = L_LM + λ·MSE`` (D2, λ=1).

Only ``vision_proj`` (V), ``head`` (H) and ``query_token`` train; the LLM stays frozen in its dtype. Image
features are the CLIP vision tower's patch tokens (CLS dropped) from the hidden layer ``select_layer``
(LLaVA's choice: the penultimate layer), computed outside this module (:mod:`training.encoders`) so that a
cache can supply them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MLLM_WEIGHTS = "mllm.safetensors"
MLLM_CONFIG = "mllm.json"
TRAINABLE = ("vision_proj", "head", "query_token")


def chat_prompt_ids(tok, user_text: str) -> list[int]:
    """The LLM input for one user request: the chat template's generation prompt (a plain ``USER:/ASSISTANT:``
    prompt for a tokenizer without one)."""
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True,
                                      tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return list(ids)
    return tok(f"USER: {user_text}\nASSISTANT:").input_ids


def chat_response_ids(tok, response: str) -> list[int]:
    """The reply's ids as the LLM is taught to produce them: ``" " + response`` + EOS."""
    return tok(" " + response, add_special_tokens=False).input_ids + [tok.eos_token_id]


class CafeMLLM(nn.Module):
    def __init__(self, llm, tokenizer, vision_width: int, clip_dim: int, lam: float = 1.0):
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        hidden = int(llm.config.hidden_size)
        self.config = {"vision_width": int(vision_width), "clip_dim": int(clip_dim), "llm_hidden": hidden}
        self.lam = float(lam)
        self.vision_proj = nn.Linear(vision_width, hidden)
        self.head = nn.Linear(hidden, clip_dim)
        std = float(getattr(llm.config, "initializer_range", 0.02))  # (weights may be ZeRO-3 partitioned here)
        # the learnable token as a one-row embedding module (not a bare Parameter): ZeRO-3 gathers a partitioned
        # parameter in its module's forward hook, so the token must be read through a module call
        self.query_token = nn.Embedding(1, hidden)
        with torch.no_grad():
            self.query_token.weight.copy_(torch.randn(1, hidden, generator=torch.Generator().manual_seed(0)) * std)
        for m in (self.vision_proj, self.head, self.query_token):
            m.float()

    # -- parameters -------------------------------------------------------------------------------

    def trainable_named_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if n.split(".")[0] in TRAINABLE}

    def freeze_base(self) -> "CafeMLLM":
        """Frozen LLM (``requires_grad=False``), trainable V/H/token (float32)."""
        self.llm.requires_grad_(False)
        self.llm.eval()
        for p in self.trainable_named_parameters().values():
            p.requires_grad_(True)
        return self

    # -- sequences --------------------------------------------------------------------------------

    def prompt_ids(self, user_text: str) -> list[int]:
        return chat_prompt_ids(self.tokenizer, user_text)

    def response_ids(self, response: str) -> list[int]:
        return chat_response_ids(self.tokenizer, response)

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        table = self.llm.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=table.weight.device))

    def _sequence(self, feats: torch.Tensor, prompt: list[int], response: list[int], query: bool):
        """Embeddings (L, D) for one row and the positions of the response tokens and the query token."""
        dtype = self.llm.get_input_embeddings().weight.dtype
        image = self.vision_proj(feats.to(self.vision_proj.weight.dtype)).to(dtype)  # (P, D)
        parts = [image, self._embed_ids(prompt)]
        if response:
            parts.append(self._embed_ids(response))
        if query:
            index = torch.zeros(1, dtype=torch.long, device=self.query_token.weight.device)
            parts.append(self.query_token(index).to(dtype))
        seq = torch.cat(parts)
        start = image.shape[0] + len(prompt)
        return seq, start, seq.shape[0] - 1

    @staticmethod
    def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad (B, L, D) + attention mask (B, L)."""
        length = max(s.shape[0] for s in seqs)
        out = seqs[0].new_zeros(len(seqs), length, seqs[0].shape[1])
        mask = torch.zeros(len(seqs), length, dtype=torch.long, device=seqs[0].device)
        for i, s in enumerate(seqs):
            out[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = 1
        return out, mask

    # -- training ---------------------------------------------------------------------------------

    def loss(self, vision_feats: torch.Tensor, user_texts: list[str], responses: list[str],
             clip_targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """``L_LM(response) + λ·MSE(H(h_token), E_clip(y))`` averaged over the batch; returns each term."""
        seqs, labels, queries = [], [], []
        for feats, user, response in zip(vision_feats, user_texts, responses):
            prompt, resp = self.prompt_ids(user), self.response_ids(response)
            seq, start, q = self._sequence(feats, prompt, resp, query=True)
            seqs.append(seq)
            labels.append((start, resp))
            queries.append(q)
        embeds, mask = self._pad(seqs)
        hidden = self.llm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, use_cache=False)
        logits, last = hidden.logits, hidden.hidden_states[-1]
        target = torch.full(mask.shape, -100, dtype=torch.long, device=mask.device)
        for i, (start, resp) in enumerate(labels):
            target[i, start: start + len(resp)] = torch.tensor(resp, device=mask.device)
        # each row's mean over its response tokens, then the mean over rows: every row weighs the same, so the
        # loss of a batch split over N ranks (averaged by the engine) equals the loss of the whole batch on one
        tokens = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1),
                                 ignore_index=-100, reduction="none").view(len(seqs), -1)
        counts = (target[:, 1:] != -100).sum(dim=1).clamp(min=1)
        lm = (tokens.sum(dim=1) / counts).mean()
        h = last[torch.arange(len(queries)), torch.tensor(queries)]
        pred = self.head(h.to(self.head.weight.dtype))
        mse = F.mse_loss(pred.float(), clip_targets.float())
        return {"loss": lm + self.lam * mse, "lm": lm, "mse": mse}

    # -- inference --------------------------------------------------------------------------------

    @torch.no_grad()
    def respond(self, vision_feats: torch.Tensor, user_text: str, max_new_tokens: int = 128) -> tuple[str, torch.Tensor]:
        """Greedy response text and the predicted CLIP embedding (clip_dim,) for one image + user text.

        Decoding is the LLM's own ``generate`` over the input embeddings (its cache, its stopping at EOS). A reply
        cut by ``max_new_tokens`` ends at its last whole word (the cut-off fragment is dropped)."""
        prompt = self.prompt_ids(user_text)
        seq, _, _ = self._sequence(vision_feats, prompt, [], query=False)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = self.llm.generate(inputs_embeds=seq[None], attention_mask=torch.ones(1, seq.shape[0], dtype=torch.long,
                                                                                   device=seq.device),
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                                pad_token_id=pad)[0].tolist()
        finished = tok.eos_token_id in ids
        generated = ids[: ids.index(tok.eos_token_id)] if finished else ids
        response = tok.decode(generated, skip_special_tokens=True).strip()
        if not finished and " " in response:
            response = response.rsplit(" ", 1)[0].rstrip()
        full, _, q = self._sequence(vision_feats, prompt, self.response_ids(response), query=True)
        last = self.llm(inputs_embeds=full[None], output_hidden_states=True).hidden_states[-1]
        pred = self.head(last[0, q].to(self.head.weight.dtype))
        return response, F.normalize(pred.float(), dim=-1)

    # -- weights ----------------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().contiguous() for n, p in self.trainable_named_parameters().items()}

    def save_trainable(self, out: str | os.PathLike, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state(), str(out / MLLM_WEIGHTS))
        (out / MLLM_CONFIG).write_text(json.dumps({**self.config, "lam": self.lam, **(extra or {})}, indent=2))

    def load_trainable(self, path: str | os.PathLike) -> None:
        from safetensors.torch import load_file

        from training.models.kit import _check_safetensors

        d = Path(path)
        _check_safetensors("mllm", d / MLLM_WEIGHTS)
        cfg = json.loads((d / MLLM_CONFIG).read_text())
        for key in ("vision_width", "clip_dim", "llm_hidden"):
            if cfg.get(key) != self.config[key]:
                raise ValueError(f"MLLM weights at {d}: {key} {cfg.get(key)} != model's {self.config[key]}")
        state = load_file(str(d / MLLM_WEIGHTS))
        own = self.trainable_named_parameters()
        if set(state) != set(own):
            raise ValueError(f"MLLM weights at {d}: tensors {sorted(state)} != expected {sorted(own)}")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(state[n].to(p.dtype))
