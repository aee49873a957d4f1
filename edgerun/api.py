"""The public API: `edgerun.load(path)` returns a Model that generates text, chats and gives logits."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .checkpoint.loader import load_weights
from .checkpoint.source import Checkpoint, locate
from .errors import ArgumentError, CheckpointError, GenerationError, TokenizerError
from .models import spec_from_config
from .models.decoder import Decoder
from .models.spec import ModelSpec, eos_list
from .progress import ByteProgress
from .runtime import placement
from .runtime.engine import Engine
from .runtime.experts import ExpertsContainer, TorchExperts
from .runtime.placement import BudgetError, ModelLayout, available_ram, current_rss, peak_rss
from .runtime.policy import POLICIES
from .runtime.sampling import Sampler, SamplingParams
from .runtime.tier import MISSES
from .runtime.trace import RecentRouting
from .store.store import is_store
from .units import parse_size

if TYPE_CHECKING:
    from .checkpoint.tokenizer import Tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Model:
    """A loaded model. Generation methods are safe to call from several threads: calls run one at a time."""

    def __init__(self, spec: ModelSpec, engine: Engine, generation_config: dict, info: dict):
        self.path: Path = info["path"]
        self.spec = spec
        self._engine = engine
        self._lock = threading.Lock()
        self._tokenizer: Tokenizer | None = None
        self._generation_config = generation_config
        self._info = info
        self._recent = RecentRouting()  # the experts every MoE layer chose lately, for expert_activity()
        engine.decoder.observers.append(self._recent)
        self._warmer = None  # reads a mapped store into the page cache after loading

    # -- tokenizer -------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (tokenizer.json or tokenizer.model), loaded on first use."""
        if self._tokenizer is None:
            from .checkpoint.tokenizer import Tokenizer  # tokenizer libraries load only when text is used

            self._tokenizer = Tokenizer.from_dir(self._info["tokenizer_dir"], self._info.get("tokenizer_defaults"))
        return self._tokenizer

    @property
    def context_length(self) -> int:
        return self._engine.context_length

    def stop_token_ids(self) -> set[int]:
        """End-of-sequence ids from generation_config.json, config.json and the tokenizer."""
        ids = set(self.spec.eos_token_ids) | set(eos_list(self._generation_config.get("eos_token_id")))
        try:
            if self.tokenizer.eos_id is not None:
                ids.add(self.tokenizer.eos_id)
        except TokenizerError:
            pass
        return ids

    # -- sampling defaults ---------------------------------------------------------------------------------
    def _sampling(self, temperature, top_p, top_k, min_p, repetition_penalty, seed) -> SamplingParams:
        # Like transformers: the model's generation_config.json sets the defaults, greedy when it does not sample.
        g = self._generation_config
        sampling = bool(g.get("do_sample"))
        params = SamplingParams(
            temperature=float(g.get("temperature", 1.0)) if sampling else 0.0,
            top_k=int(g.get("top_k") or 0) if sampling else 0,
            top_p=float(g.get("top_p") or 1.0) if sampling else 1.0,
            min_p=float(g.get("min_p") or 0.0) if sampling else 0.0,
            repetition_penalty=float(g.get("repetition_penalty") or 1.0),
            seed=seed,
        )
        for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("min_p", min_p),
                            ("repetition_penalty", repetition_penalty)):
            if value is not None:
                setattr(params, name, value)
        return params

    # -- token level ---------------------------------------------------------------------------------------
    def logits(self, token_ids: Iterable[int], decode: bool = False) -> np.ndarray:
        """float32 [len(token_ids), vocab]: one full forward over token_ids from an empty cache. decode=True
        computes them as generation would have: the first token as a prompt, then one decode step per token (so
        that what applies to decoding, such as skip_below, applies here too)."""
        ids = self._check_ids(token_ids)
        with self._lock:
            return self._engine.logits(ids, decode).numpy()

    def generate_ids(self, prompt_ids: Iterable[int], max_new_tokens: int = 256, *, temperature: float | None = None,
                     top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
                     repetition_penalty: float | None = None, seed: int | None = None,
                     ignore_eos: bool = False) -> list[int]:
        """New token ids after prompt_ids (EOS not included; ignore_eos=True runs to max_new_tokens)."""
        ids = self._check_ids(prompt_ids)
        sampler = Sampler(self._sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed))
        stop = set() if ignore_eos else self.stop_token_ids()
        with self._lock:
            return list(self._engine.generate(ids, sampler, self._check_max(max_new_tokens), stop))

    def _check_ids(self, token_ids: Iterable[int]) -> list[int]:
        ids = [int(t) for t in token_ids]
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary (0..{self.spec.vocab_size - 1})")
        return ids

    @staticmethod
    def _check_max(max_new_tokens: int) -> int:
        if int(max_new_tokens) < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        return int(max_new_tokens)

    # -- text ----------------------------------------------------------------------------------------------
    def stream(self, prompt: str, max_new_tokens: int = 256, *, temperature: float | None = None,
               top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
               repetition_penalty: float | None = None, seed: int | None = None,
               stop: str | Iterable[str] | None = None, add_special_tokens: bool = True) -> Iterator[str]:
        """Generate from a raw prompt, yielding text pieces as they are decided (never half a character)."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return self.stream_ids(ids, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                               repetition_penalty=repetition_penalty, seed=seed, stop=stop)

    def stream_ids(self, prompt_ids: Iterable[int], max_new_tokens: int = 256, *, temperature: float | None = None,
                   top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
                   repetition_penalty: float | None = None, seed: int | None = None,
                   stop: str | Iterable[str] | None = None, chat: bool = False) -> Iterator[str]:
        """Generate from prompt token ids, yielding text as `stream` does; chat=True also stops at the chat
        template's end-of-turn tokens. Closing the iterator ends the generation at the next token; afterwards
        `stats()` counts the prompt (and its cached part), the generated tokens and the finish reason."""
        params = self._sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed)
        return self._stream_ids(list(prompt_ids), max_new_tokens, params, stop,
                                self.tokenizer.chat_stop_ids if chat else frozenset())

    def generate(self, prompt: str, max_new_tokens: int = 256, **kwargs) -> str:
        """Generate from a raw prompt and return the new text. Takes the same arguments as `stream`."""
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))

    def stream_chat(self, messages: list[dict], max_new_tokens: int = 512, *, temperature: float | None = None,
                    top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
                    repetition_penalty: float | None = None, seed: int | None = None,
                    stop: str | Iterable[str] | None = None) -> Iterator[str]:
        """Reply to messages ([{"role": ..., "content": ...}]) rendered with the model's chat template."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # The template writes the special tokens itself (BOS included), so none are added when encoding.
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.stream_ids(ids, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                               repetition_penalty=repetition_penalty, seed=seed, stop=stop, chat=True)

    def chat(self, messages: list[dict], max_new_tokens: int = 512, **kwargs) -> str:
        """The whole reply to messages. Takes the same arguments as `stream_chat`."""
        return "".join(self.stream_chat(messages, max_new_tokens, **kwargs))

    def _stream_ids(self, ids: list[int], max_new_tokens: int, params: SamplingParams,
                    stop: str | Iterable[str] | None, stop_ids: set[int] = frozenset()) -> Iterator[str]:
        stops = _stop_list(stop)
        sampler = Sampler(params)
        max_new_tokens = self._check_max(max_new_tokens)
        self._check_ids(ids)
        return self._run_text(ids, max_new_tokens, sampler, stops, self.stop_token_ids() | stop_ids)

    def _run_text(self, ids, max_new_tokens, sampler, stops, stop_ids: set[int]) -> Iterator[str]:
        decoder = self.tokenizer.stream_decoder()
        with self._lock:
            text, sent = "", 0
            tokens = self._engine.generate(ids, sampler, max_new_tokens, stop_ids)
            try:
                for token in tokens:
                    text += decoder.push(token)
                    cut, hold = _find_stop(text, sent, stops)
                    if cut is not None:
                        if cut > sent:
                            yield text[sent:cut]
                        self._engine.stats.finish_reason = "stop"
                        return
                    if hold > sent:
                        yield text[sent:hold]
                        sent = hold
                text += decoder.flush()
                cut, _ = _find_stop(text, sent, stops)
                end = len(text) if cut is None else cut
                if end > sent:
                    yield text[sent:end]
            finally:
                tokens.close()

    # -- routing traces --------------------------------------------------------------------------------------
    @contextmanager
    def record_routing(self, path: str | os.PathLike, problem_id: int = 0) -> Iterator[None]:
        """Within the block, write the experts every token uses to path (JSON lines, one per token and layer;
        see `edgerun trace replay`)."""
        from .runtime.trace import TraceWriter

        observers = self._engine.decoder.observers
        try:
            writer = TraceWriter(path)
        except OSError as e:
            raise GenerationError(f"cannot write the trace to {path}: {e.strerror or e}") from None
        seen: dict[int, int] = {}  # layer -> tokens recorded

        def tracer(layer: int, idx: torch.Tensor, weights: torch.Tensor) -> None:
            first = seen.get(layer, 0)
            for t, (chosen, probs) in enumerate(zip(idx.tolist(), weights.float().tolist())):
                writer.record(problem_id, first + t, layer, chosen, probs)
            seen[layer] = first + idx.shape[0]

        with self._lock:
            observers.append(tracer)
        try:
            yield
        finally:
            observers.remove(tracer)
            writer.close()

    # -- reporting -----------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Figures of the last generation (tokens/s of prefill and decode, time to first token) and the model."""
        out = self._engine.stats.as_dict()
        out.update({
            "model_type": self.spec.model_type,
            "context_length": self.context_length,
            "kv_cache_bytes": self._engine.cache.nbytes,
            "dtype": str(self._engine.decoder.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
        })
        out.update({k: str(v) if isinstance(v, Path) else v for k, v in self._info.items()
                    if not k.startswith("tokenizer_")})
        out.update(self._engine.experts.stats())
        if out.get("decode_read_seconds") is not None and out["decode_seconds"]:
            # the share of decoding the disk spent reading: near 1, reading sets the pace; well below 1 with read
            # stalls, the reads are not started early enough; well below 1 without, computing sets it
            out["read_busy_share"] = out["decode_read_seconds"] / out["decode_seconds"]
        if self._warmer is not None:
            out["warmup"] = self._warmer.stats()
        out["peak_rss_bytes"] = peak_rss()
        return out

    def expert_activity(self, tokens: int = 32) -> dict:
        """Per MoE layer, which experts the last `tokens` tokens (prompt or generated, at most 256) chose and
        which experts are in RAM now. May be called from another thread while a generation runs.

        Returns {"layers": the MoE layers' indices, "num_experts": E, "tokens": tokens counted (fewer
        before any have run), "used": [layer][expert] how many of those tokens chose the expert,
        "resident": [layer][expert] whether its weights are in RAM, "loading": [layer][expert] whether
        they are being read from disk now, "on_gpu": [layer][expert] whether they are in a GPU slot,
        "all_resident": True when every expert is always in memory}.
        """
        layers = self.spec.moe_layers
        E = self.spec.num_experts
        used, counted = [], 0
        for layer in layers:
            counts, n = self._recent.counts(layer, E, int(tokens))
            used.append(counts)
            counted = max(counted, n)
        where = self._engine.experts.residency()
        if where is None:
            resident = [[True] * E for _ in layers]
            loading = on_gpu = [[False] * E for _ in layers]
        else:
            resident, loading, on_gpu = ([[(layer, e) in keys for e in range(E)] for layer in layers]
                                         for keys in where)
        return {"layers": layers, "num_experts": E, "tokens": counted, "used": used, "resident": resident,
                "loading": loading, "on_gpu": on_gpu, "all_resident": where is None}

    # -- the decoder and its experts container -------------------------------------------------------------
    @property
    def decoder(self) -> Decoder:
        """The model math: the parts it is composed of, their tensors, the routers (models.decoder.Decoder)."""
        return self._engine.decoder

    @property
    def experts(self) -> ExpertsContainer:
        """The container that computes the routed experts (in RAM, memory-mapped, or offloaded to a store)."""
        return self._engine.experts

    def use_experts(self, experts: ExpertsContainer) -> ExpertsContainer:
        """Compute the routed experts with another container (see runtime.experts.ExpertsContainer) from the next
        call on; returns the one it replaces, which the caller may close."""
        with self._lock:
            return self._engine.use_experts(experts)

    def __repr__(self) -> str:
        return f"<edgerun.Model {self.spec.model_type} from {self.path}>"


def _stop_list(stop: str | Iterable[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise GenerationError("stop must be a non-empty string or a list of non-empty strings")
    return stops


def _find_stop(text: str, sent: int, stops: list[str]) -> tuple[int | None, int]:
    """(where a stop string starts, or None; how far text may be released without revealing part of one)."""
    if not stops:
        return None, len(text)
    longest = max(map(len, stops))
    window = max(0, sent - longest + 1)
    hits = [i for i in (text.find(s, window) for s in stops) if i >= 0]
    if hits:
        return min(hits), len(text)
    hold = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = min(hold, len(text) - k)
                break
    return None, hold


def load(path: str | os.PathLike, *, quant: str | None = None, dense: str | None = None,
         context_length: int | None = None, dtype: str = "auto", threads: int | None = None,
         progress: bool | None = None, ram: str | int | None = None, policy: str = "default",
         prefetch: bool = True, gpu: str | int | None = None, device: str = "auto", misses: str = "auto",
         skip_below: float | Sequence[float] = 0.0, low_below: float | Sequence[float] = 0.0,
         low_when_late: bool = False, substitute_below: float | Sequence[float] = 0.0,
         reserve: str | int = 0) -> Model:
    """Open a model: a Hugging Face directory (config.json, *.safetensors, tokenizer), a repo id in the HF
    cache, Grok-1 as xai-org released it (the folder holding ckpt-0/, or ckpt-0/ itself), or an edgerun store
    made by `edgerun convert`.

    quant: for a checkpoint, "none" (default: run the checkpoint as it is), or "bf16", "q8", "q4" to
        convert it once into an expert store in the user cache dir and run from that (reused afterwards).
    dense: with quant, the format of the non-expert matrices (default q8 for q8/q4).
    context_length: tokens the KV cache holds (default: the model's, capped at 4096).
    dtype: "auto" (the checkpoint's; float16 computes in float32 on the CPU), "float32", "bfloat16".
        Quantized weights always compute in float32.
    threads: CPU threads for torch and the kernels (default: for q8/q4 stores, the fewest threads that run the
        kernels at full speed in this machine's profile, when one has been measured; else one per core).
    progress: show a progress bar while converting or reading weights (default: for large models on a
        terminal).
    ram: memory budget of the whole process for a q8/q4 store ("12GiB", "1.5GB" or bytes; default: what the
        machine has available, less a safety margin). Experts that do not fit stay on disk and are read into
        a cache of expert slots as they are needed; a budget below the minimum raises BudgetError.
    reserve: memory the process will still take besides the model once it is loaded (a web server's sessions, for
        one: "32MiB" or bytes; default 0), counted with the process's own memory when the RAM budget is split.
    policy: eviction policy of the expert caches: "default" (forecasts each expert's next use), "lru", "lfu".
    prefetch: predict the experts of the next layers and read them ahead (and copy them to the GPU); when every
        expert fits the budget, read the whole store into the page cache in the background after loading.
    gpu: GPU memory a q8/q4 store may use ("6GB" or bytes; default: the device's free memory less a margin;
        0: none). The dense weights and the KV cache go there when they fit, then a cache of expert slots in
        front of the RAM's; experts missing from it run where they cost least (see `misses`).
    device: the GPU: "auto" (the first CUDA GPU, if any), "cuda:N", "mps" (Apple; shares the RAM, so used only
        when asked for), or "cpu" (the CPU standing in for a GPU, which needs `gpu`: for tests and comparisons).
    skip_below: approximate decoding under a RAM budget: a decoded token's expert that is neither in RAM nor being
        read, and whose routing weight is below this, is left out (the others' weights scaled back to the
        routing's sum) instead of read from disk. 0 (default): exact. Behind a GPU tier, an expert the GPU holds is
        not missing.
    substitute_below: approximate decoding under a RAM budget: a decoded token's expert that is neither in RAM nor
        being read, and whose routing weight is below this (and not below skip_below, which leaves it out), is
        replaced by the most probable expert of its layer that is in RAM (or on the GPU) and that the token did not
        choose, weighted by its own probability; with none there it is read. 0 (default): exact. Applies where
        skip_below does.
    low_below: approximate decoding with a store's low-bit copies of its experts (`edgerun convert STORE
        --low-bits q2`): a decoded token's expert that is not in RAM and weighs less than this is read from its
        2- or 3-bit copy (about half or three quarters of the bytes); a copy used again is upgraded to the
        exact expert when the disk is idle. 0 (default): exact. Not behind a GPU tier, which would keep the copy's
        values on the GPU for every later token.
    low_when_late: with low-bit copies, also read a decoded token's expert from its copy, whatever its weight, when
        the read-ahead did not bring it in time (the token waits for that read: the disk is behind). Experts read
        ahead stay exact unless they weigh less than low_below; a copy that a token weighs at low_below or more is
        upgraded to the exact expert when the disk is idle. False (default): exact. Not behind a GPU tier either.
    skip_below, substitute_below and low_below each take one weight for every MoE layer or a list of one per MoE
        layer (`edgerun calibrate` measures which layers a model can spare).
    misses: where an expert missing from the GPU runs: "auto" (copied over or computed on the CPU, whichever the
        machine's profile says costs less for the tokens routed to it), "copy" (whenever the GPU cache gives it a
        slot), or "cpu" (copied later in the background, where the cache finds it worth a slot).
    """
    t0 = time.perf_counter()
    _check_load_arguments(quant, dense, dtype, threads, policy, context_length, misses)
    if threads:
        torch.set_num_threads(int(threads))
    budget = None if ram is None else parse_size(ram)
    reserve = parse_size(reserve, zero=True)
    gpu_budget = None if gpu is None else parse_size(gpu, zero=True)
    tier = _gpu_device(device, gpu_budget)
    skip_below, low_below, substitute_below = (_thresholds(name, value) for name, value in (
        ("skip_below", skip_below), ("low_below", low_below), ("substitute_below", substitute_below)))
    if not isinstance(low_when_late, bool):
        raise ArgumentError(f"low_when_late must be True or False, got {low_when_late!r}")
    offload = {"budget": budget, "policy": policy, "prefetch": prefetch, "context_length": context_length,
               "gpu": (tier, gpu_budget), "misses": misses, "skip_below": skip_below, "low_below": low_below,
               "low_when_late": low_when_late, "substitute_below": substitute_below, "reserve": reserve}
    if is_store(path):
        if quant not in (None, "none") or dense is not None:
            raise ArgumentError(f"{path} is already a converted store; quant and dense apply to checkpoints")
        return _load_store(Path(path), dtype, threads=threads, t0=t0, **offload)
    if quant in (None, "none"):
        if dense is not None:
            raise ArgumentError("dense applies only together with quant (bf16, q8 or q4)")
        source = locate(path)  # a path that is no model says so first
        if any(low_below) or low_when_late:
            raise ArgumentError("low_below and low_when_late read a store's low-bit copies: convert the model with "
                                "`edgerun convert --low-bits q2` and load the store")
        if ram is not None or gpu_budget:
            raise ArgumentError("memory budgets (RAM, GPU) apply to converted models: add quant='q4' or 'q8' (--quant "
                                "on the command line), or convert the model with `edgerun convert` and load the store")
        inactive = _inactive_options(True, False, skip_below=any(skip_below),  # a checkpoint runs whole from RAM
                                     substitute_below=any(substitute_below))
        return _load_hf(source, dtype, progress, context_length, t0, inactive)
    from .store.convert import cached_store_path, convert

    src = locate(path)
    store = cached_store_path(src, quant, dense, 32)
    if not is_store(store):
        convert(src, store, quant=quant, dense=dense, progress=progress)
    return _load_store(store, dtype, threads=threads, t0=t0, **offload)


def _gpu_device(device: str, budget: int | None) -> torch.device | None:
    """The device of the GPU tier, or None for none."""
    if budget == 0:
        return None
    if device == "auto":
        from .hw.profile import gpu_device

        found = gpu_device()
        if found is None and budget is not None:
            raise ArgumentError("a GPU budget was given but torch sees no CUDA GPU; on a Mac choose Apple's GPU "
                                "(device='mps', --device mps), or leave the GPU budget out")
        return None if found is None else torch.device(found)
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ArgumentError(f"device must be auto, cuda, cuda:N, mps or cpu; got {device!r}") from None
    if dev.type == "cpu" and budget is None:
        raise ArgumentError("the CPU stands in for a GPU (device='cpu', --device cpu) only with a GPU budget "
                            "(gpu='1GB', --gpu 1GB)")
    missing = dev.type == "cuda" and not torch.cuda.is_available() or dev.type == "mps" and \
        not torch.backends.mps.is_available()
    if missing:
        raise ArgumentError(f"torch sees no {dev.type.upper()} device here; leave the device at auto")
    if dev.type not in ("cuda", "mps", "cpu"):
        raise ArgumentError(f"device must be auto, cuda, cuda:N, mps or cpu; got {device!r}")
    return dev


Thresholds = tuple[float, ...]  # a routing weight for every MoE layer (one value), or one per MoE layer


def _thresholds(name: str, value) -> Thresholds:
    """A threshold of approximate decoding as load() takes it (a number, or a sequence of one per MoE layer)."""
    values = [value] if isinstance(value, (int, float, str, bytes)) else value
    try:
        values = list(values)
    except TypeError:
        values = [value]
    if not values or any(not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1 for v in values):
        raise ArgumentError(f"{name} must be a routing weight from 0 up to 1 (0: exact), or a list of one per MoE "
                            f"layer, got {value!r}")
    return tuple(float(v) for v in values)


def _check_load_arguments(quant, dense, dtype, threads, policy, context_length, misses) -> None:
    """Bad arguments fail at once, before any file is read."""
    from .store.convert import check_choices

    check_choices(quant, dense)
    if dtype != "auto" and dtype not in _DTYPES:
        raise ArgumentError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ArgumentError(f"threads must be a positive integer, got {threads!r}")
    if policy not in POLICIES:
        raise ArgumentError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    if context_length is not None and (not isinstance(context_length, int) or context_length < 2):
        raise ArgumentError(f"context_length must be an integer of at least 2, got {context_length!r}")
    if misses not in MISSES:
        raise ArgumentError(f"misses must be one of {', '.join(MISSES)}; got {misses!r}")


def _model(spec: ModelSpec, decoder: Decoder, experts: ExpertsContainer, context: int, prefill_chunk: int | None,
           generation_config: dict, info: dict, t0: float, device: torch.device | None = None) -> Model:
    if decoder.dtype == torch.float32 and (device is None or device.type == "cpu"):
        from . import native

        native.warmup_decode()  # the decode step's attention and norms run on the kernels
    engine = Engine(decoder, experts, context, prefill_chunk, device)
    info["load_seconds"] = time.perf_counter() - t0
    return Model(spec, engine, generation_config, info)


def _load_hf(source: Checkpoint, dtype: str, progress: bool | None, context_length: int | None,
             t0: float, inactive: dict[str, str] | None = None) -> Model:
    family, spec = source.family, source.spec
    ctx = placement.context_length(spec, context_length)
    reader = source.reader()
    compute_dtype = _DTYPES[dtype] if dtype != "auto" else _auto_dtype(reader)
    total = sum(reader.nbytes(n) for n in reader.names())
    with ByteProgress(total, f"loading {source.dir.name}", enabled=progress) as bar:
        weights, gate_up, down, biases = load_weights(reader, spec, family.RULES, compute_dtype,
                                                      progress=bar.update)
    reader.close()
    decoder = Decoder(spec)
    decoder.bind(weights)
    experts = TorchExperts(gate_up, down, spec.activation, biases)
    held = gate_up + down + [t for pair in biases if pair is not None for t in pair]
    weights_bytes = sum(t.nbytes for t in weights.values()) + sum(t.nbytes for t in held if t is not None)
    info = {"path": source.dir, "tokenizer_dir": source.tokenizer_dir, "tokenizer_defaults": source.tokenizer_defaults,
            "quant": "none", "weights_bytes": weights_bytes}
    if inactive:  # options of approximate decoding, taken and changing nothing
        info["runtime_settings"] = {"offload": False, "approximate_inactive": inactive}
    return _model(spec, decoder, experts, ctx, None, source.generation_config, info, t0)


def _load_store(path: Path, dtype: str, *, budget: int | None, policy: str, prefetch: bool,
                context_length: int | None, threads: int | None, t0: float, gpu: tuple, misses: str,
                skip_below: Thresholds, low_below: Thresholds, low_when_late: bool,
                substitute_below: Thresholds, reserve: int) -> Model:
    from . import native
    from .hw.settings import best_threads, local_profile
    from .runtime.offload import OffloadedExperts, per_layer
    from .runtime.quantized import QuantizedExperts, QuantizedMatrix, StoreTensorExperts, as_tensor
    from .store.layout import PASSTHROUGH, QUANTIZED
    from .store.store import ExpertStore

    store = ExpertStore(path)
    for name, values in (("skip_below", skip_below), ("low_below", low_below), ("substitute_below", substitute_below)):
        try:
            per_layer(values, len(store.moe_layers), name)  # the rule the offloading container applies
        except ValueError as e:
            raise ArgumentError(f"{path}: {e} (give one value, or one per layer)") from None
    if (any(low_below) or low_when_late) and store.low_layout is None:
        what = "low_below" if any(low_below) else "low_when_late"
        raise ArgumentError(f"{path} has no low-bit copies of its experts for {what}; make them with "
                            f"`edgerun convert {path} --low-bits q2` (or q3)")
    _, spec = spec_from_config(store.config, f"{path} (stored config)")
    quantized = store.quant["experts"] in QUANTIZED or store.quant["dense"] in QUANTIZED
    if quantized and dtype not in ("auto", "float32"):
        raise ArgumentError(f"{path} holds quantized weights, which compute in float32; use dtype='auto'")
    compute_dtype = _DTYPES[dtype if dtype != "auto" else store.meta["compute_dtype"]]
    layout = ModelLayout.for_formats(spec, store.quant["experts"], store.quant["dense"], store.quant["group"],
                                     compute_dtype)
    _accept_q4_output(store, layout)
    _check_store_layout(store, layout)
    ctx = placement.context_length(spec, context_length)
    device, gpu_budget = gpu
    if device is not None and (layout.expert_format not in QUANTIZED or not layout.chunk_bytes):
        if gpu_budget is not None:
            raise ArgumentError(f"{path} keeps its experts in {layout.expert_format}; the GPU tier computes q8/q4 "
                                f"experts: convert with --quant q4 or q8, or leave the GPU budget out")
        device = None
    request = _gpu_request(device, gpu_budget) if device is not None else None

    def kernel_threads() -> None:
        """The profile's best thread count for these kernels, unless the caller gave one."""
        if not threads and profile is not None:
            torch.set_num_threads(best_threads(profile, layout.expert_format))
        native.set_threads(torch.get_num_threads())

    profile, profile_source = local_profile(measure=False)
    if quantized:
        kernel_threads()
        native.warmup()  # compile (or load the compiled kernels) now, not inside the first token
    baseline = current_rss() + reserve  # the process before the model's weights (interpreter, torch, kernels), and
    # what it will take besides the model
    available = available_ram() + current_rss()  # the process's own pages count as available
    plan = placement.place(layout, budget=budget, context=ctx, baseline=baseline, available=available, gpu=request)
    on_device = plan.gpu is not None and plan.gpu.dense
    store.huge_pages = plan.all_resident and not on_device
    weights = {}
    for name, tensor in layout.tensors.items():
        views = store.tensor_views(name)
        if on_device:
            from .runtime.device import to_device

            weights[name] = to_device(tensor, views, device, request.compute_dtype, compute_dtype)
        elif tensor.fmt in QUANTIZED:
            weights[name] = QuantizedMatrix(views[0], views[1], tensor.shape[1])
        else:
            weights[name] = as_tensor(views[0], PASSTHROUGH[tensor.fmt][1]).to(compute_dtype)
    if plan.all_resident:
        experts = (QuantizedExperts if layout.expert_format in QUANTIZED else StoreTensorExperts)(
            store, spec.activation)
        settings = {"offload": False}
    elif layout.expert_format not in QUANTIZED:
        raise BudgetError(f"{path} keeps its experts in {layout.expert_format}, which run only fully resident "
                          f"({plan.describe()}); convert with --quant q4 or q8 to run with this budget")
    else:
        if profile is None:
            profile, profile_source = local_profile(measure=True)
            kernel_threads()  # measured just now: its figures apply from this first run on
        settings = placement.runtime_settings(profile, layout)
        behind = plan.gpu is not None  # a GPU tier copies what the RAM tier holds: no low-bit copy may be there
        if (any(low_below) or low_when_late) and not behind:  # each reader's buffer for the copies it reads
            plan = placement.place(layout, budget=budget, context=ctx, baseline=baseline, available=available,
                                   gpu=request, staging=settings["readers"] * store.low_layout.nbytes)
        experts = OffloadedExperts(store, spec.activation, plan.slots, policy=policy, prefetch=prefetch,
                                   workers=settings["readers"], depth=settings["prefetch_depth"],
                                   skip_below=skip_below, low_below=0.0 if behind else low_below,
                                   low_when_late=low_when_late and not behind, substitute_below=substitute_below)
        settings["direct_io"] = experts.reader.direct
    if plan.gpu is not None:
        from .hw.settings import miss_costs
        from .runtime.tier import DeviceTier

        costs = miss_costs(profile, layout, device) if misses == "auto" else None
        experts = DeviceTier(experts, layout.expert_layout, spec.activation, device, plan.gpu.slots, costs,
                             policy=policy, compute=request.compute_dtype, batch=plan.gpu.batch, prefetch=prefetch,
                             misses=misses)
        settings.update(device=str(device), misses=misses)
    settings.update(threads=torch.get_num_threads(), profile=profile_source)
    inactive = _inactive_options(plan.all_resident, plan.gpu is not None, skip_below=any(skip_below),
                                 substitute_below=any(substitute_below), low_below=any(low_below),
                                 low_when_late=low_when_late)
    if inactive:  # taken, and changing nothing
        settings["approximate_inactive"] = inactive
    decoder = layout.decoder
    decoder.bind(weights)
    if plan.all_resident and not on_device:
        decoder.stack_projections()  # one GEMV a token for q, k and v
    weights.clear()  # the decoder holds what it uses: mappings it replaced go now
    weights_bytes = layout.total_experts * layout.chunk_bytes + sum(t.nbytes for t in layout.tensors.values())
    info = {"path": path, "tokenizer_dir": store.tokenizer_dir, "quant": store.quant["name"],
            "expert_format": layout.expert_format, "dense_format": layout.dense_format,
            "weights_bytes": weights_bytes, "memory_plan": plan.as_dict(), "ram_budget_bytes": plan.budget_bytes,
            "tier_bytes": _tier_bytes(plan, layout), "runtime_settings": settings}
    model = _model(spec, decoder, experts, ctx, plan.prefill_chunk, store.generation_config, info, t0,
                   device if on_device else None)
    if plan.all_resident and prefetch:  # the store stays mapped: into the page cache before tokens fault it in
        from .runtime.warmup import PageCacheWarmer, store_files

        model._warmer = PageCacheWarmer(store_files(store, dense=not on_device))
    return model


def _inactive_options(all_in_ram: bool, behind_gpu: bool, **asked: bool) -> dict[str, str]:
    """The options of approximate decoding that were given but change nothing with every expert in RAM, or (the
    low-bit copies) with the experts behind a GPU tier, and why."""
    if all_in_ram:
        why = {name: "every expert is in RAM" for name in asked}
    elif behind_gpu:
        why = dict.fromkeys(("low_below", "low_when_late"), "low-bit copies are not read behind a GPU tier")
    else:
        why = {}
    return {name: why[name] for name, given in asked.items() if given and name in why}


def _gpu_request(device: torch.device, budget: int | None) -> placement.GpuRequest:
    from .hw.profile import device_memory
    from .runtime.device import default_dtype

    if budget is None:
        free, total = device_memory(device)
        budget = placement.auto_gpu_budget(free, total)
    return placement.GpuRequest(str(device), budget, default_dtype(device))


def _tier_bytes(plan, layout: ModelLayout) -> dict:
    """Bytes the plan puts on each tier: the GPU's (dense weights, KV cache, expert slots), the RAM's, the store's."""
    chunk, gpu = layout.chunk_bytes, plan.gpu
    out = {"ram": plan.resident_bytes + plan.kv_cache_bytes + min(plan.slots, plan.total_experts) * chunk,
           "disk": plan.total_experts * chunk}
    if gpu is not None:
        out["gpu"] = gpu.dense_bytes + gpu.kv_cache_bytes + gpu.slots * chunk
    return out


def _accept_q4_output(store, layout: ModelLayout) -> None:
    """Stores converted with q4 dense weights before the output head was kept at q8 hold it at q4: they load as
    they are."""
    from .store.layout import TensorLayout

    for name, tensor in layout.decoder.tensors().items():
        old = TensorLayout(layout.dense_format, tensor.shape, layout.group)
        if tensor.output and name in layout.tensors and name in store.tensor_names() and \
                store.tensor_layout(name) == old:
            layout.tensors[name] = old


def _check_store_layout(store, layout: ModelLayout) -> None:
    """The store holds exactly the tensors, shapes and formats its model and formats call for."""
    def describe(t) -> str:
        return "nothing" if t is None else f"{t.fmt} {list(t.shape)}"

    stored = {name: store.tensor_layout(name) for name in store.tensor_names()}
    for name in sorted(stored.keys() | layout.tensors.keys()):
        want, got = layout.tensors.get(name), stored.get(name)
        if want != got:
            raise CheckpointError(f"store {store.path} holds {describe(got)} for tensor {name} where its model calls "
                                  f"for {describe(want)}; convert the model again")
    if (store.moe_layers, store.num_experts, store.expert_layout) != (layout.spec.moe_layers, layout.stored_experts,
                                                                      layout.expert_layout):
        raise CheckpointError(f"store {store.path} holds experts of another shape than its config describes; "
                              f"convert the model again")


def _auto_dtype(reader) -> torch.dtype:
    # bf16 runs as it is; fp16 (slow and overflow-prone on CPUs) and mixed checkpoints run in fp32
    return torch.bfloat16 if reader.common_dtype() == torch.bfloat16 else torch.float32
