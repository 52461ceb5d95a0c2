"""Validation of prompts and EOS ids, shared by target-only and speculative sampling.

A prompt batch is a LongTensor [B, L] (every row a full prompt: no padding is guessed) or a
list of 1-D sequences of different lengths. A genuine token id 0 is a token, never padding.
"""

from __future__ import annotations

import torch


def normalize_prompts(input_ids, vocab_size: int, batch_size: int, sequence_length: int, n_positions: int) -> list[torch.Tensor]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L] or a list of 1-D sequences, got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        prompts = [row.detach().to("cpu", torch.long) for row in input_ids]
    elif isinstance(input_ids, (list, tuple)):
        prompts = []
        for i, row in enumerate(input_ids):
            t = torch.as_tensor(row)
            if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
                raise TypeError(f"prompt {i} must be a 1-D sequence of integer token ids")
            prompts.append(t.to(torch.long))
    else:
        raise TypeError(f"input_ids must be a LongTensor or a list of sequences, got {type(input_ids).__name__}")
    if not prompts:
        raise ValueError("empty batch: no prompts given")
    if len(prompts) > batch_size:
        raise ValueError(f"batch of {len(prompts)} prompts exceeds batch_size={batch_size} given to from_pretrained")
    if isinstance(sequence_length, bool) or not isinstance(sequence_length, int):
        raise TypeError(f"sequence_length must be an int, got {sequence_length!r}")
    if sequence_length > n_positions:
        raise ValueError(f"sequence_length={sequence_length} is longer than n_positions={n_positions}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every row needs at least one token")
        if len(p) > sequence_length:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than sequence_length={sequence_length}")
        lo, hi = int(p.min()), int(p.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"prompt {i} holds token id {lo if lo < 0 else hi} outside the vocabulary [0, {vocab_size})")
    return prompts


def validate_eos(eos_token_id, vocab_size: int) -> frozenset:
    if eos_token_id is None:
        return frozenset()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for e in ids:
        if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < vocab_size:
            raise ValueError(f"eos_token_id {e!r} is not a token id in [0, {vocab_size})")
    return frozenset(ids)
