"""Write tiny GGUF files from a tiny HF model the way llama.cpp's convert_hf_to_gguf.py does:
llama-arch Q/K rows permuted for interleaved RoPE (its ``LlamaModel.permute``), qwen2 unpermuted,
biases kept, ``output.weight`` omitted when the embeddings are tied. The permutation here is
written independently of verispec's inverse, so a wrong inverse fails the logits tests."""

from __future__ import annotations

import gguf
import numpy as np

BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Verbatim semantics of llama.cpp's converter permutation (numpy here)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_level_vocab(n: int) -> tuple[list[str], list[str], list[int]]:
    """A small valid byte-level BPE vocabulary of exactly ``n`` entries: three control tokens,
    the 256 byte symbols, a few merges, then llama.cpp-style [PAD] fillers."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + alphabet
    types = [3, 3, 3] + [1] * len(alphabet)
    merges = []
    for a, b in [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"),
                 ("l", "d"), ("Ġwor", "ld"), ("Ġ", "t"), ("Ġt", "he")]:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        types.append(1)
    if len(tokens) > n:
        raise ValueError(f"vocabulary needs at least {len(tokens)} entries")
    while len(tokens) < n:
        types.append(5)
        tokens.append(f"[PAD{len(tokens)}]")
    return tokens, merges, types


def write_tiny_gguf(path, hf_model, arch: str, dtype=np.float32, with_vocab_size: bool = True,
                    with_tokenizer: bool = True, pre: str = "gpt-2", arch_name: str | None = None,
                    extra_tensors: dict | None = None, skip: tuple = (), q8_0: tuple = ()) -> str:
    cfg = hf_model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch_name or arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    if head_dim != cfg.hidden_size // n_head:  # the converter writes it only when it differs
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    w.add_rope_freq_base(theta)
    if with_vocab_size:
        w.add_vocab_size(cfg.vocab_size)
    if with_tokenizer:
        tokens, merges, types = byte_level_vocab(cfg.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))

    def put(name, arr):
        if name in skip:
            return
        arr = np.ascontiguousarray(arr.astype(dtype if arr.ndim == 2 else np.float32))  # norms stay F32
        if name in q8_0:
            q = gguf.quants.quantize(arr.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)

    put("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in BLOCK.items():
            key = f"model.layers.{i}.{hf}"
            if key not in state:
                continue
            t = state[key]
            if arch == "llama" and hf.startswith("self_attn.q_proj"):
                t = llama_cpp_permute(t, n_head, n_head)
            elif arch == "llama" and hf.startswith("self_attn.k_proj"):
                t = llama_cpp_permute(t, n_head, n_kv)
            put(f"blk.{i}.{gg}", t)
    put("output_norm.weight", state["model.norm.weight"])
    if not tied:
        put("output.weight", state["lm_head.weight"])
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def llama_cpp_rope_freqs(head_dim: int, theta: float, factor: float, low: float, high: float, old_ctx: int):
    """The ``rope_freqs`` tensor llama.cpp's converter writes for llama3 rope scaling (loop form)."""
    import math

    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)
