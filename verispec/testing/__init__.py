"""Test doubles for checking the speculative loop, never for real use.

* :class:`MarkovChainLM` (``markov_chain``): toy target and draft models, random Markov chains over
  a tiny vocabulary with the same model interface as ``LlamaForSampling``, so the real loop runs
  on 10^5 rows at once and its output law can be compared with the exact one (the exactness
  checker, ``verispec check``, and tests tiers 3 and 4 of docs/exactness.md).
* ``biased``: deliberately WRONG components (:class:`ArgmaxSoftQDraft`,
  :class:`SharedUniformAcceptor`; ``verispec check`` names ``argmax-softq`` and
  ``shared-uniform``) that the checker must catch: a harness that cannot fail proves nothing.
  Never generate text with them.
"""

from .biased import BIASED_ACCEPTORS, BIASED_DRAFTS, ArgmaxSoftQDraft, SharedUniformAcceptor
from .markov_chain import MarkovChainLM

__all__ = ["BIASED_ACCEPTORS", "BIASED_DRAFTS", "ArgmaxSoftQDraft", "MarkovChainLM", "SharedUniformAcceptor"]
