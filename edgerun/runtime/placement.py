"""Placement: where a model's bytes go in a RAM budget. `load` and `edgerun plan` both call this module, so what
the plan predicts is what loading does.

    budget = baseline (Python, torch, numba) + resident weights (mapped from the store, and converted copies)
             + KV cache (the attention parts' caches for the context) + scratch (activations of one prefill
             step, buffers for experts the cache declines to hold) + safety + slots x chunk size (expert cache)

    GPU budget (with a device) = reserve (allocator slack) + dense weights and KV cache (when both fit, else they
             stay in RAM) + scratch (activations, dequantized experts of one batch, a dense block) + slots x chunk

The budget is a ceiling on peak RSS: every term is counted at its largest. With the dense weights and the KV cache
on the device, RAM holds neither. A model's bytes come from the
tensors its decoder's parts declare and the formats of a store (`ModelLayout`), for a store on disk or for one
a conversion would write.
"""

from __future__ import annotations

import math
import resource
from dataclasses import asdict, dataclass

import psutil
import torch

from ..errors import ArgumentError, BudgetError
from ..models.decoder import Decoder
from ..models.parts import F32, TensorSpec
from ..models.spec import ModelSpec
from ..store.layout import PASSTHROUGH, QUANTIZED, ExpertLayout, TensorLayout
from ..units import format_size

DEFAULT_CONTEXT = 4096  # tokens of KV cache when none is asked for (at most the model's own context)
PREFILL_CHUNK = 512  # tokens per prefill step: bounds the attention scratch of long prompts
MIN_PREFILL_CHUNK = 32
SCRATCH_SHARE = 0.05  # of the budget, for the activations of one prefill step
MIN_SLOTS_PER_K = 2  # slots per routed expert of a token: one layer computing while the next one loads
SAFETY_FRACTION = 0.02  # allocator slack and page-table overhead, as a share of the budget
SAFETY_MIN = 32 << 20
AUTO_MARGIN = 0.15  # with no budget given, leave this share of the available RAM to the rest of the machine
AUTO_MARGIN_MIN = 1 << 30
MAX_PREFETCH_DEPTH = 4  # layers read ahead at most: further out the router of the current state guesses poorly
GPU_MARGIN = 0.10  # with no GPU budget given, leave this share of the device's free memory to the rest
GPU_MARGIN_MIN = 256 << 20
STAGING_CHUNKS = 2  # pinned buffers that copies to the GPU go through: one fills from RAM, one crosses PCIe
GPU_RESERVE = 256 << 20  # the caching allocator's slack inside a GPU budget (at most 1/16 of it)


# -- the model's bytes -------------------------------------------------------------------------------------------
def stored_format(tensor: TensorSpec, dense_format: str) -> str:
    """The format a store keeps a non-expert tensor in: the dense format, except that exact tensors (norms,
    biases, routers) stay unquantized (float32 beside quantized matrices) and that the output head (a tied
    embedding too) stays at q8 beside q4 matrices: every logit comes from it (llama.cpp's Q4_0 likewise keeps
    its output at 6 bits)."""
    if tensor.exact:
        return dense_format if dense_format in PASSTHROUGH else "f32"
    if tensor.output and dense_format == "q4":
        return "q8"
    return dense_format


def compute_dtype(expert_format: str, dense_format: str) -> torch.dtype:
    """What a store of these formats computes in: quantized weights in float32, an all-bf16 store in bf16."""
    if expert_format in QUANTIZED or dense_format in QUANTIZED:
        return torch.float32
    return torch.bfloat16 if {expert_format, dense_format} == {"bf16"} else torch.float32


def context_length(spec: ModelSpec, requested: int | None) -> int:
    """The KV cache's length: the one asked for, else the model's own, at most DEFAULT_CONTEXT."""
    ctx = int(requested or min(spec.max_position_embeddings, DEFAULT_CONTEXT))
    if ctx < 2:
        raise ArgumentError(f"context_length must be at least 2, got {ctx}")
    return ctx


