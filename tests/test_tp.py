"""Tensor parallelism over 2 gloo ranks on CPU: the sharded model computes the unsharded model's
logits, holds only its shard, agrees on every token, and fails cleanly (bad tp_degree, a dead
or hung rank) instead of hanging."""

from __future__ import annotations

import textwrap

import pytest
import torch

import tp_workers
from conftest import build_tiny_hf
from verispec.model import LlamaConfig, LlamaForSampling
from verispec.parallel import TensorParallelError
from verispec.parallel.launch import run_ranks, torchrun_command
from verispec.parallel.plan import check_tp_degree, head_ranges

pytestmark = pytest.mark.dist

TOL = 1e-4
WORLD = 2
# name: (arch, config overrides); TINY has 4 query heads, 2 KV heads, head_dim 16, vocab 97
# (odd, so the vocabulary splits 49 + 48), intermediate 96.
CASES = {
    "llama-gqa-mlp-bias": ("llama", dict(mlp_bias=True)),
    "llama-kv-replicated": ("llama", dict(num_key_value_heads=1)),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2-bias": ("qwen2", dict()),
    "qwen2-bias-tied-kv-replicated": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
}


def _randomize_biases(hf) -> None:
    """HF initialises biases to zero; non-zero ones show whether each bias is added exactly once."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _checkpoint(dir_, arch, over, seed: int = 0, logit_scale: float = 1.0) -> str:
    """A tiny checkpoint with non-zero biases; ``logit_scale`` sharpens its next-token
    distributions (random tiny models are nearly uniform, where almost any draft is accepted)."""
    path, hf = build_tiny_hf(dir_, arch, seed=seed, **over)
    _randomize_biases(hf)
    with torch.no_grad():
        hf.lm_head.weight.mul_(logit_scale)
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {name: _checkpoint(root / name, arch, over) for name, (arch, over) in CASES.items()}


@pytest.fixture(scope="module")
def speculative_paths(tmp_path_factory):
    """A sharpened qwen2 target and a one-layer draft (random tiny models are nearly uniform,
    where almost any draft is accepted)."""
    root = tmp_path_factory.mktemp("tp_spec")
    target = _checkpoint(root / "target", "qwen2", {}, logit_scale=6.0)
    other = _checkpoint(root / "draft", "qwen2", dict(num_hidden_layers=1), seed=1, logit_scale=6.0)
    return target, {"other-model": other, "target-itself": target}


def _ok(results):
    for r in results:
        assert r.ok, f"rank {r.rank} failed (exit {r.exitcode}): {r.error}\n{r.traceback or ''}"
    return [r.value for r in results]


@pytest.fixture(scope="module")
def two_ranks(tiny_paths, speculative_paths):
    """One 2-rank launch for the mapping functions, every sharded-vs-unsharded case and the
    speculative runs (each launch costs a process start, torch's imports and a process group on
    both ranks): per job, both ranks' results."""
    target, drafts = speculative_paths
    jobs = [("mapping", "mapping_functions", ()), ("sharded", "sharded_vs_unsharded", (tiny_paths,)),
            ("speculative", "speculative_greedy", (target, drafts, 4))]
    per_rank = _ok(run_ranks(tp_workers.several, WORLD, (jobs,), timeout_s=600, threads_per_rank=1))
    return {name: [r[name] for r in per_rank] for name, _, _ in jobs}


def _job(two_ranks, name):
    """Both ranks' values of one job of the shared launch; fails with the rank's traceback if it raised."""
    for rank, r in enumerate(two_ranks[name]):
        assert r[0] == "ok", f"{name} failed on rank {rank}: {r[1]}\n{r[2]}"
    return [r[1] for r in two_ranks[name]]


@pytest.fixture(scope="module")
def sharded(two_ranks):
    """Both ranks' measurements for every case, from the shared 2-rank run."""
    return _job(two_ranks, "sharded")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_unsharded_prefill_verify_decode(sharded, case):
    for rank_res in sharded:
        r = rank_res[case]
        assert r["logits_shape"] == (3, 4, 97)
        assert r["prefill"] < TOL, r
        assert r["verify"] < TOL, r
        assert r["decode"] < TOL, r


