"""DCI — Divide, Conquer, then Integrate (SPEC §4.2): two-branch sampling with DBIM aggregation.

Usage::

    image = sample_dci(t2i, concept, "a <new1> <new2> <new3> circle on a beach", seed=0, params=DciParams(lam=0.5))

The auxiliary prompt replaces ``"V <noun>"`` (:func:`~training.methods.ico.concept_phrase`) by an auxiliary noun
(given, else the first of ``aux_nouns`` that differs from the concept's noun). While
``t > (1 − agg_time) · num_train_timesteps`` (1000 → t > 700 by default) one UNet call runs on
``latents [x, x, x_aux]`` with conditions ``[uncond, c_concept, c_aux]`` (``share_guidance``; otherwise
``[x, x, x_aux, x_aux]`` / ``[uncond, c, uncond, c_aux]``) and the DBIM processor
(:mod:`training.attention.dbim`) integrates the auxiliary branch's attention output into the concept row of
every ``attn2``; guidance is applied to the raw outputs of each branch, and each branch takes its own
``scheduler.step``. After the threshold the auxiliary branch is dropped and sampling is plain ICO sampling.

Random draws: the concept branch uses ``torch.Generator().manual_seed(seed)`` exactly as
:func:`training.methods.ico.sample` does for that seed; the auxiliary branch draws its initial latent and its
DDIM noise from its **own** generator seeded with :func:`aux_seed` (``numpy.random.SeedSequence((seed, 0xDC1))``
— a seed that does not coincide with ``seed ± k`` of neighbouring jobs). So λ = −∞ reproduces single-branch
sampling of the same seed. Measured on CPU in float32: with ``share_guidance`` the final latents are
bit-identical (``torch.equal``); without it the DCI steps run 4 UNet rows instead of 2 and the first op that
differs is the time-embedding ``Linear`` (a GEMM with M = 4 rows rounds differently from M = 2), so the latents
agree only to ~1e-5 (world t2i) – 4e-4 (tiny t2i). Exactness therefore rests on the batch-size invariance of
the backend's kernels, which holds for 2 vs 3 rows on this CPU; it is not guaranteed on other hardware.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from training.methods.params import DciParams  # noqa: F401  (re-exported)
from training.attention.dbim import DbimAttnProcessor, DbimConfig
from training.attention.ico import installed_processors
from training.methods.ico import (IcoConcept, concept_phrase, decode_latents, encode_prompts, guided,
                                  inference_prompt_ids, initial_latents, make_scheduler)

_AUX_SEED_TAG = 0xDC1


def aux_seed(seed: int) -> int:
    """The auxiliary branch's generator seed, derived from the job seed."""
    return int(np.random.SeedSequence((int(seed), _AUX_SEED_TAG)).generate_state(1)[0])


def _phrase_at(prompt: str, concept: IcoConcept) -> int:
    phrase = concept_phrase(concept)
    count = prompt.count(phrase)
    if count != 1:
        raise ValueError(f"prompt: {prompt!r} contains the concept phrase {phrase!r} {count} times; allowed: once")
    return prompt.index(phrase)


def auxiliary_prompt(prompt: str, concept: IcoConcept, aux_noun: str | None,
                     aux_nouns: Sequence[str]) -> tuple[str, str]:
    """p_a = ``prompt`` with ``"V <noun>"`` replaced by the auxiliary noun; returns ``(p_a, aux noun used)``."""
    at = _phrase_at(prompt, concept)
    if aux_noun is None:
        choices = [n for n in aux_nouns if n != concept.noun]
        if not choices:
            raise ValueError(f"aux_nouns: {tuple(aux_nouns)} has no noun different from {concept.noun!r}")
        aux_noun = choices[0]
    if not aux_noun.strip():
        raise ValueError(f"aux_noun: {aux_noun!r}; allowed: a non-empty noun")
    return prompt[:at] + aux_noun + prompt[at + len(concept_phrase(concept)):], aux_noun


def token_sets(tokenizer, concept_prompt: str, aux_prompt: str, concept: IcoConcept,
               aux_noun: str) -> tuple[list[int], list[int], list[int]]:
    """``(T_c, T_a, aux-noun positions)`` as token positions (SOS is position 0; EOS/padding excluded).

    T_c = the V slots and the noun's tokens in the concept prompt; T_a = every real token of the auxiliary
    prompt except the auxiliary noun's. Positions come from tokenizing the text before the concept phrase, so
    padding equal to EOS is never confused with a token.
    """
    at = _phrase_at(concept_prompt, concept)
    before = len(tokenizer(concept_prompt[:at], add_special_tokens=False).input_ids) if concept_prompt[:at].strip() \
        else 0
    n_new = len(concept.tokens)
    noun_ids = tokenizer(concept.noun, add_special_tokens=False).input_ids
    aux_ids = tokenizer(aux_noun, add_special_tokens=False).input_ids
    lay_c = inference_prompt_ids(tokenizer, concept_prompt, concept.tokens)
    t_c = list(range(1 + before, 1 + before + n_new + len(noun_ids)))
    if list(lay_c.new) != t_c[:n_new] or lay_c.ids[t_c[n_new:]].tolist() != list(noun_ids):
        raise ValueError(f"prompt: {concept_prompt!r} does not tokenize as '… V <noun> …' at word boundaries")
    lay_a = inference_prompt_ids(tokenizer, aux_prompt)
    aux = list(range(1 + before, 1 + before + len(aux_ids)))
    if lay_a.ids[aux].tolist() != list(aux_ids):
        raise ValueError(f"aux_prompt: {aux_prompt!r} does not hold {aux_noun!r} where the concept phrase was")
    t_a = [j for j in range(1, lay_a.eos) if j not in aux]
    return t_c, t_a, aux


