"""The triton backend in a process that imported Triton without the interpreter (the normal
mode on a CUDA machine): CPU tensors are refused with an error that says what to do.

Run by tests/test_triton_modes.py in a child process whose environment has no TRITON_INTERPRET.
"""

from __future__ import annotations

import pytest
import torch

from verispec.kernels.triton import (TritonBackendUnavailable, accept_reject, interpreting, kv_append, kv_gather,
                                     verify_attention)


@pytest.fixture(autouse=True)
def _check_compiled_mode(monkeypatch):
    assert not interpreting(), "run this file without TRITON_INTERPRET"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _small():
    q = torch.zeros(1, 2, 1, 16)  # [B, H, T, D]
    k = torch.zeros(1, 2, 4, 16)  # [B, H_kv, S_max, D]
    return q, k, k.clone(), torch.tensor([2])


def test_cpu_tensors_are_refused_with_a_hint():
    q, k, v, pos = _small()
    with pytest.raises(TritonBackendUnavailable, match="kernel_backend='torch'.*TRITON_INTERPRET=1 before triton"):
        verify_attention(q, k, v, pos, 0.25)
    with pytest.raises(TritonBackendUnavailable, match="runs on CUDA tensors, got tensors on cpu"):
        kv_append(k, v, k[:, :, :1], v[:, :, :1], pos)
    with pytest.raises(TritonBackendUnavailable, match="kv_gather"):
        kv_gather(k, v, torch.tensor([[3]]), pos, torch.tensor([1]))
    probs = torch.full((1, 1, 4), 0.25)
    with pytest.raises(TritonBackendUnavailable, match="accept_reject"):
        accept_reject(torch.zeros(1, 0, dtype=torch.long), probs[:, :0], probs, torch.zeros(1, 0), torch.ones(1, 4))


def test_setting_the_variable_after_import_is_explained(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v, pos = _small()
    with pytest.raises(TritonBackendUnavailable, match="imported triton before it was set"):
        verify_attention(q, k, v, pos, 0.25)


# ---- the kernels compile for real GPUs (Triton's compiler and ptxas run without one) --------

SHARED_LIMIT = 99 * 1024  # smallest per-block shared memory limit among sm_80+ GPUs (sm_86/sm_89)


def compile_for_gpu(fn, pointer_types: dict, config: dict, capability: int = 80):
    """Compile ``fn`` to a cubin as a launch with ``config`` would; return the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {k: v for k, v in config.items() if k in fn.arg_names}
    options = {k: v for k, v in config.items() if k not in fn.arg_names}
    signature = {n: "constexpr" if n in constexprs else pointer_types.get(n, "i32") for n in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


@pytest.mark.parametrize(
    "G,T,D,dtype",
    [(7, 1, 128, torch.bfloat16), (7, 16, 128, torch.bfloat16), (2, 16, 64, torch.float16),
     (7, 16, 128, torch.float32), (4, 16, 256, torch.float32)],
)
def test_attention_compiles_within_shared_memory(G, T, D, dtype):
    from verispec.kernels.triton import attention

    elem = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    types = {n: f"*{elem}" for n in ("q_ptr", "k_ptr", "v_ptr")}
    types.update(pos_ptr="*i32", mask_ptr="*u8", out_ptr="*fp32", lse_ptr="*fp32", qk_scale="fp32")
    config = dict(attention.launch_config(G, T, D, dtype), HAS_MASK=True, WRITE_LSE=True,
                  IEEE_FP32=dtype == torch.float32, UPCAST_DOT=False)
    compiled = compile_for_gpu(attention._attention_slice, types, config)
    assert compiled.metadata.shared <= SHARED_LIMIT, (config, compiled.metadata.shared)


def test_combine_append_and_accept_reject_compile():
    from verispec.kernels.triton import append, attention, rejection
    from verispec.kernels.triton import gather as gather_kernels

    combine = compile_for_gpu(attention._combine_slices, dict(part_ptr="*fp32", lse_ptr="*fp32", out_ptr="*bf16"),
                              attention.combine_config(attention.MAX_SPLITS, 256))
    kv = compile_for_gpu(append._kv_append, {n: "*bf16" for n in ("k_cache_ptr", "v_cache_ptr", "k_new_ptr", "v_new_ptr")}
                         | {"pos_ptr": "*i64"}, append.launch_config(16, 128))
    acceptor = compile_for_gpu(
        rejection._accept_reject,
        dict(ids_ptr="*i64", q_ptr="*fp32", p_ptr="*fp32", u_ptr="*fp32", e_ptr="*fp32", accepted_ptr="*i64", tokens_ptr="*i64"),
        rejection.launch_config(15, 151936), capability=90,
    )
    gather = compile_for_gpu(gather_kernels._kv_move_rows,
                             {n: "*bf16" for n in ("k_src_ptr", "v_src_ptr", "k_dst_ptr", "v_dst_ptr")}
                             | {"src_slot_ptr": "*i32", "dst_slot_ptr": "*i64", "counts_ptr": "*i32"},
                             gather_kernels.launch_config(16, 128))
    assert all(k.metadata.shared <= SHARED_LIMIT for k in (combine, kv, acceptor, gather))
    # the race divides with round-to-nearest division (div.rn), not the approximate div.full
    ptx = acceptor.asm["ptx"]
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx and "div.approx" not in ptx


def test_split_planning():
    from verispec.kernels.triton.attention import MAX_SPLITS, MIN_SPLIT_KEYS, WAVES, plan_splits

    assert WAVES == 4 and MIN_SPLIT_KEYS == 256 and MAX_SPLITS == 128  # the numbers below assume these
    # already 4 programs per SM: never split
    assert plan_splits(n_programs=32, keys=8192, block_n=64, sm_count=8) == (1, 8192)
    # one program, long cache: 4 x 8 SMs -> 32 slices of 256 keys
    assert plan_splits(n_programs=1, keys=8192, block_n=64, sm_count=8) == (32, 256)
    # short cache: no slice shorter than MIN_SPLIT_KEYS
    assert plan_splits(n_programs=1, keys=600, block_n=64, sm_count=132) == (3, 256)
    # many SMs, very long cache: at most MAX_SPLITS slices
    assert plan_splits(n_programs=2, keys=65536, block_n=32, sm_count=132) == (128, 512)
    # forced count, rounded to whole key blocks: 100 keys in 3 slices of 64 -> only 2 are needed
    assert plan_splits(n_programs=1, keys=100, block_n=64, sm_count=8, num_splits=3) == (2, 64)
    with pytest.raises(ValueError, match="num_splits"):
        plan_splits(1, 100, 64, 8, num_splits=0)


def test_registered_lazily_and_default_on_cuda(monkeypatch):
    from verispec.kernels import default_backend_name, get_backend

    monkeypatch.delenv("VERISPEC_KERNELS", raising=False)
    assert default_backend_name("cuda:0") == "triton"  # triton imports here
    assert default_backend_name("cpu") in ("cpu", "torch")  # native CPU kernels where they build
    ks = get_backend("triton")
    assert ks.name == "triton" and ks.fallbacks == ()
    assert ks.verify_attention is verify_attention and ks.kv_append is kv_append
    assert ks.get("accept_reject") is accept_reject
