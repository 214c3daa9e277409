"""Per-token log-probabilities of responses given prompt embeddings, by two equal computations.

- **shared prompts** (:func:`shared_prompt_logits`): each prompt that a response refers to runs once,
  right-padded, with an attention mask and explicit positions (its last token left out), keeping its KV
  cache; the cache is repeated to the ``N`` rows (``prompt_index``); then one forward over
  ``[last prompt token ; response[:-1]]`` per row at positions ``L_i - 1 ... L_i + R - 2`` on that cache
  gives the ``R`` logits of each response. Gradients flow through the repeated cache into the prompt pass
  (and the prompt embeddings). A group of ``n`` responses thus costs its prompt once instead of ``n`` times.
- **per row** (:func:`per_row_logits`, and the fallback for LMs whose cache is not a plain
  ``DynamicCache``, e.g. sliding-window or linear-attention layers, or when the LM returns no cache, e.g.
  under gradient checkpointing): row n is ``[prompt_embeds[prompt_index[n]] ; embed(response_ids[n])]``,
  right-padded, in one batched forward; every row starts at position 0 and all padding comes after its real
  tokens, so causal attention alone is exact.

The two agree to ~1e-6 in fp32. Only the logits at positions that predict a response token are computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence


def response_logprobs(
    lm: nn.Module,
    prompt_embeds: Sequence[Tensor],
    response_ids: Tensor,
    response_mask: Tensor,
    prompt_index: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    share_prompts: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probabilities of responses given their prompts (see the module docs).

    Args:
        lm: the HF causal LM (a peft model under LoRA).
        prompt_embeds: P prompt embeddings ``[L_i, H]`` (``L_i >= 1``); prompts no row refers to are not run.
        response_ids: ``[N, R]`` long, right-padded.
        response_mask: ``[N, R]`` bool, True on real response tokens.
        prompt_index: ``[N]`` long, the prompt of each response.
        temperature: logits are divided by it before the softmax (as the sampler did).
        with_entropy: also return the entropy of each position's distribution.
        share_prompts: run each prompt once (:func:`shared_prompt_logits`); False: one row per response.

    Returns:
        ``logp [N, R]`` float32 (``log_softmax(logits / temperature)`` at the response tokens), and
        ``entropy [N, R]`` float32 or None; both 0 where ``response_mask`` is False.
    """
    logits = None
    if share_prompts and response_ids.shape[1] > 0:
        logits = shared_prompt_logits(lm, prompt_embeds, response_ids, prompt_index)
    if logits is None:
        logits = per_row_logits(lm, prompt_embeds, response_ids, prompt_index)
    return token_logprobs(logits, response_ids, response_mask.bool(), temperature, with_entropy)


def shared_prompt_logits(
    lm: nn.Module, prompt_embeds: Sequence[Tensor], response_ids: Tensor, prompt_index: Tensor
) -> Tensor | None:
    """Response logits ``[N, R, V]`` with each used prompt run once (None: the LM's cache cannot be shared)."""
    from transformers.cache_utils import DynamicLayer

    if getattr(lm, "is_gradient_checkpointing", False) and lm.training:
        return None  # transformers turns the cache off under gradient checkpointing
    n, r = response_ids.shape
    device = response_ids.device
    used, local = torch.unique(prompt_index, return_inverse=True)  # [U] sorted, [N] row -> used prompt
    prompts = [prompt_embeds[i] for i in used.tolist()]
    lengths = torch.tensor([len(e) for e in prompts], device=device)  # [U]
    if int(lengths.min()) < 1:
        raise ValueError("response_logprobs: an empty prompt (every prompt needs >= 1 embedding)")
    response_embeds = lm.get_input_embeddings()(response_ids[:, :-1])  # [N, R-1, H]: the last is no input
    dtype = response_embeds.dtype
    last = torch.stack([e[-1] for e in prompts]).to(dtype)  # [U, H]
    width = int(lengths.max()) - 1  # prefix (prompt minus its last token) width W
    cache = None
    prefix_mask = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)  # [U, W]
    if width > 0:
        prefix = pad_sequence([e[:-1].to(dtype) for e in prompts], batch_first=True)  # [U, W, H]
        prefix_mask = torch.arange(width, device=device)[None] < (lengths - 1)[:, None]  # [U, W]
        # a one-token prompt has an empty prefix: its first (padding) slot is attended in this pass only,
        # so that row stays finite; the response pass masks it
        attend = prefix_mask.clone()
        attend[:, 0] = True
        out = lm(
            inputs_embeds=prefix,
            attention_mask=attend.long(),
            position_ids=torch.arange(width, device=device).expand(len(prompts), -1),
            use_cache=True,
            logits_to_keep=1,  # no logits needed; 0 would mean "all" in transformers
        )
        cache = out.past_key_values
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            return None  # no cache (gradient checkpointing), or layers that cannot be repeated exactly
        cache.batch_select_indices(local)  # [N, heads, W, d] per layer; differentiable indexing
    inputs = torch.cat([last[local][:, None], response_embeds], dim=1)  # [N, R, H]
    positions = (lengths[local] - 1)[:, None] + torch.arange(r, device=device)  # [N, R]
    mask = torch.cat([prefix_mask[local], torch.ones(n, r, dtype=torch.bool, device=device)], dim=1)
    return lm(
        inputs_embeds=inputs,
        attention_mask=mask.long(),  # [N, W + R]: prefix padding masked; response padding trails
        position_ids=positions,
        past_key_values=cache,
        use_cache=cache is not None,
    ).logits  # [N, R, V]


def per_row_logits(
    lm: nn.Module, prompt_embeds: Sequence[Tensor], response_ids: Tensor, prompt_index: Tensor
) -> Tensor:
    """Response logits ``[N, R, V]`` with one ``[prompt ; response]`` row per response."""
    n, r = response_ids.shape
    index = prompt_index.tolist()
    lengths = torch.tensor([prompt_embeds[i].shape[0] for i in index], device=response_ids.device)  # [N]
    response_embeds = lm.get_input_embeddings()(response_ids)  # [N, R, H]
    rows = [
        torch.cat([prompt_embeds[i].to(response_embeds.dtype), response_embeds[k]]) for k, i in enumerate(index)
    ]
    inputs = pad_sequence(rows, batch_first=True)  # [N, max L + R, H]
    lo, hi = int(lengths.min()), int(lengths.max())
    keep = torch.arange(lo - 1, hi + r - 1, device=inputs.device)  # positions predicting a response token
    logits = lm(inputs_embeds=inputs, logits_to_keep=keep, use_cache=False).logits  # [N, K, V]
    offsets = (lengths - lo)[:, None] + torch.arange(r, device=inputs.device)  # [N, R]
    return logits.gather(1, offsets[..., None].expand(-1, -1, logits.shape[-1]))  # [N, R, V]


def token_logprobs(
    logits: Tensor, response_ids: Tensor, mask: Tensor, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """``log_softmax(logits / temperature)`` at the response tokens ``[N, R]`` (and the entropy), 0 off ``mask``."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)  # [N, R, V]
    logp = logprobs.gather(-1, response_ids[..., None]).squeeze(-1).masked_fill(~mask, 0.0)  # [N, R]
    entropy = None
    if with_entropy:
        entropy = -(logprobs.exp() * logprobs).sum(-1).masked_fill(~mask, 0.0)  # [N, R]
    return logp, entropy


__all__ = ["per_row_logits", "response_logprobs", "shared_prompt_logits", "token_logprobs"]