@pytest.mark.parametrize("case", sorted(CASES))
def test_ranks_compute_identical_logits(sharded, case):
    assert torch.equal(sharded[0][case]["verify_logits"], sharded[1][case]["verify_logits"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_rank_holds_its_shard(sharded, case):
    arch, over = CASES[case]
    n_kv = over.get("num_key_value_heads", 2)
    for rank, rank_res in enumerate(sharded):
        local = rank_res[case]["local"]
        assert local["n_heads"] == 2 and local["q_rows"] == 2 * 16
        assert local["down_cols"] == 96 // 2
        assert local["embed_rows"] == (49 if rank == 0 else 48)
        assert local["lm_head_shares_embedding"] == bool(over.get("tie_word_embeddings"))
        # one KV head per rank: its own when there are enough, the shared one when replicated
        assert local["n_kv_heads"] == local["cache_kv_heads"] == max(1, n_kv // WORLD)
        assert local["k_rows"] == 16 * max(1, n_kv // WORLD)
        expected_kv = (0, 1) if n_kv == 1 else (rank * n_kv // 2, (rank + 1) * n_kv // 2)
        assert tuple(local["kv_heads"]) == expected_kv
        pb = rank_res[case]["param_bytes"]
        # only norms (and replicated KV heads) are duplicated: well under 60% of the full model
        assert pb["tp"] < 0.6 * pb["full"], pb


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_tp2_equals_tp1(sharded, case):
    for rank_res in sharded:
        r = rank_res[case]
        assert r["greedy_tp"] == r["greedy_tp1"]


def test_sampled_tokens_are_rank0s_on_every_rank(sharded):
    for case in CASES:
        # rank 1 sampled with another seed; rank 0's broadcast tokens must still win everywhere
        assert sharded[0][case]["sampled_tp"] == sharded[1][case]["sampled_tp"]
        assert sharded[0][case]["sampled_tp"] == sharded[0][case]["sampled_tp1_seed0"]
        assert sharded[0][case]["sampled_replicated"] == sharded[1][case]["sampled_replicated"]
    rows = [row for case in CASES for row in sharded[0][case]["sampled_tp"]]
    assert len({tuple(r) for r in rows}) > 1  # really sampled, not a constant


def test_kv_heads_replicated_over_four_ranks(tmp_path):
    """8 query heads, 2 KV heads, tp_degree=4: each KV head lives on the 2 ranks whose queries use it."""
    path = _checkpoint(tmp_path / "kv-rep4", "llama", dict(num_attention_heads=8, num_key_value_heads=2))
    res = _ok(run_ranks(tp_workers.sharded_vs_unsharded, 4, ({"rep4": path},), timeout_s=300, threads_per_rank=1))
    for rank, rank_res in enumerate(res):
        r = rank_res["rep4"]
        assert max(r["prefill"], r["verify"], r["decode"]) < TOL, r
        assert tuple(r["local"]["kv_heads"]) == ((0, 1) if rank < 2 else (1, 2))
        assert r["local"]["n_heads"] == 2 and r["local"]["cache_kv_heads"] == 1
        assert r["greedy_tp"] == r["greedy_tp1"]
        assert r["sampled_tp"] == res[0]["rep4"]["sampled_tp"]


def test_greedy_speculative_tp2_equals_tp1(two_ranks, speculative_paths):
    """Target at tp_degree=2 with a draft at tp_degree 1 (replicated) or 2: greedy speculative
    output is token for token the tp_degree=1 output, and sampled output is rank 0's on every rank."""
    _, drafts = speculative_paths
    res = _job(two_ranks, "speculative")
    for rank_res in res:
        expected = rank_res["target_only_tp1"]
        for name in drafts:
            r = rank_res[name]
            assert r["spec_tp1"] == expected
            assert r["target_tp_draft_tp1"] == expected, name
            assert r["target_tp_draft_tp"] == expected, name
    # the acceptor's paths all ran: all accepted, all rejected (greedy), and a mix (sampled)
    assert res[0]["target-itself"]["greedy_acceptance"] == 1.0
    assert res[0]["other-model"]["greedy_acceptance"] < 0.5
    assert 0.1 < res[0]["other-model"]["sampled_acceptance"] < 0.9
    for name in drafts:
        # rank 0 seeded as the tp_degree=1 run was: every rank emits that run's tokens
        assert res[0][name]["sampled"] == res[1][name]["sampled"] == res[0][name]["sampled_tp1"]
        assert res[0][name]["sampled_tp1"] != res[0]["target_only_tp1"]  # really sampled


def test_mapping_functions_and_layers(two_ranks):
    res = _job(two_ranks, "mapping")
    for rank, r in enumerate(res):
        assert r["column_gather"] < 1e-5 and r["row_scatter"] < 1e-5
        assert r["column_then_row"] < 1e-5 and r["embedding"] == 0
        assert r["column_local_rows"] == (4 if rank == 0 else 3)
        assert "out of range" in r["embedding_out_of_range"]
        c = [float(i * (rank + 1)) for i in range(1, 5)]
        assert r["reduce_fwd"] == [3.0] * 4 and r["reduce_grad"] == c
        assert r["copy_grad"] == [3.0, 6.0, 9.0, 12.0]
        assert r["scatter_fwd"] == ([0.0, 1.0] if rank == 0 else [2.0, 3.0])
        assert r["scatter_grad"] == [1.0, 1.0, 2.0, 2.0]
        assert r["gather_fwd"] == [0.0, 0.0, 1.0, 1.0]
        assert r["gather_grad"] == ([1.0, 2.0] if rank == 0 else [3.0, 4.0])


# ---- failure handling ---------------------------------------------------------------------------


def _config(**over) -> LlamaConfig:
    base = dict(vocab_size=97, hidden_size=96, intermediate_size=96, num_hidden_layers=1, num_attention_heads=6,
                num_key_value_heads=2)
    return LlamaConfig(**dict(base, **over))


def test_tp_degree_must_divide_attention_heads(tiny_paths):
    with pytest.raises(ValueError, match=r"tp_degree=3 does not divide num_attention_heads=4"):
        LlamaForSampling.from_pretrained(tiny_paths["qwen2-bias"], n_positions=16, tp_degree=3)


def test_kv_heads_and_intermediate_must_split():
    with pytest.raises(ValueError, match=r"num_key_value_heads=2: one must divide the other"):
        check_tp_degree(_config(), 3)
    with pytest.raises(ValueError, match=r"does not divide intermediate_size=95"):
        check_tp_degree(_config(intermediate_size=95), 2)
    with pytest.raises(ValueError, match=r"positive integer"):
        check_tp_degree(_config(), 0)
    check_tp_degree(_config(), 6)  # 6 heads, KV heads replicated 3 times each


def test_head_ranges_give_each_rank_the_kv_heads_its_queries_use():
    cfg = _config(num_attention_heads=8, num_key_value_heads=2, hidden_size=128)
    assert [head_ranges(cfg, 4, r) for r in range(4)] == [((0, 2), (0, 1)), ((2, 4), (0, 1)), ((4, 6), (1, 2)),
                                                          ((6, 8), (1, 2))]
    assert [head_ranges(cfg, 2, r) for r in range(2)] == [((0, 4), (0, 1)), ((4, 8), (1, 2))]


def test_tp_outside_torchrun_is_a_clear_error(tiny_paths, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(TensorParallelError, match=r"not started by torchrun.*torchrun --nproc-per-node 2"):
        LlamaForSampling.from_pretrained(tiny_paths["qwen2-bias"], n_positions=16, tp_degree=2)


def test_tp_degree_other_than_world_size_is_a_clear_error(tiny_paths):
    results = run_ranks(tp_workers.tp_degree_vs_world, WORLD, (tiny_paths["llama-mha-tied"], 4), timeout_s=120,
                        threads_per_rank=1)
    for r in results:
        assert r.exitcode == 1 and r.error.startswith("TensorParallelError")
        assert "tp_degree=4 does not match the number of processes (2)" in r.error


def test_dead_rank_ends_the_other_with_an_error(tiny_paths):
    results = run_ranks(tp_workers.peer_failure, WORLD, (tiny_paths["qwen2-bias"], "exit"), timeout_s=90,
                        env={"VERISPEC_TP_TIMEOUT_S": "60"}, threads_per_rank=1)
    assert results[1].exitcode == 17
    seen = results[0].value
    assert results[0].exitcode == 0 and seen is not None, results[0].error
    assert seen["error_type"] == "TensorParallelError", seen
    assert "failed on rank 0 of 2" in seen["message"] and "another rank exited" in seen["message"]
    assert seen["seconds"] < 30  # noticed from the closed connection, long before the 60 s timeout


def test_hung_rank_ends_the_other_within_the_timeout(tiny_paths):
    results = run_ranks(tp_workers.peer_failure, WORLD, (tiny_paths["qwen2-bias"], "hang:6"), timeout_s=60,
                        env={"VERISPEC_TP_TIMEOUT_S": "3"}, threads_per_rank=1)
    seen = results[0].value
    assert seen is not None and seen["error_type"] == "TensorParallelError", results[0]
    assert "did not answer within 3 s" in seen["message"]
    assert seen["seconds"] < 15
    assert results[1].exitcode == 18  # rank 1 was still silent when rank 0 gave up


def test_neuronx_distributed_state_is_used_when_importable(tmp_path):
    pkg = tmp_path / "neuronx_distributed"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "parallel_state.py").write_text(textwrap.dedent("""
        import torch.distributed as dist
        CALLS = []
        def initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1):
            CALLS.append(("init", tensor_model_parallel_size))
        def get_tensor_model_parallel_group():
            return dist.group.WORLD
        def get_tensor_model_parallel_size():
            return 1000 + dist.get_world_size()
        def get_tensor_model_parallel_rank():
            return 2000 + dist.get_rank()
        def destroy_model_parallel():
            CALLS.append(("destroy",))
    """))
    (r,) = _ok(run_ranks(tp_workers.nxd_delegation, 1, (str(tmp_path),), timeout_s=60))
    assert r["calls"] == [("init", 1)]
    assert (r["size"], r["rank"]) == (1001, 2000)
    assert r["calls_after_destroy"] == [("init", 1), ("destroy",)]


def test_torchrun_command():
    cmd = torchrun_command(2, "verispec", ["generate", "--tp-degree", "2"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "verispec",
                       "generate", "--tp-degree", "2"]
    with pytest.raises(ValueError):
        torchrun_command(0, "verispec", [])


def test_run_ranks_kills_what_outlives_its_deadline():
    fast = run_ranks(tp_workers.sleep_then_return, 2, (0.0,), timeout_s=30)
    assert [r.value for r in fast] == [0, 1] and all(r.ok for r in fast)
    slow = run_ranks(tp_workers.sleep_then_return, 1, (60.0,), timeout_s=2)
    assert slow[0].exitcode is None and slow[0].error.startswith("TimeoutError")


def test_a_loaded_shard_does_not_keep_the_full_tensor_alive():
    """A source may return a narrowed view (GGUF dequantizes whole tensors); the parameter must
    own only its shard, or every rank would still hold the full tensor."""
    from torch import nn

    from verispec.model.loader import materialize

    full = torch.arange(40.0).reshape(8, 5)  # [out=8, in=5]

    class ViewSource:
        def names(self):
            return ["weight"]

        def shape(self, name):
            return (8, 5)

        def load(self, name, shard=None):
            dim, start, stop = shard
            return full.narrow(dim, start, stop - start)  # a view into the whole tensor

    with torch.device("meta"):
        layer = nn.Linear(5, 2, bias=False)  # this rank's 2 rows of 8
    materialize(layer, ViewSource(), torch.float32, shard_fn=lambda name: (0, 4, 6))
    assert torch.equal(layer.weight, full[4:6])
    assert layer.weight.untyped_storage().nbytes() == 2 * 5 * 4
