"""The generation loop over a decoder, its experts container and its KV cache: prefill in chunks, then one
token at a time. Each forward call is announced to the experts container as a prefill or a decode step.

The cache keeps the tokens of the previous call, so a follow-up prompt that extends it (the next turn of a
chat) only prefills what is new.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import ContextLengthError
from ..models.decoder import Decoder
from . import placement
from .experts import ExpertsContainer, Phase
from .fused import TokenLayers
from .sampling import Sampler


@dataclass
class RunStats:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    time_to_first_token_s: float = 0.0
    finish_reason: str = ""

    def as_dict(self) -> dict:
        prefilled = self.prompt_tokens - self.cached_prompt_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_seconds": self.prefill_seconds,
            "prefill_tokens_per_s": prefilled / self.prefill_seconds if self.prefill_seconds else 0.0,
            "decode_seconds": self.decode_seconds,
            "decode_tokens_per_s": self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0,
            "time_to_first_token_s": self.time_to_first_token_s,
            "finish_reason": self.finish_reason,
        }


class Engine:
    def __init__(self, decoder: Decoder, experts: ExpertsContainer, context_length: int,
                 prefill_chunk: int | None = None, device: torch.device | None = None):
        self.decoder = decoder
        self.context_length = context_length
        self.prefill_chunk = prefill_chunk or placement.PREFILL_CHUNK
        self.device = device or torch.device("cpu")  # of the decoder's weights, its activations and the KV cache
        self.cache = decoder.new_cache(context_length, device=self.device)
        self.tokens: list[int] = []  # what the cache holds
        self.stats = RunStats()
        self.experts: ExpertsContainer | None = None
        self.use_experts(experts)

    def use_experts(self, experts: ExpertsContainer) -> ExpertsContainer | None:
        """Compute the routed experts with `experts` from now on; returns the container it replaces."""
        previous, self.experts = self.experts, experts
        self.decoder.use_experts(experts)
        experts.attach(self.decoder)
        self.decoder.token_layers = TokenLayers.build(self.decoder, experts) if self.device.type == "cpu" else None
        return previous

    def _check_fits(self, ids: list[int]) -> None:
        if not ids:
            raise ContextLengthError("the prompt is empty")
        if len(ids) >= self.context_length:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens but the context holds {self.context_length}; "
                f"shorten it or load the model with a larger context_length"
            )

    def logits(self, ids: list[int], decode: bool = False) -> torch.Tensor:
        """float32 [T, V] for every position of ids, from an empty cache: in prefill steps, or with `decode` the
        first token as a prompt and each other one as a decode step."""
        self._check_fits(ids)
        self.cache.length, self.tokens = 0, []
        if decode:
            self.experts.reset_stats()
            out = [self._forward(ids[:1], "prefill")] + [self._forward([t], "decode") for t in ids[1:]]
            return torch.cat(out)
        n = self.prefill_chunk
        out = [self._forward(ids[i:i + n], "prefill", all_logits=True) for i in range(0, len(ids), n)]
        return torch.cat(out)

    def _forward(self, ids: list[int], phase: Phase, all_logits: bool = False) -> torch.Tensor:
        self.experts.begin_step(phase, len(ids))
        logits = self.decoder.forward(torch.tensor(ids, dtype=torch.long, device=self.device), self.cache, all_logits)
        self.tokens.extend(ids)
        return logits.cpu()

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Bring the cache to hold ids, reusing the longest prefix it already has; logits [V] of the last one."""
        self._check_fits(ids)
        keep = 0
        for a, b in zip(self.tokens, ids[:-1]):
            if a != b:
                break
            keep += 1
        self.cache.length, self.tokens = keep, self.tokens[:keep]
        self.stats.cached_prompt_tokens = keep
        logits = None
        for i in range(keep, len(ids), self.prefill_chunk):
            logits = self._forward(ids[i:i + self.prefill_chunk], "prefill")
        return logits[-1]

    def generate(self, ids: list[int], sampler: Sampler, max_new_tokens: int, stop_ids: set[int]) -> Iterator[int]:
        """Yield new token ids until a stop id (not yielded), max_new_tokens, or a full context."""
        self.stats = stats = RunStats(prompt_tokens=len(ids))
        self.experts.reset_stats()
        t0 = time.perf_counter()
        logits = self.prefill(ids)
        history = list(ids)
        stats.prefill_seconds = time.perf_counter() - t0
        stats.finish_reason = "length"
        for n in range(max_new_tokens):
            token = sampler(logits, history)
            if n == 0:
                stats.time_to_first_token_s = time.perf_counter() - t0
            if token in stop_ids:
                stats.finish_reason = "stop"
                return
            history.append(token)
            stats.generated_tokens += 1
            yield token
            if n + 1 == max_new_tokens:
                return
            if self.cache.length >= self.context_length:
                stats.finish_reason = "context"
                return
            t = time.perf_counter()
            logits = self._forward([token], "decode")[-1]
            stats.decode_seconds += time.perf_counter() - t
            stats.decode_steps += 1
