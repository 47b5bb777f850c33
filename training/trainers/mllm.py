"""Recipe: CAFE's MLLM (SPEC §2): only V, H and the learnable token train; the LLM and the vision tower are
frozen in their role dtypes. Loss ``L_LM(response) + λ·MSE(H(h), E_clip(y))`` (:class:`CafeMLLM`)."""
from __future__ import annotations

import torch
from torch import nn

from training.data import schema
from training.models.mllm import CafeMLLM
from training.trainers.base import Recipe, batch_features, condition_dims, load, load_encoders, texts

WANT = ("vision_input", "clip_target")


class MLLMModule(nn.Module):
    def __init__(self, mllm: CafeMLLM):
        super().__init__()
        self.mllm = mllm

    def forward(self, vision_feats, user_texts, responses, clip_targets):
        return self.mllm.loss(vision_feats, user_texts, responses, clip_targets)


class MLLMRecipe(Recipe):
    name = "mllm"
    features = WANT

    def setup(self, device: str = "cpu", encoders: bool = True, zero3_config: dict | None = None) -> "MLLMRecipe":
        if zero3_config is not None:
            # the frozen LLM loads under deepspeed.zero.Init (transformers' HfDeepSpeedConfig switch): partitioned
            # over the workers as it is read, so a 13B model is never whole on one worker. Only the LLM: the
            # encoders run outside the engine and must stay whole.
            from transformers.integrations import HfDeepSpeedConfig

            switch = HfDeepSpeedConfig(zero3_config)
            try:
                llm = load("llm", self.roles["llm"], device)
            finally:
                del switch
        else:
            llm = load("llm", self.roles["llm"], device)
        self.encoders = load_encoders(self.roles, device, WANT, select_layer=self.section.select_layer) \
            if encoders else None
        vision_width, clip_dim = self._dims()
        with torch.random.fork_rng(devices=[]):  # V and H initialise the same on every worker and every run
            torch.manual_seed(0)
            mllm = CafeMLLM(llm.components.model, llm.components.tokenizer, vision_width, clip_dim, self.section.lam)
        if getattr(self.section, "init_from", None):  # continue from exported V and H (a local directory)
            mllm.load_trainable(self.section.init_from)
        self.module = MLLMModule(mllm.freeze_base().to(device))
        if getattr(self.section, "gradient_checkpointing", False):
            enable = getattr(mllm.llm, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # transformers < 5.x's name
                mllm.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return self

    def _dims(self) -> tuple[int, int]:
        if self.encoders is not None:
            return self.encoders.vision_width, self.encoders.clip_dim
        dims = condition_dims(self.roles)
        return dims["vision_width"], dims["clip_dim"]

    def module_train_mode(self, module) -> None:
        module.train()
        module.mllm.llm.eval()  # frozen: no dropout
        # transformers checkpoints a layer only in training mode: the checkpointed layers themselves (not their
        # children, which keep dropout off) say "training" so that the frozen LLM's activations are recomputed
        from transformers.modeling_layers import GradientCheckpointingLayer

        for m in module.mllm.llm.modules():
            if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
                m.training = True

    def prepare(self, batch: dict, epoch: int, seed: int) -> dict:
        feats = batch_features(batch, self.encoders, WANT)
        dev = next(self.module.parameters()).device
        return {"vision_feats": feats["vision_input"].to(dev), "user_texts": texts(batch[schema.USER_TEXT]),
                "responses": texts(batch[schema.ASSISTANT_TEXT]), "clip_targets": feats["clip_target"].to(dev)}

    def save_weights(self, module, out) -> None:
        module.mllm.save_trainable(out, extra={"llm": self.roles["llm"].path,
                                               "select_layer": self.section.select_layer})
