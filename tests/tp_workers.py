"""Per-rank bodies of the tensor-parallel tests, run by ``verispec.parallel.launch.run_ranks``.

Each function runs in a fresh process with torchrun's environment and returns plain data (or
tensors) for the test to check; nothing is asserted here.
"""

from __future__ import annotations

import os
import time
import traceback

import torch

N_POS = 64
LENS = [11, 4, 7]  # a ragged batch: every row at its own position


from verispec.bench.tp import _param_bytes  # noqa: E402  one definition of "bytes of parameters"


def _prompts(vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n + 6,), generator=g) for n in LENS]


def sharded_vs_unsharded(rank: int, world: int, cases: dict) -> dict:
    """For each tiny checkpoint: logits of tp_degree=world vs tp_degree=1 (prefill, verify,
    decode with a ragged batch), local shapes, and greedy/sampled generations."""
    from verispec.model import LlamaForSampling

    out = {}
    for name, path in cases.items():
        ref = LlamaForSampling.from_pretrained(path, n_positions=N_POS, batch_size=3)
        tp = LlamaForSampling.from_pretrained(path, n_positions=N_POS, batch_size=3, tp_degree=world)
        seqs = _prompts(ref.vocab_size)
        res = {"rank": rank}
        prompts = [s[:n] for s, n in zip(seqs, LENS)]
        res["prefill"] = (ref.prefill(prompts) - tp.prefill(prompts)).abs().max().item()
        block = torch.stack([s[n : n + 4] for s, n in zip(seqs, LENS)])  # [3, 4] a k=4 verify pass
        pos = torch.tensor(LENS)
        a, b = ref.forward(block, pos), tp.forward(block, pos)  # [3, 4, V]
        res["verify"] = (a - b).abs().max().item()
        res["logits_shape"] = tuple(b.shape)
        step = torch.stack([s[n + 4 : n + 5] for s, n in zip(seqs, LENS)])  # [3, 1]
        res["decode"] = (ref.forward(step, pos + 4) - tp.forward(step, pos + 4)).abs().max().item()
        res["verify_logits"] = b  # to compare ranks with each other

        attn = tp.decoder.model.layers[0].self_attn
        res["local"] = {
            "n_heads": attn.n_heads,
            "n_kv_heads": attn.n_kv_heads,
            "q_rows": attn.q_proj.weight.shape[0],
            "k_rows": attn.k_proj.weight.shape[0],
            "down_cols": tp.decoder.model.layers[0].mlp.down_proj.weight.shape[1],
            "embed_rows": tp.decoder.model.embed_tokens.weight.shape[0],
            "lm_head_shares_embedding": tp.decoder.lm_head.weight is tp.decoder.model.embed_tokens.weight,
            "cache_kv_heads": tp.cache.k[0].shape[1],
            "kv_heads": tp.tp.kv_heads,
        }
        res["param_bytes"] = {"tp": _param_bytes(tp), "full": _param_bytes(ref)}

        res["greedy_tp1"] = ref.sample(prompts, 24, temperature=0).tolist()
        res["greedy_tp"] = tp.sample(prompts, 24, temperature=0).tolist()
        # each rank seeds differently: only the broadcast of rank 0's tokens makes them agree
        res["sampled_tp"] = tp.sample(prompts, 24, temperature=1.0, seed=100 + rank).tolist()
        res["sampled_tp1_seed0"] = ref.sample(prompts, 24, temperature=1.0, seed=100).tolist()
        # a tp_degree=1 model in a tensor-parallel job (a replicated draft) also takes rank 0's tokens
        res["sampled_replicated"] = ref.sample(prompts, 24, temperature=1.0, seed=200 + rank).tolist()
        out[name] = res
    return out


