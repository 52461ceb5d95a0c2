"""The loop's protocols (spec/protocols.py): user parts with or without the base classes, clear
errors for missing required members, the greedy-id shortcut only where an acceptor says so, the
default k of enable_speculative_decoder, target-only sampling as the loop at k = 1, and a step()
that reads in one screen."""

import inspect
import re

import pytest
import torch
import torch.nn.functional as F

from verispec.model.prompts import pad_prompts, prepare_prompts
from verispec.spec import DefaultTokenAcceptor, GreedyTokenAcceptor, SpeculativeGenerator, rejection_sample
from verispec.spec.protocols import AcceptorBase, Draft, DraftBase, KPolicyBase, Target
from verispec.spec.resolve import AcceptorAdapter, DraftAdapter, KPolicyAdapter, TargetAdapter
from verispec.testing import MarkovChainLM


def chain(seed=0, V=6, B=4, n_positions=48, order=2):
    return MarkovChainLM.random(V, seed, order=order, n_positions=n_positions, batch_size=B)


PROMPTS = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([0, 5])]


def target_greedy(target, prompts=PROMPTS, L=20):
    return SpeculativeGenerator(None, target, 1).sample(prompts, L, temperature=0)


# ---- user parts written without the bases ------------------------------------------------------


class RepeatLast:
    """Only the required member: propose (the README's example draft, without bind)."""

    def __init__(self, V):
        self.V = V

    def propose(self, tokens, lengths, g, params, uniforms):
        ids = tokens.gather(1, (lengths - 1)[:, None]).expand(-1, g).contiguous()  # [B, g]
        return ids, F.one_hot(ids, self.V).float()


def rejection(draft_ids, draft_probs, target_probs, rng):
    B, g = draft_ids.shape
    return rejection_sample(draft_ids, draft_probs, target_probs, rng.uniforms(B, g),
                            rng.exponentials(B, target_probs.shape[-1]))


class TwoThenThree:
    """Only the required members: max_k and next_k."""

    max_k = 3

    def __init__(self):
        self.i = 0

    def next_k(self):
        self.i += 1
        return 2 if self.i % 2 else 3


def test_user_parts_without_the_bases_are_wrapped_and_their_missing_hooks_are_no_ops():
    target = chain()
    draft, policy = RepeatLast(6), TwoThenThree()
    gen = SpeculativeGenerator(draft, target, policy, acceptor=rejection)
    assert isinstance(gen.draft, DraftAdapter) and gen.draft.inner is draft
    assert isinstance(gen.acceptor, AcceptorAdapter) and gen.acceptor.inner is rejection
    assert isinstance(gen.policy, KPolicyAdapter) and gen.policy.inner is policy
    assert isinstance(gen.target, TargetAdapter) and gen.target.inner is target  # MarkovChainLM has no kernels
    # the defaults the loop relies on
    assert gen.draft.name == "RepeatLast" and gen.acceptor.name == "rejection" and repr(gen.policy) == repr(policy)
    assert gen.draft.commit(torch.zeros(1), torch.ones(1)) is None and gen.draft.bind(target) is None
    assert gen.policy.needs_calibration(4) is False and gen.policy.keep_drafting is None
    assert gen.acceptor.lossless is None and not gen.acceptor.accepts_greedy_ids and gen.target.kernels is None
    assert gen.draft.V == 6  # other attributes read through to the object
    out = gen.sample(PROMPTS, 20, temperature=0, seed=1)
    assert torch.equal(out, target_greedy(target))
    assert 2 in gen.last_stats.k_counts and 3 in gen.last_stats.k_counts and policy.i == gen.last_stats.steps


def test_a_user_object_with_every_member_is_used_as_is():
    class Full(RepeatLast):
        name, deterministic, can_stop_early, can_couple = "full", True, False, False
        n_positions = batch_size = None

        def bind(self, target): ...
        def prefill(self, prompts): ...
        def commit(self, accepted, lengths): ...
        def keep_rows(self, rows): ...

    draft = Full(6)
    assert isinstance(draft, Draft)
    assert SpeculativeGenerator(draft, chain(), 3).draft is draft


