"""The command line's edges, on tiny models: help text with every default, the note when a reply
stops at --max-new-tokens, the draft chosen by vocabulary before any weights load, limits shared
with the API, one line (not a traceback) for each bad input, convert's refusal of a non-empty
folder, stdout holding the continuation alone, and --draft-quant auto."""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import build_tiny_hf, word_tokenizer
from verispec.cli import build_parser, main
from verispec.model import LlamaForSampling, hub

PROMPT = "t5 t17 t33 t2 "


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("edges")
    target, _ = build_tiny_hf(root / "target", "llama", seed=0)
    other, _ = build_tiny_hf(root / "other", "llama", seed=1, num_hidden_layers=1)
    small, _ = build_tiny_hf(root / "small", "llama", seed=2, vocab_size=50)
    nan, hf = build_tiny_hf(root / "nan", "llama", seed=3)
    with torch.no_grad():
        hf.model.norm.weight.fill_(math.nan)  # every logit NaN
    hf.save_pretrained(nan)
    for d in ("target", "other", "nan"):
        word_tokenizer(root / d, 97)
    word_tokenizer(root / "small", 50)
    return dict(target=target, other=other, small=small, nan=nan, root=root)


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def gen(capsys, models, *extra, target="target"):
    return run(capsys, "generate", PROMPT, "--target", models[target], "--amp", "f32", *extra)


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load weights or fetch a named model fails the test."""
    def refuse(*a, **k):
        raise AssertionError("weights were loaded (or a model fetched) before the inputs were checked")

    monkeypatch.setattr(LlamaForSampling, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(hub, "fetch", refuse)


# ---- 1. help: every option has a help line that shows its default ------------------------------

def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _help_entries(text: str) -> dict[str, str]:
    """{invocation line: its whole entry} of an argparse help text (entries start at 2 spaces)."""
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"^  \S", line):
            current = line.strip()
            entries[current] = current
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", [None, "generate", "check", "fetch", "convert"])
def test_every_option_has_help_and_shows_its_default(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    parser = build_parser()
    if command:
        parser = _subparsers(parser)[command]
    entries = _help_entries(parser.format_help())
    checked = 0
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        names = action.option_strings or [action.dest]
        invocation = parser._get_formatter()._format_action_invocation(action)  # e.g. "-k K, --k K"
        (entry,) = [e for k, e in entries.items() if k.startswith(invocation)]
        help_text = entry[len(invocation):]  # the help line(s) after it
        assert action.help and len(help_text.strip()) > 10, f"{command} {names}: no help line: {entry!r}"
        required_positional = not action.option_strings and action.nargs not in ("?", "*")
        if not required_positional:
            assert "(default: " in entry, f"{command} {names}: default not shown: {entry!r}"
        checked += 1
    assert checked >= (2 if command is None else 3)
    if command == "generate":
        assert "(default: 512)" in entries[[k for k in entries if k.startswith("--max-new-tokens")][0]]
        assert "(default: auto)" in entries[[k for k in entries if k.startswith("--draft-quant")][0]]
        assert "prompt is not echoed" in parser.format_help()


# ---- 2. a reply cut at --max-new-tokens is said on stderr -----------------------------------------

def test_default_max_new_tokens_and_cache_length(models, no_loading):
    from verispec.cli._generate_plan import plan

    args = build_parser().parse_args(["generate", PROMPT, "--target", models["target"], "--draft", "none"])
    assert args.max_new_tokens == 512
    args.allow_beyond_max_positions = True  # the tiny model's max_position_embeddings is 256
    p = plan(args, progress=False)
    assert len(p.ids) == 4 and p.n_positions == 4 + 512  # the cache follows the default, and k does not grow it


def test_a_reply_cut_at_max_new_tokens_is_said_and_one_ended_by_eos_is_not(models, capsys, tmp_path):
    rc, out, err = gen(capsys, models, "--draft", "none", "--max-new-tokens", "6", "--no-stats")
    assert rc == 0 and len(out.split()) == 6
    assert "stopped at --max-new-tokens 6 before the end of the answer; raise --max-new-tokens" in " ".join(err.split())
    # the same model with its third greedy token as EOS: the reply ends there, and no note
    eos_dir = tmp_path / "eos"
    shutil.copytree(models["target"], eos_dir)
    cfg = json.loads((eos_dir / "config.json").read_text())
    cfg["eos_token_id"] = int(out.split()[2][1:])
    (eos_dir / "config.json").write_text(json.dumps(cfg))
    rc, out2, err2 = run(capsys, "generate", PROMPT, "--target", str(eos_dir), "--amp", "f32", "--draft", "none",
                         "--max-new-tokens", "6", "--no-stats")
    assert rc == 0 and out2.split() == out.split()[:2] and "stopped at" not in err2


# ---- 3. the draft, when --draft is not given, shares the target's vocabulary ----------------------

def _config(vocab: int, hidden: int = 64, layers: int = 2):
    return SimpleNamespace(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=hidden // 4, intermediate_size=3 * hidden,
                           tie_word_embeddings=False)


def test_default_draft_follows_the_registry_vocabulary(monkeypatch):
    from verispec.cli._generate_plan import default_draft

    qwen = _config(151_936, 1536, 28)
    assert default_draft("qwen2.5-coder-1.5b", qwen) == ("qwen2.5-coder-0.5b", None)  # the default pair, silently
    draft, note = default_draft("/some/qwen-7b.gguf", _config(151_936, 3584, 28))
    assert draft == "qwen2.5-coder-0.5b" and "shares the 151936-token vocabulary" in note  # smallest that fits
    for target in ("qwen2.5-coder-0.5b", "smollm2-135m"):  # nothing registered at half their size
        draft, note = default_draft(target, _config(hub.get(target).vocab_size))
        assert draft == "ngram" and "drafting with 'ngram'" in note and "--draft" in note
    fake = hub.NamedModel("tiny-97", "test", "t.gguf", (), None, 1, "0" * 64, vocab_size=97, parameters=10)
    monkeypatch.setitem(hub.REGISTRY, "tiny-97", fake)
    assert default_draft("/x", _config(97))[0] == "tiny-97"


def test_target_without_draft_loads_no_default_draft(models, capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a named model was fetched")

    monkeypatch.setattr(hub, "fetch", refuse)
    rc, alone, _ = gen(capsys, models, "--draft", "none", "--max-new-tokens", "12")
    rc2, text, err = gen(capsys, models, "--max-new-tokens", "12")
    assert rc == rc2 == 0 and text == alone
    assert "no registered draft model shares the 97-token vocabulary" in " ".join(err.split())
    assert "ngram ->" in " ".join(err.split())  # the table's title names the draft used


def test_vocabulary_mismatch_is_found_before_loading_and_names_the_drafts_that_fit(models, capsys, no_loading):
    rc, _, err = gen(capsys, models, "--draft", models["small"])
    err = " ".join(err.split())
    assert rc == 1 and "vocabulary mismatch" in err and "50 tokens" in err and "97" in err
    assert "drafts that fit: ngram, self:N (N <= 2), none" in err
    rc, _, err = gen(capsys, models, "--draft", "smollm2-135m")  # a named draft: the registry knows, no fetch
    assert rc == 1 and "vocabulary mismatch: draft smollm2-135m has 49152 tokens" in " ".join(err.split())


# ---- 4. limits: the API's k limit, the cache length, max_position_embeddings ---------------------

@pytest.mark.parametrize("extra,message", [
    (("-k", "10000"), "k=10000 too large: a verify pass of k tokens needs k < n_positions=36 (the cache holds prompt 4 "
                      "+ 32 new tokens); lower -k or raise --n-positions"),
    (("-k", "auto:40"), "k=40 too large"),
    (("--n-positions", "20"), "--n-positions 20 is too small: prompt 4 + 32 new tokens needs 36"),
    (("--max-new-tokens", "300"), "prompt 4 + 300 new tokens = 304 positions exceed the max_position_embeddings=256"),
    (("--n-positions", "300"), "--n-positions 300 exceeds the max_position_embeddings=256"),
    (("--seed", str(2**70)), "seed must be an integer in [0, 2**63)"),
    (("--seed", "-1"), "seed must be an integer in [0, 2**63)"),
    (("--kernel-backend", "cuda"), "unknown kernel backend 'cuda'; available: "),
    (("--temperature", "nan"), "temperature must be a finite number"),
    (("--acceptor", "fastest"), "unknown acceptor 'fastest'"),
    (("--draft", "self:3"), "'self:3' asks for more layers than the target has (2)"),
    (("-k", "fast"), "k must be an int, 'auto' or 'auto:MAX'"),
    (("--tp-degree", "0"), "--tp-degree must be >= 1"),
])
def test_bad_input_fails_before_loading_with_one_line(models, capsys, no_loading, extra, message):
    rc, out, err = gen(capsys, models, "--draft", models["other"], "--max-new-tokens", "32", *extra)
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert message in err.strip(), err


def test_plain_auto_fits_a_short_run(models, capsys):
    # 'auto' means AdaptiveK(max_k=8); a 4 + 3 token run has room for k < 7 only: the MAX shrinks, no error
    rc, text, err = gen(capsys, models, "--draft", models["other"], "--max-new-tokens", "3")
    assert rc == 0 and len(text.split()) == 3 and "AdaptiveK(max_k=6)" in err, err
    rc, _, err = gen(capsys, models, "--draft", models["other"], "--max-new-tokens", "3", "-k", "auto:8")
    assert rc == 1 and "k=8 too large" in err  # an explicit MAX is the user's: an error


def test_generation_beyond_max_positions_needs_the_flag(models, capsys):
    rc, out, err = gen(capsys, models, "--draft", "none", "--max-new-tokens", "260", "--no-stats",
                       "--allow-beyond-max-positions")
    assert rc == 0 and len(out.split()) == 260


# ---- 5. no traceback for bad inputs; bugs keep theirs -----------------------------------------------

def test_nan_logits_end_with_one_line(models, capsys):
    rc, _, err = gen(capsys, models, "--draft", "none", "--max-new-tokens", "4", target="nan")
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "FloatingPointError: target model produced NaN logits" in err


def test_unknown_backend_is_a_value_error_naming_the_backends():
    import verispec.kernels as K

    with pytest.raises(ValueError, match=r"unknown kernel backend 'cuda'; available: .*torch") as e:
        K.get_backend("cuda")
    assert isinstance(e.value, KeyError) and str(e.value).startswith("unknown")  # old callers caught KeyError


def test_a_bug_keeps_its_traceback_and_debug_shows_every_traceback(models, capsys, monkeypatch):
    import verispec.cli._generate_plan as plan_mod

    def buggy(*a, **k):
        return {}["no such key"]  # not a raise of ours: a bug

    monkeypatch.setattr(plan_mod, "default_draft", buggy)
    with pytest.raises(KeyError):
        main(["generate", PROMPT, "--target", models["target"]])
    monkeypatch.undo()
    args = ["generate", PROMPT, "--target", models["target"], "--seed", "-1"]
    assert main(args) == 1
    with pytest.raises(ValueError, match="seed"):
        main(["--debug", *args])
    monkeypatch.setenv("VERISPEC_DEBUG", "1")
    with pytest.raises(ValueError, match="seed"):
        main(args)


def test_which_errors_are_one_line():
    from verispec.cli import is_user_error

    def torch_bug():
        return torch.ones(2, 3) @ torch.ones(2, 3)  # a shape error out of torch: a bug

    with pytest.raises(RuntimeError) as bug:
        torch_bug()
    assert not is_user_error(bug.value)
    assert is_user_error(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried ..."))
    assert is_user_error(FloatingPointError("NaN")) and is_user_error(FileNotFoundError("x"))
    assert is_user_error(hub.FetchError("registry unreachable"))


def test_bad_input_in_a_fresh_process_is_one_line_and_status_1(models):
    r = subprocess.run([sys.executable, "-m", "verispec", "generate", "x", "--target", models["target"],
                        "--kernel-backend", "cuda"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "unknown kernel backend 'cuda'" in r.stderr


# ---- 6. convert refuses a non-empty folder unless --force -----------------------------------------

def test_convert_refuses_a_non_empty_folder_unless_forced(models, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')  # would shadow the new weights
    rc, _, err = run(capsys, "convert", models["other"], str(out))
    assert rc == 1 and "is not empty" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors.index.json", "notes.txt"]  # untouched
    rc, _, _ = run(capsys, "convert", models["other"], str(out), "--force")
    names = {p.name for p in out.iterdir()}
    assert rc == 0 and "notes.txt" in names and "model.safetensors.index.json" not in names
    assert LlamaForSampling.from_pretrained(str(out), n_positions=8).config.num_hidden_layers == 1
    assert run(capsys, "convert", models["other"], str(tmp_path / "new"))[0] == 0  # a new folder needs no --force


# ---- 7. stdout holds the continuation alone ---------------------------------------------------------

def test_stdout_is_the_generated_text_alone(models, capsys):
    rc, out, _ = gen(capsys, models, "--draft", models["other"], "-k", "3", "--max-new-tokens", "10", "--no-stats")
    target = LlamaForSampling.from_pretrained(models["target"], n_positions=14)
    ids = target.tokenizer.encode(PROMPT)
    tokens = target.sample(torch.tensor([ids]), sequence_length=14, temperature=0.0)
    assert rc == 0 and out == target.tokenizer.decode(tokens[0, 4:].tolist()) + "\n"


# ---- 8. --draft-quant auto: w8a8 where the CPU runs it, else the draft in --amp ----------------------

@pytest.mark.parametrize("native", [True, False])
def test_draft_quant_auto_follows_the_cpu_and_says_so(models, capsys, monkeypatch, native):
    import verispec.cli._generate_plan as plan

    # only the CLI's choice is patched: where the CPU lacks VNNI the W8A8 layers run their torch twin
    monkeypatch.setattr(plan, "w8a8_here", lambda: native)
    rc, _, err = gen(capsys, models, "--draft", models["other"], "-k", "3", "--max-new-tokens", "8")
    err = " ".join(err.split())
    assert rc == 0
    if native:
        assert "(w8a8 weights, auto) ->" in err and re.search(r"draft weights +│ +w8a8 \(auto: w8a8 kernels here\)", err)
    else:
        assert "(f32 weights, auto) ->" in err and re.search(r"draft weights +│ +f32 \(auto: no w8a8 kernels here\)", err)
    rc, _, err = gen(capsys, models, "--draft", "ngram", "-k", "3", "--max-new-tokens", "8")  # ignored by ngram
    assert rc == 0 and "weights" not in err