def _real(eos: int, length: int) -> torch.Tensor:
    real = torch.zeros(length, dtype=torch.bool)
    real[1:eos] = True
    return real


def sample_dci(t2i, concept: IcoConcept, prompt: str, seed: int, params: DciParams, aux_noun: str | None = None,
               device: str | torch.device = "cpu") -> np.ndarray:
    """One DCI image (H, W, 3) uint8 of the concept branch for ``prompt`` (which must contain ``V <noun>``)."""
    return sample_dci_batch(t2i, concept, prompt, [seed], params, aux_noun, device)[0]


@torch.no_grad()
def sample_dci_batch(t2i, concept: IcoConcept, prompt: str, seeds: Sequence[int], params: DciParams,
                     aux_noun: str | None = None, device: str | torch.device = "cpu") -> list[np.ndarray]:
    """DCI images of ``prompt`` for every seed in one sampling run: B seeds make one UNet call of 3B rows per DCI
    step (``[uncond]*B, [concept]*B, [aux]*B``; 4B without ``share_guidance``) and 2B after it. Row b draws from
    the generators of ``seeds[b]`` exactly as a run of that seed alone does; the result equals the seed run alone
    up to the backend's batch-size rounding (see the module docstring)."""
    device = torch.device(device)
    seeds = [int(v) for v in seeds]
    b = len(seeds)
    if b == 0:
        return []
    tokenizer, unet = t2i.tokenizer, t2i.unet
    p_a, aux = auxiliary_prompt(prompt, concept, aux_noun, params.aux_nouns)
    t_c, _, aux_idx = token_sets(tokenizer, prompt, p_a, concept, aux)
    length = tokenizer.model_max_length
    rows = lambda k: tuple(range(k * b, (k + 1) * b))  # noqa: E731 - the k-th block of b rows
    config = DbimConfig(concept_rows=rows(1), aux_rows=rows(2) if params.share_guidance else rows(3),
                        concept_real=_real(inference_prompt_ids(tokenizer, prompt, concept.tokens).eos, length),
                        aux_real=_real(inference_prompt_ids(tokenizer, p_a).eos, length),
                        concept_tokens=tuple(t_c), aux_noun_tokens=tuple(aux_idx), lam=float(params.lam))

    sched = make_scheduler(t2i)
    sched.set_timesteps(int(params.steps))
    threshold = (1.0 - params.agg_time) * sched.config.num_train_timesteps
    gens = [torch.Generator().manual_seed(v) for v in seeds]
    gens_aux = [torch.Generator().manual_seed(aux_seed(v)) for v in seeds]
    x = initial_latents(unet, gens, device, sched.init_noise_sigma)  # (B, C, h, w)
    x_aux = initial_latents(unet, gens_aux, device, sched.init_noise_sigma)
    cond = encode_prompts(t2i, concept, [prompt], device).to(unet.dtype).expand(b, -1, -1)  # (B, L, D)
    cond_a = encode_prompts(t2i, concept, [p_a], device).to(unet.dtype).expand(b, -1, -1)
    uncond = encode_prompts(t2i, concept, [""], device).to(unet.dtype).expand(b, -1, -1)
    layers = concept.processors_for(unet, device)
    dbim = {name: DbimAttnProcessor(config, kv=layer) for name, layer in layers.items()}
    s = params.guidance
    with installed_processors(unet, layers):
        for t in sched.timesteps:
            if float(t) > threshold:  # DCI step: both branches in one call, DBIM on
                with installed_processors(unet, dbim):
                    if params.share_guidance:
                        out_u, out_c, out_a = unet(torch.cat([x, x, x_aux]), t,
                                                   encoder_hidden_states=torch.cat([uncond, cond, cond_a])
                                                   ).sample.chunk(3)
                        out_ua = out_u
                    else:
                        out_u, out_c, out_ua, out_a = unet(torch.cat([x, x, x_aux, x_aux]), t,
                                                           encoder_hidden_states=torch.cat([uncond, cond, uncond,
                                                                                            cond_a])).sample.chunk(4)
                x_aux = sched.step(guided(out_ua, out_a, s), t, x_aux, eta=params.eta, generator=gens_aux).prev_sample
            else:  # the auxiliary branch is dropped
                out_u, out_c = unet(torch.cat([x, x]), t,
                                    encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            x = sched.step(guided(out_u, out_c, s), t, x, eta=params.eta, generator=gens).prev_sample
    return decode_latents(t2i.vae, x)