def test_subclasses_of_the_bases_are_used_as_is_and_their_hooks_are_called():
    calls = {"bind": 0, "prefill": 0, "commit": 0, "keep_rows": 0, "begin": 0, "observe": 0}

    class Mine(DraftBase):
        deterministic = True

        def bind(self, target):
            calls["bind"] += 1
            self.V = target.vocab_size

        def prefill(self, prompts):
            calls["prefill"] += 1

        def propose(self, tokens, lengths, g, params, uniforms):
            ids = tokens.gather(1, (lengths - 1)[:, None]).expand(-1, g).contiguous()
            return ids, F.one_hot(ids, self.V).float()

        def commit(self, accepted, lengths):
            calls["commit"] += 1

        def keep_rows(self, rows):
            calls["keep_rows"] += 1

    class Rejection(AcceptorBase):
        lossless = True

        def __call__(self, draft_ids, draft_probs, target_probs, rng):
            return rejection(draft_ids, draft_probs, target_probs, rng)

    class Four(KPolicyBase):
        max_k = 4

        def next_k(self):
            return 4

        def begin_sequence(self):
            calls["begin"] += 1

        def observe(self, k, accepted, draft_s, target_s):
            calls["observe"] += 1

    draft, acceptor, policy, target = Mine(), Rejection(), Four(), chain()
    gen = SpeculativeGenerator(draft, target, policy, acceptor=acceptor)
    assert gen.draft is draft and gen.acceptor is acceptor and gen.policy is policy
    assert gen.last_stats is None and calls["bind"] == 1
    prompts = PROMPTS + [torch.arange(20) % 6]  # a prompt that fills the sequence: its row leaves at once
    out = gen.sample(prompts, 20, temperature=0, seed=2)
    assert torch.equal(out, target_greedy(target, prompts))
    s = gen.last_stats
    assert s.draft == "Mine" and s.acceptor == "Rejection" and s.lossless is True
    assert calls["prefill"] == calls["begin"] == 1 and calls["observe"] == s.steps
    assert calls["commit"] == s.steps + 1  # the prefill's token is committed too
    assert calls["keep_rows"] >= 1


@pytest.mark.parametrize("make,msg", [
    (lambda: SpeculativeGenerator(object(), chain(), 3), "draft must be a model.*propose"),
    (lambda: SpeculativeGenerator(type("NoPropose", (DraftBase,), {})(), chain(), 3),
     "NoPropose subclasses DraftBase but does not define propose"),
    (lambda: SpeculativeGenerator("ngram", chain(), 3, acceptor=type("NoCall", (AcceptorBase,), {})()),
     "NoCall subclasses AcceptorBase but does not define __call__"),
    (lambda: SpeculativeGenerator("ngram", chain(), type("NoNext", (KPolicyBase,), {"max_k": 3})()),
     "NoNext subclasses KPolicyBase but does not define next_k"),
    (lambda: SpeculativeGenerator("ngram", chain(), type("P", (), {"next_k": lambda self: 2})()),
     "k-policy P lacks 'max_k'"),
    (lambda: SpeculativeGenerator("ngram", type("T", (), {"vocab_size": 6, "batch_size": 1, "n_positions": 8})(), 3),
     "target T lacks 'forward', 'prefill', 'keep_rows' of the model interface"),
])
def test_a_part_missing_a_required_member_is_a_clear_error(make, msg):
    with pytest.raises(TypeError, match=msg):
        make()


def test_targets_with_the_whole_interface_are_not_wrapped(tiny_trio):
    target = tiny_trio["target"]
    assert isinstance(target, Target) and SpeculativeGenerator("ngram", target, 3).target is target
    assert not isinstance(chain(), Target)


# ---- the greedy-id shortcut --------------------------------------------------------------------


class Counting(AcceptorBase):
    """Rejection sampling that counts which entry the loop used; opts in to the shortcut or not."""

    lossless = True

    def __init__(self, opt_in):
        self.accepts_greedy_ids = opt_in
        self.calls = {"call": 0, "greedy": 0}

    def __call__(self, draft_ids, draft_probs, target_probs, rng):
        self.calls["call"] += 1
        return rejection(draft_ids, draft_probs, target_probs, rng)

    def accept_greedy(self, draft_ids, choice):
        self.calls["greedy"] += 1
        return super().accept_greedy(draft_ids, choice)