@dataclass(frozen=True)
class ModelLayout:
    """A model in a store's formats: its decoder's parts, every resident tensor's layout, the expert chunk."""

    spec: ModelSpec
    decoder: Decoder
    expert_format: str
    dense_format: str
    group: int
    tensors: dict[str, TensorLayout]  # non-expert tensors as stored
    compute_dtype: torch.dtype

    @classmethod
    def for_formats(cls, spec: ModelSpec, expert_format: str, dense_format: str, group: int = 32,
                    dtype: torch.dtype | None = None) -> ModelLayout:
        """The layout a conversion to these formats writes (and `edgerun convert` does write)."""
        decoder = Decoder(spec)
        tensors = {name: TensorLayout(stored_format(t, dense_format), t.shape, group)
                   for name, t in decoder.tensors().items() if not t.expert}
        return cls(spec, decoder, expert_format, dense_format, group, tensors,
                   dtype or compute_dtype(expert_format, dense_format))

    @property
    def expert_layout(self) -> ExpertLayout:
        return ExpertLayout(self.expert_format, self.spec.hidden_size, self.spec.moe_intermediate_size, self.group,
                            self.decoder.expert_biases)

    @property
    def chunk_bytes(self) -> int:
        """One expert's chunk in the store (0 for a model without experts)."""
        return self.expert_layout.nbytes if self.spec.moe_layers else 0

    @property
    def stored_experts(self) -> int:
        """Expert chunks per MoE layer (the routed experts, and slices of a dense MLP every token uses)."""
        return self.decoder.stored_experts

    @property
    def experts_per_token(self) -> int:
        return self.decoder.experts_per_token

    @property
    def total_experts(self) -> int:
        return len(self.spec.moe_layers) * self.stored_experts

    @property
    def resident_bytes(self) -> int:
        """The non-expert weights in RAM: mapped from the store, plus a copy in the compute dtype of any
        unquantized tensor stored in another dtype."""
        elem = torch.empty((), dtype=self.compute_dtype).element_size()
        total = 0
        for layout in self.tensors.values():
            total += layout.nbytes
            if layout.fmt in PASSTHROUGH and PASSTHROUGH[layout.fmt][1] != self.compute_dtype:
                total += math.prod(layout.shape) * elem
        return total

    @property
    def device_resident_bytes(self) -> int:
        """The non-expert weights in device memory: q8/q4 as stored, the others in the compute dtype."""
        elem = torch.empty((), dtype=self.compute_dtype).element_size()
        return sum(t.nbytes if t.fmt in QUANTIZED else math.prod(t.shape) * elem for t in self.tensors.values())

    def kv_bytes(self, context: int) -> int:
        return self.decoder.cache_bytes(context, self.compute_dtype)

    def scratch_bytes(self, tokens: int, context: int) -> int:
        """One forward step's activations on `tokens` tokens, plus buffers for the experts of a token that the
        expert cache declines to hold."""
        return self.decoder.scratch_bytes(tokens, context) + self.experts_per_token * self.chunk_bytes


# -- the split of a budget ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuRequest:
    """A device for the GPU tier and what of its memory to use (None: its free memory less a margin)."""

    device: str
    budget: int
    compute_dtype: torch.dtype  # what weights are dequantized to there


@dataclass
class GpuPlan:
    device: str
    budget_bytes: int
    dense: bool  # the dense weights and the KV cache are on the device (else in RAM)
    dense_bytes: int
    kv_cache_bytes: int
    scratch_bytes: int
    reserve_bytes: int
    slot_bytes: int
    slots: int  # expert slots on the device
    batch: int  # experts dequantized at once

    def as_dict(self) -> dict:
        return asdict(self) | {"expert_cache_bytes": self.slots * self.slot_bytes}

    def describe(self) -> str:
        where = (f"weights {format_size(self.dense_bytes)}, KV cache {format_size(self.kv_cache_bytes)}, "
                 if self.dense else "weights and KV cache in RAM, ")
        return (f"{self.device} {format_size(self.budget_bytes)}: {where}scratch "
                f"{format_size(self.scratch_bytes + self.reserve_bytes)}, expert cache {self.slots} experts "
                f"({format_size(self.slots * self.slot_bytes)})")


def auto_gpu_budget(free: int, total: int) -> int:
    """The GPU budget taken when none is given: the device's free memory less a margin."""
    return max(free - max(GPU_MARGIN_MIN, int(total * GPU_MARGIN)), 0)


