"""``verispec generate`` end to end on tiny models: streamed text, the statistics table, -k auto,
target-only, chat templates, and a clear error for each bad input."""

import io

import pytest

from conftest import build_tiny_hf, word_tokenizer
from verispec.cli import main

PROMPT = "t5 t17 t33 t2 "  # the word-level test tokenizer decodes without a leading space


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    target, _ = build_tiny_hf(root / "target", "llama", seed=0)
    twin, _ = build_tiny_hf(root / "twin", "llama", seed=0)  # same weights: every draft is accepted
    other, _ = build_tiny_hf(root / "other", "llama", seed=1, num_hidden_layers=1)
    small_vocab, _ = build_tiny_hf(root / "small", "llama", seed=2, vocab_size=50)
    for d in (target, twin, other):
        word_tokenizer(root / d.split("/")[-1], 97)
    return dict(target=target, twin=twin, other=other, small_vocab=small_vocab)


def generate(capsys, *extra) -> tuple[int, str, str]:
    rc = main(["generate", PROMPT, "--amp", "f32", "--max-new-tokens", "20", *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("draft,k,quant", [("twin", "auto", "none"), ("other", "4", "none"), ("ngram", "3", None),
                                           ("self:1", "auto:5", None), ("other", "3", "int8"),
                                           ("other", "3", "w8a8"), ("other", "3", None)])
def test_speculative_text_equals_target_only_and_prints_the_table(models, capsys, draft, k, quant):
    rc, alone, table = generate(capsys, "--target", models["target"], "--draft", "none")
    # stdout holds the continuation alone: the prompt is not echoed
    assert rc == 0 and not alone.startswith(PROMPT.strip()) and len(alone.split()) == 20, alone
    assert "new tokens" in table and "acceptance rate" not in table  # target-only: no speculative rows
    rc, text, table = generate(capsys, "--target", models["target"], "--draft", models.get(draft, draft), "-k", k,
                               *(("--draft-quant", quant) if quant else ()))
    assert rc == 0
    assert text == alone  # greedy fp32: speculative decoding changes nothing in the text
    for row in ("acceptance rate", "per-position acceptance", "mean tokens per verify pass",
                "speedup predicted", "speedup measured", "tokens/s"):
        assert row in table, table
    if draft == "twin":
        assert "acceptance rate" in table and " 1.000" in table  # identical draft: everything accepted
    if k.startswith("auto"):
        assert "AdaptiveK" in table
    for q in ("int8", "w8a8"):
        assert (f"({q} weights)" in " ".join(table.split())) == (quant == q)
    if draft in ("twin", "other"):  # a draft model: its weight format is a row of the table
        row = {"none": "f32 (--draft-quant none)", "int8": "int8 (--draft-quant int8)", "w8a8": "w8a8 (--draft-quant w8a8)",
               None: "(auto: "}[quant]
        assert "draft weights" in table and row in " ".join(table.split()), table
    else:  # ngram / self:N: no draft weights, --draft-quant auto says nothing
        assert "draft weights" not in table and "weights, auto" not in table


def test_prompt_from_stdin_and_seeded_sampling(models, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))
    # a fixed k: with k=auto the k sequence follows wall-clock costs, so the random numbers drawn
    # (and a seeded sample) differ from run to run, though every run is exact in distribution
    args = ("--target", models["target"], "--draft", models["other"], "--temperature", "1.0", "--seed", "3",
            "-k", "4", "--no-stats")
    rc, first, err = generate(capsys, *args)  # prompt given as an argument; stdin unused
    assert rc == 0 and "new tokens" not in err
    rc = main(["generate", "-", "--amp", "f32", "--max-new-tokens", "20", *args])
    assert rc == 0 and capsys.readouterr().out == first  # same seed, same prompt (from stdin): same text


def test_coupled_acceptor_gives_one_sampled_text_for_every_k_and_draft(models, capsys):
    # with --acceptor coupled the seed alone fixes the text: k=auto (whose k follows wall-clock
    # costs), fixed k, model, n-gram and self drafts all emit the same tokens
    texts = set()
    for draft, k in (("other", "auto"), ("other", "4"), ("twin", "auto:5"), ("ngram", "3"), ("self:1", "2")):
        rc, text, err = generate(capsys, "--target", models["target"], "--draft", models.get(draft, draft), "-k", k,
                                 "--acceptor", "coupled", "--temperature", "1.0", "--seed", "3")
        assert rc == 0 and "acceptance rate" in err, err
        texts.add(text)
    assert len(texts) == 1
    rc, other_seed, _ = generate(capsys, "--target", models["target"], "--draft", models["other"], "-k", "4",
                                 "--acceptor", "coupled", "--temperature", "1.0", "--seed", "4")
    assert rc == 0 and other_seed not in texts


def test_chat_needs_a_template(models, capsys):
    rc, _, err = generate(capsys, "--target", models["target"], "--draft", "none", "--chat")
    assert rc == 1 and "no chat template" in err


@pytest.mark.parametrize("extra,message", [
    (("-k", "fast"), "k must be an int, 'auto' or 'auto:MAX'"),
    (("-k", "0"), "k must be >= 1"),
    (("-k", "auto:0"), "MAX in 'auto:MAX' must be >= 1"),
    (("--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
    (("--temperature", "-1"), "temperature"),
    (("--top-p", "1.5"), "top_p"),
    (("--top-k", "0"), "top_k"),
    (("--draft", "self:9"), "self:9"),
    (("--n-positions", "10"), "--n-positions 10 is too small: prompt 4 + 20 new tokens needs 24"),
    (("--draft", "ngram", "--draft-quant", "int8"), "--draft-quant int8 needs a draft model"),
    (("-k", "1", "--draft-quant", "w8a8"), "--draft-quant w8a8 needs a draft model; -k 1 runs the target alone"),
    (("--draft", "none", "--draft-quant", "int8"), "--draft-quant int8 needs a draft model; the draft is 'none'"),
    (("--tree", "2,x"), "expected a branching such as '2,2,1'"),
    (("--tree", "dynamic:8", "--children", "sample"), "is not exact: a dynamic tree's shape"),
    (("--tree", "2,2", "--acceptor", "recursive"), "'recursive' is exact only for children in ('distinct',)"),
    (("--target-amx",), "amx=True multiplies bf16 weights; use amp='bf16' (got amp='f32')"),
])
def test_bad_input_is_a_clear_error(models, capsys, extra, message):
    rc, _, err = generate(capsys, "--target", models["target"], "--draft", models["other"], *extra)
    assert rc == 1 and message in " ".join(err.split()), err


@pytest.mark.parametrize("tree,children,acceptor", [("2,2,1", "sample", "default"), ("dynamic:6", "top", "traversal"),
                                                    ("auto", "sample", "default"), ("3,1", "distinct", "recursive")])
def test_tree_text_equals_target_only(models, capsys, tree, children, acceptor):
    rc, alone, _ = generate(capsys, "--target", models["target"], "--draft", "none")
    rc, text, table = generate(capsys, "--target", models["target"], "--draft", models["other"], "--tree", tree,
                               "--children", children, "--acceptor", acceptor, "--draft-quant", "none")
    assert rc == 0 and text == alone, table
    assert "mean tokens per verify pass" in table


def test_tree_needs_a_draft_that_drafts_trees(models, capsys):
    rc, _, err = generate(capsys, "--target", models["target"], "--draft", "ngram", "--tree", "2,2")
    assert rc == 1 and "--tree needs a draft that drafts trees" in err, err


def test_vocabulary_mismatch_and_missing_model(models, capsys, tmp_path):
    rc, _, err = generate(capsys, "--target", models["target"], "--draft", models["small_vocab"])
    assert rc == 1 and "vocabulary mismatch" in err
    rc, _, err = generate(capsys, "--target", str(tmp_path / "nowhere"))
    assert rc == 1 and "nowhere" in err and "not a registered model name" in err


def test_target_on_amx_tiles_keeps_the_greedy_text(models, capsys):
    """--target-amx: the target's products on AMX tiles; its speculative text is its own target-only
    text (both on the tiles); refused with the reason where the tiles are unavailable."""
    from verispec.kernels.cpu.build import tiles_available

    def run(*extra):
        rc = main(["generate", PROMPT, "--amp", "bf16", "--max-new-tokens", "20", "--target", models["target"],
                   "--target-amx", *extra])
        out = capsys.readouterr()
        return rc, out.out, out.err

    if not tiles_available():
        rc, _, err = run("--draft", "none")
        assert rc == 1 and "AMX tiles are unavailable here" in err, err
        return
    rc, alone, _ = run("--draft", "none")
    assert rc == 0 and len(alone.split()) == 20
    for extra in (("-k", "6"), ("--tree", "2,2,1,1", "--children", "top")):
        rc, text, table = run("--draft", models["other"], "--draft-quant", "none", *extra)
        assert rc == 0 and text == alone, (extra, table)