@pytest.mark.parametrize("opt_in", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_greedy_shortcut_is_taken_exactly_when_the_acceptor_says_so(opt_in, temperature):
    target = chain()
    acc = Counting(opt_in)
    gen = SpeculativeGenerator(chain(seed=1), target, 3, acceptor=acc)
    out = gen.sample(PROMPTS, 20, temperature=temperature, seed=3)
    passes = gen.last_stats.steps + 1  # and the prefill's token
    by_ids = opt_in and temperature == 0
    assert acc.calls == {"call": 0 if by_ids else passes, "greedy": passes if by_ids else 0}
    if temperature == 0:
        assert torch.equal(out, target_greedy(target))


@pytest.mark.parametrize("subclass", [True, False])
def test_an_acceptors_own_greedy_rule_is_checked(subclass):
    def accept_greedy(self, draft_ids, choice):
        return torch.full((len(choice),), draft_ids.shape[1] + 1), choice  # one more draft than there are

    members = {"accepts_greedy_ids": True, "accept_greedy": accept_greedy, "__call__": lambda self, *a: rejection(*a)}
    acceptor = type("Overcount", (AcceptorBase,) if subclass else (), members)()
    with pytest.raises(ValueError, match="accepted count outside"):
        SpeculativeGenerator(chain(seed=1), chain(), 3, acceptor=acceptor).sample(PROMPTS, 12, temperature=0)


def test_which_stock_acceptors_take_the_shortcut(monkeypatch):
    assert DefaultTokenAcceptor().accepts_greedy_ids and GreedyTokenAcceptor().accepts_greedy_ids
    assert not DefaultTokenAcceptor(kernel=lambda *a: rejection_sample(*a)).accepts_greedy_ids  # a backend's or user's
    assert not type("Sub", (DefaultTokenAcceptor,), {})().accepts_greedy_ids  # a subclass opts in itself
    assert not type("Sub", (GreedyTokenAcceptor,), {})().accepts_greedy_ids
    for name in ("sample-match", "coupled", "typical"):
        assert not SpeculativeGenerator("ngram", chain(), 3, acceptor=name).acceptor.accepts_greedy_ids
    used = []
    original = DefaultTokenAcceptor.accept_greedy
    monkeypatch.setattr(DefaultTokenAcceptor, "accept_greedy", lambda self, *a: used.append(1) or original(self, *a))
    gen = SpeculativeGenerator("ngram", chain(), 3)
    gen.sample(PROMPTS, 20, temperature=0)
    assert len(used) == gen.last_stats.steps + 1
    used.clear()
    gen.sample(PROMPTS, 20, temperature=0.7, seed=0)
    assert not used


# ---- enable_speculative_decoder: the target's default k ----------------------------------------


def test_enable_speculative_decoder_sets_the_default_k(tiny_trio):
    target, draft = tiny_trio["target"], tiny_trio["other"]
    saved = list(target.speculation_lengths)
    try:
        target.speculation_lengths = []
        with pytest.raises(ValueError, match="pass k to SpeculativeGenerator.*enable_speculative_decoder"):
            SpeculativeGenerator(draft, target)
        target.enable_speculative_decoder(3)
        gen = SpeculativeGenerator(draft, target)
        assert repr(gen.policy) == "FixedK(3)"
        assert repr(SpeculativeGenerator(draft, target, 5).policy) == "FixedK(5)"  # an explicit k wins
        ps = [torch.tensor([5, 3, 8]), torch.tensor([1])]
        assert torch.equal(gen.sample(ps, 24, temperature=0), target.sample(ps, 24, temperature=0))
        assert max(gen.last_stats.k_counts) == 3  # (fewer only where the sequence ends)
        target.enable_speculative_decoder([2, 5, 4])  # several lengths: k = "auto" up to the largest
        assert repr(SpeculativeGenerator(draft, target).policy) == "AdaptiveK(max_k=5)"
        for bad, exc in (([], TypeError), ([2, 2.5], TypeError), (0, ValueError), (target.n_positions, ValueError)):
            with pytest.raises(exc):
                target.enable_speculative_decoder(bad)
    finally:
        target.speculation_lengths = saved


# ---- one sampling loop ---------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(temperature=0.9, top_p=0.9, seed=5), dict(temperature=0.0),
                                dict(temperature=1.2, top_k=7, seed=6, eos_token_id=3)])
