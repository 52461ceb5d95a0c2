"""LlamaForSampling: a loaded decoder + its static KV cache + target-only sampling.

The API mirrors transformers-neuronx: ``from_pretrained(..., n_positions, batch_size, tp_degree,
amp)``, ``enable_speculative_decoder(k)``, ``sample(input_ids, sequence_length)``. It is also the
model interface the speculative loop drives (``forward``, ``keep_rows``, ``vocab_size``).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

import torch

from ..kernels import KernelSet, get_backend, reference
from .cache import KVCache
from .config import LlamaConfig
from .decoder import Decoder
from .loader import SafetensorsSource, TensorSource, check_source, expected_tensors, materialize
from .prompts import pad_prompts

log = logging.getLogger("verispec.model")

QUANT_MODES = ("int8", "w8a8")  # weight quantizations a kernel backend may offer (the cpu backend: both)
AMP_DTYPES = {"f32": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "fp16": torch.float16}


def amp_dtype(amp: str) -> torch.dtype:
    try:
        return AMP_DTYPES[amp]
    except KeyError:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}") from None


def open_source(path_or_name: str | os.PathLike, progress: bool = False) -> tuple[LlamaConfig, TensorSource, Path]:
    """Resolve an HF directory, a .gguf file or a registered model name to (config, source, path)."""
    from ..kernels import warm_up_backends

    warm_up_backends()  # e.g. a first build of native kernels compiles while models are fetched and loaded
    p = Path(os.path.expanduser(str(path_or_name)))
    if p.is_dir():
        return LlamaConfig.from_json_file(p / "config.json"), SafetensorsSource(p), p
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            from .gguf_source import GGUFSource
            from .hub import registered_name, verify

            name = registered_name(p)
            if name is not None:  # a named model's cached file: sha256-checked after any change
                verify(name, progress=progress)
            src = GGUFSource(p)
            return src.config, src, p
        raise ValueError(f"{p}: not a model directory or a .gguf file")
    from .hub import is_registered, resolve, suggestion

    if is_registered(str(path_or_name)):
        return open_source(resolve(str(path_or_name), progress=progress), progress)
    raise FileNotFoundError(
        f"{path_or_name}: no such directory or file, and not a registered model name{suggestion(str(path_or_name))} "
        f"(see `verispec fetch --list`)"
    )


def check_amx(kernels: KernelSet, amp: str, quant: str | None, tp_degree: int) -> None:
    """amx=True needs bf16 weights and activations, the cpu backend's native products and a CPU
    (and kernel) that grant AMX tiles."""
    if kernels.name != "cpu":
        raise ValueError(f"amx=True runs the cpu kernel backend's products; the backend here is {kernels.name!r}")
    if amp_dtype(amp) != torch.bfloat16:
        raise ValueError(f"amx=True multiplies bf16 weights; use amp='bf16' (got amp={amp!r})")
    if quant is not None:
        raise ValueError(f"amx=True multiplies bf16 weights; quant={quant!r} stores int8 ones")
    if tp_degree != 1:
        raise ValueError(f"amx=True is implemented for tp_degree=1 (got tp_degree={tp_degree})")
    from ..kernels.cpu.build import build_error, tiles_available

    if not tiles_available():
        why = build_error() or "this CPU lacks AMX-BF16, or the kernel refused the process its tile state"
        raise RuntimeError(f"amx=True: AMX tiles are unavailable here ({why})")


class LlamaForSampling:
    def __init__(
        self,
        decoder: Decoder,
        *,
        n_positions: int,
        batch_size: int,
        amp: str = "f32",
        kernels: KernelSet | None = None,
        device: str | torch.device = "cpu",
        tp=None,
        source_path: Path | None = None,
        quant: str | None = None,
        amx: bool = False,
    ):
        self.decoder = decoder
        self.amx = amx  # bf16 products on AMX tiles (the cpu backend's compile)
        self.config: LlamaConfig = decoder.config
        self.n_positions = n_positions
        self.batch_size = batch_size
        self.amp = amp
        self.dtype = amp_dtype(amp)
        self.device = torch.device(device)
        self.kernels = kernels if kernels is not None else get_backend(None, device=str(self.device))
        self.recompile()
        self.tp = tp  # verispec.parallel state when tp_degree > 1
        self.source_path = source_path
        self.quant = quant  # weight quantization ("int8", "w8a8") or None
        attn = decoder.model.layers[0].self_attn
        self.cache = KVCache(
            len(decoder.model.layers), batch_size, attn.n_kv_heads, n_positions, attn.head_dim, self.dtype, self.device
        )
        self.speculation_lengths: list[int] = []
        self.last_stats: dict = {}
        self._tokenizer = None

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | os.PathLike,
        n_positions: int = 2048,
        batch_size: int = 1,
        tp_degree: int = 1,
        amp: str = "f32",
        kernel_backend: str | None = None,
        device: str | torch.device = "cpu",
        progress: bool = False,
        quant: str | None = None,
        amx: bool = False,
    ) -> "LlamaForSampling":
        """Load a model. ``quant="int8"`` stores the weights of every linear layer as int8 with a
        per-row scale (CPU, tp_degree 1): half the bytes a decode step streams, for draft models
        (a draft's precision changes acceptance, never the output distribution). ``quant="w8a8"``
        also rounds the activations to int8 (blocks of 64) for integer dot products: faster still.
        ``amx=True`` runs every bf16 product of few rows on Intel AMX tiles (cpu backend, amp="bf16",
        no quant): a verify pass of up to 16 tokens then costs about what a one-token step does,
        while a one-token step streams its weights 2-10% slower than the default vector kernels.
        The two kernels round differently (each is exact to its bf16 outputs); a model uses one for
        all its products, so its verify passes reproduce its own decode steps bit for bit."""
        dtype = amp_dtype(amp)
        if not isinstance(amx, bool):
            raise TypeError(f"amx must be True or False, got {amx!r}")
        if quant is not None:
            if quant not in QUANT_MODES:
                raise ValueError(f"unknown quant={quant!r}; choose one of {', '.join(QUANT_MODES)} (or None)")
            if tp_degree != 1 or torch.device(device).type != "cpu":
                raise ValueError(f"quant={quant!r} is implemented for CPU models with tp_degree=1 "
                                 f"(got device={device!r}, tp_degree={tp_degree})")
            if kernel_backend not in (None, "cpu"):  # its int8 products are the cpu backend's native code
                raise ValueError(f"quant={quant!r} needs kernel_backend='cpu' (got {kernel_backend!r})")
        for name, v in (("n_positions", n_positions), ("batch_size", batch_size), ("tp_degree", tp_degree)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        kernels = get_backend(kernel_backend, device=str(device))  # chosen once, here
        if amx:
            check_amx(kernels, amp, quant, tp_degree)
        quantize = kernels.get("quantize")  # the backend's weight quantizer (the cpu backend's int8 products)
        if quant is not None and (quantize is None or quant not in getattr(quantize, "modes", ())):
            raise ValueError(f"quant={quant!r} needs the cpu kernel backend, which is unavailable here "
                             f"(backend {kernels.name!r}: no C compiler?)")
        config, source, path = open_source(path_or_name, progress=progress)
        from .converted import release_freed_memory, weights_source

        source = weights_source(source, path, dtype, progress)  # a named model: its converted weights
        if n_positions > config.max_position_embeddings:
            log.warning(
                "n_positions=%d exceeds the model's max_position_embeddings=%d", n_positions, config.max_position_embeddings
            )
        with torch.device("meta"):
            decoder = Decoder(config, n_positions)
        check_source(source, expected_tensors(decoder), config.tie_word_embeddings)
        shard_fn, tp = None, None
        if tp_degree != 1:
            from ..parallel.plan import apply_tensor_parallel

            shard_fn, tp = apply_tensor_parallel(decoder, tp_degree, device=device)
            device = tp.device  # cuda -> cuda:LOCAL_RANK, one GPU per rank
        bar = _progress_bar(progress, f"loading {path.name}")
        t0 = time.perf_counter()
        materialize(decoder, source, dtype, device, shard_fn=shard_fn, progress=bar)
        log.info("timing: load weights of %s from %s %.2f s", path.name, type(source).__name__, time.perf_counter() - t0)
        t0 = time.perf_counter()
        release_freed_memory()  # what dequantizing a GGUF left in the heap, before quantize adds its own
        decoder.rope_cos = decoder.rope_cos.to(device)
        decoder.rope_sin = decoder.rope_sin.to(device)
        decoder.eval()
        if quant is not None:
            quantize(decoder, quant)
        model = cls(
            decoder, n_positions=n_positions, batch_size=batch_size, amp=amp, kernels=kernels, device=device, tp=tp,
            source_path=path, quant=quant, amx=amx,
        )  # (compiles the decoder where the backend has a compiler)
        release_freed_memory()
        log.info("timing: quantize/compile %s %.2f s", path.name, time.perf_counter() - t0)
        return model

    def recompile(self) -> None:
        """Hand the decoder to its kernel backend's ``compile`` (where the backend has one, e.g.
        the ``cpu`` backend's native step) and call what it returns from now on; without one, the
        decoder itself runs. Called at load. Call it again after changing the model in a way the
        backend cannot see: weights edited in place or assigned, modules replaced and hooks added
        are seen without it (see docs/design.md); a patched ``forward`` or a changed constant
        (``eps``, ``scale``) is not."""
        compile_ = self.kernels.get("compile")
        if compile_ is None:
            self.runner = self.decoder
        else:
            self.runner = compile_(self.decoder, amx=True) if self.amx else compile_(self.decoder)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def tokenizer(self):
        """The model's tokenizer (from tokenizer.json or the GGUF vocabulary), loaded on first use."""
        if self._tokenizer is None:
            if self.source_path is None:
                raise ValueError("this model was not loaded from a path; it has no tokenizer")
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_pretrained(self.source_path)
        return self._tokenizer

    def reset(self) -> None:
        """Forget all sequences. The cache is position-indexed, so nothing needs clearing:
        the next prefill writes from slot 0 and the mask never shows older slots."""
        self.last_stats = {}

    def enable_speculative_decoder(self, k) -> None:
        """Set the speculation length (tokens scored per verify pass) that
        ``SpeculativeGenerator(draft, self)`` uses when it is given no k. An int is that k. A list
        of ints (transformers-neuronx compiles one graph per listed length; verispec runs any k)
        means k="auto" up to the list's largest: AdaptiveK chooses k before each step."""
        ks = [k] if isinstance(k, int) and not isinstance(k, bool) else list(k) if isinstance(k, (list, tuple)) else None
        if not ks or any(isinstance(x, bool) or not isinstance(x, int) for x in ks):
            raise TypeError(f"k must be an int or a non-empty list of ints, got {k!r}")
        for x in ks:
            if not 1 <= x < self.n_positions:
                raise ValueError(f"speculation length k={x} out of range: need 1 <= k < n_positions={self.n_positions}")
        self.speculation_lengths = sorted(set(ks))

    # ---- the model interface driven by samplers and the speculative loop ------------------------

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T] with B <= batch_size
        positions: torch.Tensor,  # [B] first cache slot per row
        logits_at: torch.Tensor | None = None,  # [B, n]
        active_mask: torch.Tensor | None = None,  # [B, T, T]
        num_layers: int | None = None,
        position_ids: torch.Tensor | None = None,  # [B, T]
    ) -> torch.Tensor:  # [B, T or n, V] fp32
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if B > self.batch_size:
            raise ValueError(f"batch of {B} rows exceeds batch_size={self.batch_size} given to from_pretrained")
        if positions.shape != (B,):
            raise ValueError(f"positions must be [B={B}], got {tuple(positions.shape)}")
        first = positions.tolist()  # (one conversion, not a max and a min: this runs every step)
        end = max(first, default=0) + T
        if min(first, default=0) < 0 or end > self.n_positions:
            raise ValueError(f"sequence longer than n_positions={self.n_positions}: a row would reach slot {end - 1}")
        dev = self.device
        return self.runner(
            input_ids.to(dev), positions.to(dev), self.cache, self.kernels,
            logits_at=None if logits_at is None else logits_at.to(dev),
            active_mask=None if active_mask is None else active_mask.to(dev),
            position_ids=None if position_ids is None else position_ids.to(dev),
            num_layers=num_layers,
        )

    def sync_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Make every tensor-parallel rank agree on sampled tokens (rank 0's win). A tp_degree=1
        model inside a tensor-parallel job (a draft replicated on every rank) takes part too, so
        what it feeds the target is the same everywhere; outside such a job, a no-op."""
        if self.tp is not None:
            return self.tp.broadcast_tokens(tokens)
        from ..parallel.mappings import broadcast_tokens_if_parallel

        return broadcast_tokens_if_parallel(tokens)

    def keep_rows(self, rows: list[int]) -> None:
        """Continue only cache rows ``rows`` (moved to the front, in order)."""
        self.cache.keep_rows(rows)

    def kv_gather(self, src_slots: torch.Tensor, dst_start: torch.Tensor, counts: torch.Tensor) -> None:
        """Every layer's K/V, rows 0 .. B - 1: slots dst_start[b] + i (i < counts[b]) take what slots
        src_slots[b, i] held (after a token tree: the accepted path moves next to the prefix). The
        backend's ``kv_gather`` kernel where it has one, else the torch reference."""
        gather = self.kernels.get("kv_gather") or reference.kv_gather
        B = src_slots.shape[0]
        if B > self.batch_size:
            raise ValueError(f"kv_gather over {B} rows exceeds batch_size={self.batch_size}")
        src, start, cnt = (t.to(self.device) for t in (src_slots, dst_start, counts))
        for k, v in zip(self.cache.k, self.cache.v):
            gather(k[:B], v[:B], src, start, cnt)

    def prefill(self, prompts) -> torch.Tensor:
        """Fill the cache with right-padded prompts (a list of 1-D LongTensors, or a [B, L] tensor
        of full-length prompts) from slot 0; return last-token logits [B, V].

        Padding after a row's prompt writes K/V past its valid length, which the causal mask
        hides from that row's real tokens and later writes overwrite.
        """
        ids, lengths = pad_prompts(prompts)  # [B, L_max], [B]
        pos = torch.zeros(len(ids), dtype=torch.long)
        return self.forward(ids, pos, logits_at=(lengths - 1)[:, None])[:, 0]

    # ---- target-only sampling -----------------------------------------------------------------

    def sample(
        self,
        input_ids,
        sequence_length: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id=None,
        coupled: bool = False,
    ) -> torch.Tensor:  # [B, sequence_length]
        """Target-only sampling. Rows finished by EOS are filled with that EOS id after it.
        The same tokens as ``SpeculativeGenerator(None, model, k=1).sample(...)`` with the same seed.

        ``coupled=True``: each token is the exponential race of the seed's position-keyed noise
        (verispec.spec.coupled), the same tokens a speculative run with ``acceptor="coupled"`` and
        this seed emits at any k and with any draft."""
        gen = self._target_only(coupled)
        out = gen.sample(input_ids, sequence_length, temperature, top_k, top_p, seed, eos_token_id)
        self.last_stats = _sampling_stats(gen.last_stats)
        return out

    def stream(self, input_ids, sequence_length: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, eos_token_id=None, coupled: bool = False):
        """Target-only sampling one token per step: yields ``{input row: [token]}`` for the rows
        that made a token this step (the first step includes the prefill); ``last_stats`` is set
        once the stream is exhausted. Same tokens as :meth:`sample` with the same arguments."""
        gen = self._target_only(coupled)
        for step in gen.stream(input_ids, sequence_length, temperature, top_k, top_p, seed, eos_token_id):
            yield step.per_row()
        self.last_stats = _sampling_stats(gen.last_stats)

    def _target_only(self, coupled: bool):
        """The speculative loop at k = 1 on this model: target-only decoding has one loop. (The one
        place the model layer calls the spec layer, imported here so that models load without it.)"""
        from ..spec.generator import SpeculativeGenerator

        return SpeculativeGenerator(None, self, 1, acceptor="coupled" if coupled else None, measure_decode_step=False)

    def fork(self) -> "LlamaForSampling":
        """A second model over the SAME weights with its own KV cache (and no stats), so two
        sequences can be decoded in turns, e.g. to time several paths step by step on one machine."""
        twin = copy.copy(self)
        attn = self.decoder.model.layers[0].self_attn
        twin.cache = KVCache(len(self.decoder.model.layers), self.batch_size, attn.n_kv_heads, self.n_positions,
                             attn.head_dim, self.dtype, self.device)
        twin.last_stats = {}
        twin.speculation_lengths = list(self.speculation_lengths)
        return twin


def _sampling_stats(stats) -> dict:
    """``last_stats`` of target-only sampling, from the loop's SpecStats."""
    return {"new_tokens": stats.new_tokens, "prefill_s": stats.prefill_s, "decode_s": stats.decode_s,
            "tokens_per_s": stats.new_tokens / max(stats.decode_s, 1e-9)}


def _progress_bar(enabled: bool, label: str):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import Progress

    prog = Progress(console=Console(stderr=True), transient=True)  # stdout stays for generated text
    task = prog.add_task(label, total=None)
    prog.start()

    def update(i: int, n: int) -> None:
        prog.update(task, completed=i, total=n)
        if i == n:
            prog.stop()

    return update
