"""Exact speculative sampling: the loop, token acceptors, draft providers, statistics and the
exactness checker. Toy models and deliberately biased parts live in ``verispec.testing``."""

from .acceptors import (
    ACCEPTORS,
    CoupledAcceptor,
    DefaultTokenAcceptor,
    GreedyTokenAcceptor,
    SampleMatchAcceptor,
    TypicalAcceptor,
)
from .block import BlockAcceptor, PairedBlockGain
from .coupled import PositionalNoise
from .drafts import LayerSkipDraft, ModelDraft, NGramDraft, ngram_lookup
from .generator import GenerationResult, SpeculativeGenerator, StepTokens
from .policy import AdaptiveK, FixedK
from .protocols import Acceptor, AcceptorBase, Draft, DraftBase, KPolicy, KPolicyBase, Target, TargetBase
from .randomness import AcceptorRandomness, SpeculativeRandomness
from .rejection import rejection_sample
from .stats import SpecStats, predicted_speedup
from .tree_acceptors import RecursiveTreeAcceptor, TraversalTreeAcceptor  # registers "recursive", "traversal"

__all__ = [
    "ACCEPTORS",
    "Acceptor",
    "AcceptorBase",
    "AcceptorRandomness",
    "BlockAcceptor",
    "PairedBlockGain",
    "CoupledAcceptor",
    "DefaultTokenAcceptor",
    "Draft",
    "DraftBase",
    "AdaptiveK",
    "FixedK",
    "GenerationResult",
    "GreedyTokenAcceptor",
    "KPolicy",
    "KPolicyBase",
    "LayerSkipDraft",
    "ModelDraft",
    "NGramDraft",
    "PositionalNoise",
    "RecursiveTreeAcceptor",
    "SampleMatchAcceptor",
    "SpecStats",
    "SpeculativeGenerator",
    "SpeculativeRandomness",
    "StepTokens",
    "Target",
    "TargetBase",
    "TraversalTreeAcceptor",
    "TypicalAcceptor",
    "ngram_lookup",
    "predicted_speedup",
    "rejection_sample",
]
