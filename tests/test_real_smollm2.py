"""SmolLM2-135M-Instruct from its GGUF (fetched once into the cache) against HF transformers
loading the directory that ``verispec convert`` wrote: greedy text, tokenizer and chat template."""

import pytest
import torch

from verispec.cli import main as cli_main
from verispec.model import Tokenizer, hub

pytestmark = pytest.mark.slow

TEXTS = [
    "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n\tpivot = arr[len(arr) // 2]  # 3.14159, 1e-5",
    "日本語のテキスト、中文文本和한국어 텍스트。",
    "emoji: 🤗 👩‍👩‍👧‍👦 🇫🇷 ✨ and ümlauts, ñ, ß",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces, trailing spaces   \n\n\n tabs\t\tand 1234567890 digits",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! 😊"}, {"role": "user", "content": "写一首诗"}],
]


def _bytes_to_unicode() -> dict:
    """GPT-2's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def independent_smollm_encode(text: str, tokens: list, merges: list, specials: list) -> list:
    """A from-scratch reading of SmolLM2's tokenizer (specials, digits one by one, GPT-2 split,
    byte-level BPE by merge rank), sharing only the GGUF's vocabulary with the code under test."""
    import regex

    vocab = {t: i for i, t in enumerate(tokens)}
    rank = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    b2u = _bytes_to_unicode()
    gpt2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    ids = []
    for chunk in regex.split("(" + "|".join(regex.escape(s) for s in specials) + ")", text):
        if chunk in specials:
            ids.append(vocab[chunk])
            continue
        for piece in regex.split(r"(\p{N})", chunk):
            for word in gpt2.findall(piece):
                parts = [b2u[b] for b in word.encode()]
                while len(parts) > 1:
                    pairs = [(rank.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
                    best, i = min(pairs)
                    if best == 1 << 30:
                        break
                    parts[i : i + 2] = [parts[i] + parts[i + 1]]
                ids += [vocab[p] for p in parts]
    return ids


@pytest.fixture(scope="module")
def gguf_path():
    return hub.resolve("smollm2-135m", progress=False)


@pytest.fixture(scope="module")
def hf_dir(gguf_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2_hf")
    assert cli_main(["convert", "smollm2-135m", str(out), "--dtype", "f32"]) == 0
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(hf_dir))


@pytest.fixture(scope="module")
def ours(gguf_path, smollm2_f32):
    """The GGUF loaded with the defaults (fp32, the default kernels): conftest's session model,
    which is that load (with room for 3 rows of 256 positions; these tests use one row)."""
    assert smollm2_f32.config.vocab_size == 49152
    return smollm2_f32


def test_greedy_continuation_identical_to_hf(ours, hf_dir):
    import transformers

    tok = ours.tokenizer
    prompt = torch.tensor(tok.encode(tok.apply_chat_template(CHATS[0])))  # [L]
    n = len(prompt)
    out = ours.sample(prompt[None], sequence_length=n + 32, temperature=0.0)[0]  # [L + 32]
    hf = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(prompt[None], max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None)[0]
    assert out.tolist() == ref.tolist(), f"{tok.decode(out[n:])!r} vs {tok.decode(ref[n:])!r}"
    # an oracle independent of both implementations: the model knows this fact only if the
    # dequantized weights and the Q/K un-permutation are right
    assert "Paris" in tok.decode(out[n:])
    with torch.no_grad():
        ref_logits = hf(out[None, :24]).logits[0]  # [24, V]
    mine_logits = ours.forward(out[None, :24], torch.tensor([0]))[0]
    assert (mine_logits - ref_logits).abs().max() < 1e-3


def test_tokenizer_round_trips_match_hf(gguf_path, hf_tokenizer):
    tok = Tokenizer.from_pretrained(gguf_path)
    assert tok.vocab_size == 49152 and tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert tok.decode(ids) == hf_tokenizer.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert tok.encode("<|im_start|>user")[0] == 1  # markup is one special token, not characters
    from verispec.model import GGUFSource

    src = GGUFSource(gguf_path)
    tokens, merges = src.field_array("tokenizer.ggml.tokens"), src.field_array("tokenizer.ggml.merges")
    specials = [t for t, ty in zip(tokens, src.field_array("tokenizer.ggml.token_type")) if ty == 3]
    for text in TEXTS:
        assert tok.encode(text) == independent_smollm_encode(text, tokens, merges, specials), text
    assert tok.encode("2024") == [tok.encode(d)[0] for d in "2024"]  # SmolLM2 splits digits one by one


def test_chat_template_matches_hf(gguf_path, hf_tokenizer):
    tok = Tokenizer.from_pretrained(gguf_path)
    for msgs in CHATS:
        for gen in (True, False):
            mine = tok.apply_chat_template(msgs, add_generation_prompt=gen)
            ref = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert mine == ref
            assert tok.encode(mine) == hf_tokenizer(ref, add_special_tokens=False)["input_ids"]
    assert tok.apply_chat_template(CHATS[0]).endswith("<|im_start|>assistant\n")
