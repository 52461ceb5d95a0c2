"""Prompt preparation and EOS validation: the one path every sampler and every prefill takes.

A prompt batch is a LongTensor [B, L] (every row a full prompt: no padding is guessed) or a
list of 1-D sequences of different lengths. A genuine token id 0 is a token, never padding.
:func:`prepare_prompts` validates a batch for a run; :func:`pad_prompts` right-pads one for a
prefill pass.
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


def prompt_lengths(prompts) -> torch.Tensor:  # [B] int64
    """Lengths of a list of 1-D prompts, or of the rows of a [B, L] tensor of full-length prompts."""
    if isinstance(prompts, torch.Tensor):
        return torch.full((len(prompts),), prompts.shape[1], dtype=torch.long)
    return torch.tensor([len(p) for p in prompts], dtype=torch.long)


def pad_prompts(prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (right-padded [B, L_max] int64 with zeros past each prompt, lengths [B] int64). A [B, L]
    tensor is returned as is (on the CPU, int64), so 10^5 identical prompts cost no per-row Python."""
    lengths = prompt_lengths(prompts)
    if isinstance(prompts, torch.Tensor):
        return prompts.detach().to("cpu", torch.long), lengths
    padded = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = p
    return padded, lengths


def prepare_prompts(input_ids, vocab_size: int, batch_size: int, sequence_length: int, n_positions: int):
    """Validate prompts for a run -> (prompts for prefill, padded [B, L_max] int64, lengths [B] int64).

    A [B, L] tensor (every row a full prompt) is checked with tensor ops and handed to prefill as
    is; a list may be ragged (its prompts are 1-D int64 tensors).
    """
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and len(input_ids) > 1:
        normalize_prompts(input_ids[:1], vocab_size, batch_size, sequence_length, n_positions)  # shape/dtype/length
        if len(input_ids) > batch_size:
            raise ValueError(f"batch of {len(input_ids)} prompts exceeds batch_size={batch_size} of the models")
        ids = input_ids.detach().to("cpu", torch.long)
        bad = ((ids < 0) | (ids >= vocab_size)).any(1).nonzero()
        if bad.numel():
            raise ValueError(f"prompt {int(bad[0, 0])} holds a token id outside the vocabulary [0, {vocab_size})")
        return (ids, *pad_prompts(ids))
    prompts = normalize_prompts(input_ids, vocab_size, batch_size, sequence_length, n_positions)
    return (prompts, *pad_prompts(prompts))
