"""Test doubles live in ``verispec.testing``, not in the main API (``verispec.spec``)."""

import verispec.spec
import verispec.testing
from verispec.spec.checker import check_exactness


def test_doubles_are_in_verispec_testing_only():
    for name in ("MarkovChainLM", "ArgmaxSoftQDraft", "SharedUniformAcceptor"):
        assert hasattr(verispec.testing, name)
        assert not hasattr(verispec.spec, name)
    assert "never for real use" in verispec.testing.__doc__


def test_checker_still_resolves_the_biased_names():
    """``verispec check`` takes the biased parts by name (``argmax-softq``, ``shared-uniform``)."""
    draft = check_exactness("default", "argmax-softq", 3, samples=20_000, vocab=5, length=3)
    acceptor = check_exactness("shared-uniform", "model", 3, samples=20_000, vocab=5, length=3)
    assert not draft.passed and not acceptor.passed