def mapping_functions(rank: int, world: int) -> dict:
    """The four mapping functions (forward and backward) and the layers against full tensors."""
    import torch.nn.functional as F

    from verispec.parallel import (
        ColumnParallelLinear,
        ParallelEmbedding,
        RowParallelLinear,
        copy_to_tensor_model_parallel_region,
        gather_from_tensor_model_parallel_region,
        initialize_model_parallel,
        reduce_from_tensor_model_parallel_region,
        scatter_to_tensor_model_parallel_region,
    )

    initialize_model_parallel(world)
    g = torch.Generator().manual_seed(7)  # the same full tensors on every rank
    x = torch.randn(2, 3, 10, generator=g)  # [B, T, in]
    w_col = torch.randn(7, 10, generator=g)  # [out=7 (uneven over 2 ranks), in]
    b_col = torch.randn(7, generator=g)
    w_row = torch.randn(5, 10, generator=g)  # [out, in=10]
    b_row = torch.randn(5, generator=g)
    table = torch.randn(9, 4, generator=g)  # [V=9, E]
    ids = torch.tensor([[0, 8, 4], [5, 1, 7]])
    res = {}

    col = ColumnParallelLinear(10, 7, bias=True, gather_output=True, output_sizes=[4, 3])
    col.load_full_weight(w_col, b_col)
    res["column_gather"] = (col(x) - F.linear(x, w_col, b_col)).abs().max().item()
    res["column_local_rows"] = col.weight.shape[0]
    row = RowParallelLinear(10, 5, bias=True, input_is_parallel=False)
    row.load_full_weight(w_row, b_row)
    res["row_scatter"] = (row(x) - F.linear(x, w_row, b_row)).abs().max().item()
    w_mid = torch.randn(10, 10, generator=g)  # [out, in]
    col_even = ColumnParallelLinear(10, 10, bias=False, gather_output=False)
    col_even.load_full_weight(w_mid)
    row_par = RowParallelLinear(10, 5, bias=False, input_is_parallel=True)
    row_par.load_full_weight(w_row)
    full_mlp = F.linear(F.linear(x, w_mid), w_row)
    res["column_then_row"] = (row_par(col_even(x)) - full_mlp).abs().max().item()
    emb = ParallelEmbedding(9, 4)
    emb.load_full_weight(table)
    res["embedding"] = (emb(ids) - F.embedding(ids, table)).abs().max().item()
    try:
        emb(torch.tensor([[9]]))
        res["embedding_out_of_range"] = None
    except IndexError as e:
        res["embedding_out_of_range"] = str(e)

    # mapping functions with gradients: d/dx sum(f(x) * c) for a rank-dependent c
    c = torch.arange(1.0, 5.0) * (rank + 1)  # [4]
    x1 = torch.full((4,), float(rank + 1), requires_grad=True)
    y = reduce_from_tensor_model_parallel_region(x1)
    (y * c).sum().backward()
    res["reduce_fwd"], res["reduce_grad"] = y.tolist(), x1.grad.tolist()
    x2 = torch.ones(4, requires_grad=True)
    (copy_to_tensor_model_parallel_region(x2) * c).sum().backward()
    res["copy_grad"] = x2.grad.tolist()
    x3 = torch.arange(4.0, requires_grad=True)
    s = scatter_to_tensor_model_parallel_region(x3)
    (s * (rank + 1)).sum().backward()
    res["scatter_fwd"], res["scatter_grad"] = s.tolist(), x3.grad.tolist()
    x4 = torch.full((2,), float(rank), requires_grad=True)
    gat = gather_from_tensor_model_parallel_region(x4)
    (gat * torch.arange(1.0, 5.0)).sum().backward()
    res["gather_fwd"], res["gather_grad"] = gat.tolist(), x4.grad.tolist()
    return res


def tp_degree_vs_world(rank: int, world: int, path: str, tp_degree: int) -> str:
    from verispec.model import LlamaForSampling

    LlamaForSampling.from_pretrained(path, n_positions=N_POS, tp_degree=tp_degree)
    return "loaded"


