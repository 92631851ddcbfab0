"""Perplexity of a causal language model on a stream of token ids."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_windows(token_ids: torch.Tensor, seq_len: int, max_seqs: int) -> torch.Tensor:
    """Cut a 1-D token stream into at most ``max_seqs`` non-overlapping rows of ``seq_len``."""
    n_seqs = min(max_seqs, token_ids.numel() // seq_len)
    if n_seqs == 0:
        raise ValueError(f"need at least {seq_len} tokens, got {token_ids.numel()}")
    return token_ids[: n_seqs * seq_len].reshape(n_seqs, seq_len)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, token_ids: torch.Tensor, seq_len: int, max_seqs: int, batch_size: int = 16
) -> float:
    """Return exp(mean next-token NLL) over the first ``max_seqs`` windows of ``token_ids``.

    Each window is scored independently; its first token has no prediction, so
    ``seq_len - 1`` tokens per window count. Logits are upcast to float32.
    """
    windows = token_windows(token_ids.flatten().long(), seq_len, max_seqs)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_nll / total_tokens)
