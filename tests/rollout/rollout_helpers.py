"""Helpers of the rollout-engine tests, imported as ``rollout_helpers`` (pytest puts this folder on
sys.path): a tiny Qwen2 LM with varied greedy output, chat prompts as embeddings, and the trainer-side
log-probs the engines must reproduce."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

from qoq.models.builders import TinyLM

PROMPTS = ("the patient has", "no finding in the chest x-ray", "ecg")


def tiny_lm(seed: int = 0) -> tuple[torch.nn.Module, object]:
    """A ~115k-parameter Qwen2 (hidden 64, 2 layers, head_dim 32, vocab 512, tied embeddings) + tokenizer.

    Matrices are redrawn at std 0.15 (HF's init is 0.02), so greedy continuations vary from token to token
    and token-for-token comparisons between engines mean something.
    """
    model, tokenizer = TinyLM(
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=512,
        seed=seed,
    ).build()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.15, generator=generator)
    return model.eval(), tokenizer


def chat_embeds(model: torch.nn.Module, tokenizer, texts: Sequence[str] = PROMPTS) -> list[Tensor]:
    """ChatML user turns (with the assistant header) embedded by the model: one ``[L_i, H]`` per text."""
    embedding = model.get_input_embeddings()
    out = []
    for text in texts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        out.append(embedding(torch.tensor(ids)).detach())
    return out


@torch.no_grad()
def trainer_logprobs(
    model: torch.nn.Module, prompt: Tensor, ids: Tensor, temperature: float, suppress: Sequence[int] = ()
) -> Tensor:
    """What a trainer computes: ``log_softmax(logits / T)`` of ``ids [R]`` after ``prompt [L, H]`` -> ``[R]``.

    Suppressed ids are masked to ``-inf`` (the sampling distribution); ``temperature=0`` means 1.
    """
    inputs = torch.cat([prompt, model.get_input_embeddings()(ids)])[None]  # [1, L + R, H]
    logits = model(inputs_embeds=inputs).logits[
        0, prompt.shape[0] - 1 : prompt.shape[0] - 1 + len(ids)
    ]  # [R, V]
    if suppress:
        logits[:, list(suppress)] = float("-inf")
    logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return logp.gather(-1, ids[:, None])[:, 0]


def max_logprob_gap(model, prompts, batch, temperature: float, suppress: Sequence[int] = ()) -> float:
    """Largest |engine - trainer| log-prob over the real tokens of a rollout batch."""
    gap = 0.0
    for row in range(len(batch)):
        real = batch.response_mask[row]
        ids = batch.response_ids[row, real]
        if len(ids) == 0:
            continue
        want = trainer_logprobs(model, prompts[int(batch.prompt_index[row])], ids, temperature, suppress)
        gap = max(gap, (batch.engine_logprobs[row, real] - want).abs().max().item())
    return gap


@contextlib.contextmanager
def favouring(model: torch.nn.Module, prompts: Sequence[Tensor], token_id: int, margin: float):
    """Make ``token_id`` the first response token of every prompt by ``margin`` logits over the others.

    The model's embeddings are tied to its LM head: the token's row is set (least squares) so that its
    logit after each prompt's last position is the largest other logit plus ``margin``; restored on exit.
    """
    head = model.get_input_embeddings().weight  # [V, H], also the LM head
    saved = head[token_id].clone()
    with torch.no_grad():
        hidden = torch.stack([model.model(inputs_embeds=p[None]).last_hidden_state[0, -1] for p in prompts])  # [P, H]
        logits = hidden @ head.T  # [P, V]
        logits[:, token_id] = float("-inf")
        want = logits.max(-1).values + margin  # [P]
        head[token_id] = torch.linalg.lstsq(hidden, want[:, None]).solution[:, 0]
    try:
        yield
    finally:
        with torch.no_grad():
            head[token_id] = saved