def plan_gpu(layout: ModelLayout, request: GpuRequest, context: int, prefill_chunk: int) -> GpuPlan:
    """The dense weights and the KV cache go on the device if they fit with the scratch and at least one batch of
    expert slots; the rest of the budget holds expert slots."""
    from .device import DENSE_BLOCK_BYTES, ExpertKernel

    budget, dtype = request.budget, request.compute_dtype
    chunk = layout.chunk_bytes
    batch = max(1, layout.experts_per_token)
    spec = layout.spec
    elem = torch.empty((), dtype=dtype).element_size()
    experts = (ExpertKernel.scratch_bytes(layout.expert_layout, batch, dtype)
               + batch * prefill_chunk * (spec.hidden_size + 3 * spec.moe_intermediate_size) * elem) if chunk else 0
    largest = max((math.prod(t.shape) for t in layout.tensors.values() if t.fmt in QUANTIZED), default=0)
    activations = layout.decoder.scratch_bytes(prefill_chunk, context) + min(DENSE_BLOCK_BYTES, largest * elem)
    dense, kv = layout.device_resident_bytes, layout.kv_bytes(context)
    reserve = min(GPU_RESERVE, budget // 16)
    on_device = reserve + dense + kv + activations + experts + batch * chunk <= budget
    scratch = experts + (activations if on_device else spec.hidden_size * prefill_chunk * F32 * 4)
    room = budget - reserve - scratch - (dense + kv if on_device else 0)
    slots = min(layout.total_experts, max(0, room) // chunk) if chunk else 0
    return GpuPlan(request.device, budget, on_device, dense if on_device else 0, kv if on_device else 0, scratch,
                   reserve, chunk, int(slots), batch)


@dataclass
class MemoryPlan:
    budget_bytes: int
    baseline_bytes: int  # the process before the model: interpreter, torch, compiled kernels
    resident_bytes: int  # non-expert weights
    kv_cache_bytes: int
    scratch_bytes: int
    safety_bytes: int
    slot_bytes: int  # one expert chunk
    slots: int  # expert cache capacity
    total_experts: int
    minimum_bytes: int  # the smallest budget this model, context and machine accept
    budget_given: bool
    prefill_chunk: int  # tokens per prefill step, shorter under a tight budget
    context_length: int
    gpu: GpuPlan | None = None  # the device tier, if any

    @property
    def fixed_bytes(self) -> int:
        return self.baseline_bytes + self.resident_bytes + self.kv_cache_bytes + self.scratch_bytes + self.safety_bytes

    @property
    def all_resident(self) -> bool:
        return self.slots >= self.total_experts

    def as_dict(self) -> dict:
        d = asdict(self)
        d["expert_cache_bytes"] = self.slots * self.slot_bytes
        d["fixed_bytes"] = self.fixed_bytes
        d["gpu"] = self.gpu.as_dict() if self.gpu else None
        return d

    def describe(self) -> str:
        gpu = f"; GPU {self.gpu.describe()}" if self.gpu else ""
        return self._describe_ram() + gpu

    def _describe_ram(self) -> str:
        return (f"budget {format_size(self.budget_bytes)}: baseline {format_size(self.baseline_bytes)}, weights "
                f"{format_size(self.resident_bytes)}, KV cache {format_size(self.kv_cache_bytes)}, scratch "
                f"{format_size(self.scratch_bytes + self.safety_bytes)}, expert cache {self.slots} of "
                f"{self.total_experts} experts ({format_size(self.slots * self.slot_bytes)})")


def auto_budget(available: int) -> int:
    """The budget taken when none is given: the available RAM less a margin for the rest of the machine."""
    return max(available - max(AUTO_MARGIN_MIN, int(available * AUTO_MARGIN)), 0)


def choose_prefill_chunk(budget: int | None, scratch_of, largest: int | None = None) -> int:
    """The longest prefill step, up to `largest` (default PREFILL_CHUNK), whose scratch takes at most
    SCRATCH_SHARE of the budget (at least MIN_PREFILL_CHUNK tokens)."""
    chunk = largest or PREFILL_CHUNK
    while budget is not None and chunk > MIN_PREFILL_CHUNK and scratch_of(chunk) > SCRATCH_SHARE * budget:
        chunk //= 2
    return chunk


def split_budget(*, budget: int, given: bool, baseline: int, resident: int, kv_cache: int, scratch: int,
                 slot_bytes: int, total_experts: int, top_k: int, context_length: int,
                 prefill_chunk: int) -> MemoryPlan:
    """Fixed parts first, the rest as expert slots (top_k: the experts one token uses per layer). Refuses a budget
    below the minimum with one line giving it."""
    safety = max(SAFETY_MIN, int(budget * SAFETY_FRACTION))
    fixed = baseline + resident + kv_cache + scratch + safety
    min_slots = min(total_experts, MIN_SLOTS_PER_K * top_k)
    core = fixed - safety + min_slots * slot_bytes
    minimum = core + max(SAFETY_MIN, int(core * SAFETY_FRACTION / (1 - SAFETY_FRACTION)))
    if budget < minimum:
        where = "the budget" if given else "this machine's available RAM (less a safety margin)"
        raise BudgetError(
            f"{where} of {format_size(budget)} is below the minimum of {format_size(minimum)} for this model "
            f"with a {context_length}-token context (the process itself {format_size(baseline)}, weights "
            f"{format_size(resident)}, KV cache {format_size(kv_cache)}, scratch {format_size(scratch)}, "
            f"{min_slots} expert slots of {format_size(slot_bytes)}, and a margin); give more RAM or a shorter context"
        )
    slots = min(total_experts, max(min_slots, (budget - fixed) // slot_bytes)) if slot_bytes else 0
    return MemoryPlan(budget, baseline, resident, kv_cache, scratch, safety, slot_bytes, int(slots), total_experts,
                      minimum, given, prefill_chunk, context_length)


def place(layout: ModelLayout, *, budget: int | None, context: int, baseline: int,
          available: int | None = None, gpu: GpuRequest | None = None, staging: int = 0) -> MemoryPlan:
    """Split a RAM budget (and a GPU's, with `gpu`) for a model of `layout` with a `context`-token cache. budget
    None: `available` (default: this machine's available RAM) less a margin. staging: buffers the expert readers
    hold besides the slots (a low-bit copy is read into one before it is expanded into its slot), counted as
    scratch. Raises BudgetError below the minimum. `load` and `edgerun plan` both place a model with this."""
    given = budget is not None
    if budget is None:
        budget = auto_budget(available if available is not None else available_ram())
    # a step never holds more tokens than the context
    chunk = choose_prefill_chunk(budget, lambda tokens: layout.scratch_bytes(tokens, context),
                                 min(PREFILL_CHUNK, max(MIN_PREFILL_CHUNK, context)))
    device = plan_gpu(layout, gpu, context, chunk) if gpu is not None else None
    in_ram = device is None or not device.dense
    staging += STAGING_CHUNKS * layout.chunk_bytes if device is not None else 0
    plan = split_budget(budget=budget, given=given, baseline=baseline,
                        resident=layout.resident_bytes if in_ram else 0,
                        kv_cache=layout.kv_bytes(context) if in_ram else 0,
                        scratch=layout.scratch_bytes(chunk, context) + staging, slot_bytes=layout.chunk_bytes,
                        total_experts=layout.total_experts, top_k=layout.experts_per_token, context_length=context,
                        prefill_chunk=chunk)
    plan.gpu = device
    return plan


# -- what the offloading container takes from the machine's profile ----------------------------------------------
def runtime_settings(profile: dict | None, layout: ModelLayout) -> dict:
    """Reader threads and the first prefetch depth for this model's experts on a profiled machine."""
    if profile is None or not layout.chunk_bytes:
        return {"readers": 1, "prefetch_depth": 1}
    return read_ahead(profile, chunk_bytes=layout.chunk_bytes, top_k=layout.experts_per_token,
                      layer_dense_bytes=layout.resident_bytes // layout.spec.num_layers,
                      expert_format=layout.expert_format)


def read_ahead(profile: dict | None, *, chunk_bytes: int, top_k: int, layer_dense_bytes: int,
               expert_format: str) -> dict:
    """Reader threads and the first prefetch depth for experts of chunk_bytes.

    The depth is how many layers of compute it takes to read one layer's experts: reads must start that far
    ahead to arrive in time (the offloading container adapts it while it runs). Whether O_DIRECT works is probed
    on the store itself, which may sit on another disk than the profile's."""
    from ..hw.settings import kernel_key, reader_choice, top_threads

    if profile is None:
        return {"readers": 1, "prefetch_depth": 1}
    readers, gbps = reader_choice(profile, chunk_bytes)
    read_s = top_k * chunk_bytes / (gbps * 1e9)
    kernels = profile["cpu"]["kernels"]
    expert_gbps = (top_threads(kernels[kernel_key(expert_format)]["gemv_gbps"]) if kernel_key(expert_format) in kernels
                   else 1.0)
    dense_gbps = top_threads(kernels["q8"]["gemv_gbps"])
    compute_s = top_k * chunk_bytes / (expert_gbps * 1e9) + layer_dense_bytes / (dense_gbps * 1e9)
    depth = max(1, min(MAX_PREFETCH_DEPTH, math.ceil(read_s / compute_s)))
    return {"readers": readers, "prefetch_depth": depth}


# -- this process ------------------------------------------------------------------------------------------------
def current_rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """The process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if psutil.MACOS else peak * 1024


def available_ram() -> int:
    return psutil.virtual_memory().available
