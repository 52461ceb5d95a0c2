"""verispec: exact speculative decoding for Llama-family models.

Subpackages: ``verispec.model`` (decoder, loaders, LlamaForSampling), ``verispec.kernels``
(kernel contract and backends), ``verispec.spec`` (speculative loop, acceptors, drafts,
exactness checker) and ``verispec.parallel`` (tensor parallelism).
"""

__version__ = "0.1.0"