def peer_failure(rank: int, world: int, path: str, how: str) -> dict:
    """Rank 1 dies (``how='exit'``) or stops answering (``how='hang:SECONDS'``) during generation;
    the result is what rank 0 saw, and how long after the failure it noticed."""
    from verispec.model import LlamaForSampling

    model = LlamaForSampling.from_pretrained(path, n_positions=N_POS, batch_size=1, tp_degree=world)
    forward, calls = model.forward, [0]

    def failing_forward(*args, **kwargs):
        calls[0] += 1
        if rank == 1 and calls[0] == 4:  # after prefill and two decode steps
            if how == "exit":
                os._exit(17)
            time.sleep(float(how.split(":")[1]))  # "hang:SECONDS": silent, then gone
            os._exit(18)
        return forward(*args, **kwargs)

    model.forward = failing_forward
    t0 = time.monotonic()
    try:
        model.sample([[1, 2, 3]], 40, temperature=0)
    except Exception as e:
        return {"error_type": type(e).__name__, "message": str(e), "seconds": time.monotonic() - t0,
                "calls": calls[0]}
    return {"error_type": None, "seconds": time.monotonic() - t0, "calls": calls[0]}


def nxd_delegation(rank: int, world: int, fake_dir: str) -> dict:
    """With a (fake) neuronx_distributed importable, the group state comes from its parallel_state."""
    import sys

    sys.path.insert(0, fake_dir)
    from verispec.parallel import (
        destroy_model_parallel,
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_size,
        initialize_model_parallel,
    )

    initialize_model_parallel(world)
    import neuronx_distributed.parallel_state as nxd

    res = {"calls": list(nxd.CALLS), "size": get_tensor_model_parallel_size(), "rank": get_tensor_model_parallel_rank()}
    destroy_model_parallel()
    res["calls_after_destroy"] = list(nxd.CALLS)
    return res


def sleep_then_return(rank: int, world: int, seconds: float) -> int:
    time.sleep(seconds)
    return rank


def speculative_greedy(rank: int, world: int, target_path: str, drafts: dict, k: int) -> dict:
    """Greedy speculative output with the target at tp_degree=world (drafts at tp_degree 1 and
    world) next to tp_degree=1 speculative and target-only output; and sampled speculative
    output with a different seed per rank."""
    from verispec.model import LlamaForSampling
    from verispec.spec import SpeculativeGenerator

    def load(path, tp_degree):
        return LlamaForSampling.from_pretrained(path, n_positions=N_POS, batch_size=3, tp_degree=tp_degree)

    def run(draft, target, **sampling):
        gen = SpeculativeGenerator(draft, target, k)
        tokens = gen.sample(prompts, 34, **sampling).tolist()
        return tokens, gen.last_stats.acceptance_rate

    target_1, target_n = load(target_path, 1), load(target_path, world)
    prompts = [s[:n] for s, n in zip(_prompts(target_1.vocab_size, seed=4), LENS)]
    res = {"target_only_tp1": target_1.sample(prompts, 34, temperature=0).tolist()}
    for name, path in drafts.items():
        draft_1, draft_n = load(path, 1), load(path, world)
        r = res[name] = {}
        r["spec_tp1"], _ = run(draft_1, target_1, temperature=0)
        r["target_tp_draft_tp1"], r["greedy_acceptance"] = run(draft_1, target_n, temperature=0)
        r["target_tp_draft_tp"], _ = run(draft_n, target_n, temperature=0)
        r["sampled_tp1"], _ = run(draft_1, target_1, temperature=1.0, seed=50)
        # each rank seeds differently: the draft's and the acceptor's choices must be rank 0's
        r["sampled"], r["sampled_acceptance"] = run(draft_1, target_n, temperature=1.0, seed=50 + rank)
    return res


def several(rank: int, world: int, jobs: list) -> dict:
    """Several of the bodies above in one process, one after another: one launch (process start,
    imports, process group) for the checks of several tests. ``jobs``: (name, function name, args);
    returns name -> ("ok", value) or ("error", "Type: message", traceback), so a failing body fails
    only its own tests."""
    out = {}
    for name, fn, args in jobs:
        try:
            out[name] = ("ok", globals()[fn](rank, world, *args))
        except Exception as e:  # noqa: BLE001 - reported to the test that reads this job
            out[name] = ("error", f"{type(e).__name__}: {e}", traceback.format_exc())
    return out