def test_model_sample_is_the_loop_at_k_1(tiny_trio, kw):
    target = tiny_trio["target"]
    ps = [torch.tensor([5, 3, 8, 1]), torch.tensor([2, 9]), torch.tensor([7, 7, 7, 4, 1])]
    out = target.sample(ps, 24, **kw)
    assert set(target.last_stats) == {"new_tokens", "prefill_s", "decode_s", "tokens_per_s"}
    assert torch.equal(SpeculativeGenerator(None, target, 1).sample(ps, 24, **kw), out)
    streamed = {b: [] for b in range(3)}
    for step in target.stream(ps, 24, **kw):
        for b, toks in step.items():
            streamed[b] += toks
    for b, p in enumerate(ps):
        new = out[b, len(p):].tolist()
        if "eos_token_id" in kw and kw["eos_token_id"] in new:
            new = new[: new.index(kw["eos_token_id"]) + 1]
        assert streamed[b] == new
    assert target.last_stats["new_tokens"] == sum(map(len, streamed.values()))


def test_model_sample_coupled_is_the_coupled_loop(tiny_trio):
    target = tiny_trio["target"]
    ps = [torch.tensor([5, 3, 8, 1]), torch.tensor([2, 9])]
    out = target.sample(ps, 24, 0.8, seed=4, coupled=True)
    assert torch.equal(SpeculativeGenerator(None, target, 1, acceptor="coupled").sample(ps, 24, 0.8, seed=4), out)


def test_one_prompt_preparation():
    ragged = [torch.tensor([3, 1, 2]), torch.tensor([0])]
    padded, lengths = pad_prompts(ragged)
    assert padded.tolist() == [[3, 1, 2], [0, 0, 0]] and lengths.tolist() == [3, 1]
    square = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32)
    padded, lengths = pad_prompts(square)
    assert padded.dtype == torch.long and padded.tolist() == [[1, 2], [3, 4]] and lengths.tolist() == [2, 2]
    prompts, padded, lengths = prepare_prompts(torch.zeros(10**5, 2, dtype=torch.long), 6, 10**5, 8, 16)
    assert isinstance(prompts, torch.Tensor) and padded.shape == (10**5, 2) and int(lengths.sum()) == 2 * 10**5
    with pytest.raises(ValueError, match="prompt 1 holds a token id outside"):
        prepare_prompts(torch.tensor([[1, 2], [3, 9]]), 6, 4, 8, 16)


def test_model_prefill_takes_a_list_or_a_square_tensor(tiny_trio):
    target = tiny_trio["target"]
    square = torch.tensor([[5, 3, 8], [1, 2, 4]])
    a = target.prefill(square)
    b = target.prefill(list(square))
    assert a.shape == (2, target.vocab_size) and torch.equal(a, b)


# ---- the loop reads in one screen ----------------------------------------------------------------


def test_step_fits_one_screen_and_the_loop_probes_no_optional_hooks():
    from verispec.spec import generator

    from verispec.spec import tree_step

    dispatch = inspect.getsource(SpeculativeGenerator.step)
    assert "_tree_step()" in dispatch and "_chain_step(self._next_k())" in dispatch
    for fn, stages in ((SpeculativeGenerator._chain_step, ("_propose(", "self.target.forward(", "_accept(", "_commit(")),
                       (tree_step.TreeSteps._tree_step, ("propose_tree(", "self.target.forward(", "_accept_tree(",
                                                         "kv_gather(", "_commit("))):
        step = inspect.getsource(fn)
        assert len(step.splitlines()) <= 50, f"{fn.__name__}() has {len(step.splitlines())} lines"
        at = [step.find(stage) for stage in stages]
        assert -1 not in at and at == sorted(at)  # propose -> verify -> accept -> commit, top to bottom
    source = inspect.getsource(generator) + inspect.getsource(tree_step)
    assert "hasattr(" not in source
    assert not re.search(r"getattr\(self\.(draft|acceptor|policy|target)", source)
    assert "kernels.cpu" not in source and not re.search(r"type\(self\.acceptor\) is\b", source)


def test_resolving_a_resolved_part_again_keeps_it():
    """make_policy / make_draft / make_acceptor of what they returned is that object (a checker or
    a wrapper may resolve a user's part first and hand the result on)."""
    from verispec.spec.resolve import make_acceptor, make_draft, make_policy

    class Policy:
        max_k = 3

        def next_k(self):
            return 3

    class Draft:
        def propose(self, tokens, lengths, g, params, uniforms, **kw):
            raise AssertionError("not called")

    def acceptor(draft_ids, draft_probs, target_probs, rng):
        raise AssertionError("not called")

    for make, part in ((make_policy, Policy()), (lambda x: make_draft(x, None), Draft()),
                       (lambda x: make_acceptor(x, None), acceptor)):
        once = make(part)
        assert make(once) is once
