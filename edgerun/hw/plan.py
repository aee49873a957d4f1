"""Predict how a model would run on a machine described by a hardware profile, without loading it.

Placement is the one `load` makes (runtime/placement.py), from the model's config and the formats a conversion
would use; speed comes from the profile's kernel, RAM and disk figures. Expert hits assume uniform routing (the
cached share of the experts), which the expert cache's policies beat on real routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import BudgetError
from ..models import spec_from_config
from ..runtime import placement
from ..runtime.placement import MemoryPlan, ModelLayout
from ..runtime.tier import MissCosts
from ..units import format_size
from .settings import kernel_key, reader_choice, top_threads

BASELINE_BYTES = 340 << 20  # Python, torch and the compiled kernels, measured before the weights are mapped
PREFILL_TOKENS = 512  # default prompt length of the prefill prediction
GPU_CONTEXT_BYTES = 500 << 20  # the CUDA context, which a profile's total memory includes
# No profile figure gives the GPU's own memory bandwidth; consumer GPUs read VRAM roughly 20x faster than
# a desktop CPU reads DDR, so the KV cache on the GPU is costed at 20x the profile's RAM read rate.
GPU_SPEEDUP = 20.0
OVERLAP_SLACK = 0.02  # reads and compute overlap, but not perfectly
# Share of read-ahead bytes that go unused: the next layers' routers applied early pick ~90% of the experts the
# tokens then use (measured prefetch precision 0.90-0.91 on the 2 GB benchmark model)
PREFETCH_WASTE = 0.10


@dataclass(frozen=True)
class ModelSizes:
    """A model in the formats of a store, and what one decoded token reads of its non-expert weights."""

    layout: ModelLayout
    token_dense_bytes: int  # resident matrix bytes one decoded token reads
    dense_params: int  # non-expert weights one token multiplies by

    @property
    def spec(self):
        return self.layout.spec

    @property
    def chunk_bytes(self) -> int:
        return self.layout.chunk_bytes

    @property
    def resident_bytes(self) -> int:
        return self.layout.resident_bytes

    @property
    def moe_layers(self) -> int:
        return len(self.spec.moe_layers)

    @property
    def total_experts(self) -> int:
        return self.layout.total_experts

    def kv_bytes(self, ctx: int) -> int:
        return self.layout.kv_bytes(ctx)


def model_sizes(config: dict, expert_format: str, dense_format: str, group: int = 32,
                source: str = "config.json") -> ModelSizes:
    _, spec = spec_from_config(config, source)
    layout = ModelLayout.for_formats(spec, expert_format, dense_format, group)
    token = params = 0
    for name, tensor in layout.tensors.items():
        if name == "embed" and not spec.tie_word_embeddings:
            token += tensor.nbytes // tensor.shape[0]  # a lookup reads one row
            continue
        token += tensor.nbytes  # a tied embedding is also the output head: read whole
        params += math.prod(tensor.shape)
    return ModelSizes(layout, token, params)


def memory_plan(sizes: ModelSizes, budget: int, ctx: int, gpu: placement.GpuRequest | None = None) -> MemoryPlan:
    """load's split of a RAM budget, and of a GPU's (raises BudgetError as load does)."""
    return placement.place(sizes.layout, budget=budget, context=ctx, baseline=BASELINE_BYTES, gpu=gpu)


def _fits(sizes: ModelSizes, budget: int, ctx: int) -> bool:
    try:
        memory_plan(sizes, budget, ctx)
    except BudgetError:
        return False
    return True


def impossible_reason(config: dict, sizes: ModelSizes, budget: int, ctx: int, group: int = 32) -> str:
    """Why a budget cannot hold the model, and what would make it fit."""
    minimum = memory_plan(sizes, 1 << 62, ctx).minimum_bytes
    # a tight budget prefills in shorter steps: bisect for the true minimum between budget and the loose one
    lo, hi = budget, max(minimum, budget + 1)
    while hi - lo > (1 << 20):
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _fits(sizes, mid, ctx) else (mid, hi)
    fixes = [f"{format_size(hi - budget)} more RAM (at least {format_size(hi)})"]
    expert_format, dense_format = sizes.layout.expert_format, sizes.layout.dense_format
    if expert_format == "q8" and _fits(model_sizes(config, "q4", dense_format, group), budget, ctx):
        fixes.append("q4 experts (--quant q4)")
    if dense_format != "q4" and _fits(model_sizes(config, expert_format, "q4", group), budget, ctx):
        fixes.append("q4 dense weights (--dense q4)")
    longest, n = None, 512
    while n < ctx and _fits(sizes, budget, n):  # powers of two from 512 below the asked context
        longest, n = n, n * 2
    if longest:
        fixes.append(f"a context of {longest} tokens (--ctx {longest})")
    return (f"a RAM budget of {format_size(budget)} cannot hold this model with a {ctx}-token context "
            f"(weights {format_size(sizes.resident_bytes)}, KV cache {format_size(sizes.kv_bytes(ctx))}, "
            f"experts of {format_size(sizes.chunk_bytes)}); it would fit with " + ", or ".join(fixes))


@dataclass
class Prediction:
    possible: bool
    reason: str | None = None
    ram_budget_bytes: int = 0
    placement: list[dict] = field(default_factory=list)  # {"part", "where", "bytes"}
    expert_slots: int = 0  # in RAM
    gpu_expert_slots: int = 0
    experts_total: int = 0
    hit_rate: float = 0.0
    bytes_per_token: dict = field(default_factory=dict)
    times: dict = field(default_factory=dict)  # seconds per decoded token
    decode_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    bottleneck: str | None = None
    notes: list[str] = field(default_factory=list)
    readers: int = 1  # expert reader threads, as load picks them
    prefetch_depth: int = 1  # layers read ahead at first, as load picks it
    memory_plan: dict = field(default_factory=dict)  # the split load makes (MemoryPlan.as_dict)

    def as_dict(self) -> dict:
        keys = ("possible", "reason") if not self.possible else tuple(self.__dataclass_fields__)
        return {k: getattr(self, k) for k in keys} | {"ram_budget_bytes": self.ram_budget_bytes}


def cached_share(slots: int, layers: int, experts: int, top_k: int, always: int) -> float:
    """The share of a token's expert bytes found in `slots` cache slots: the experts every token uses (a dense
    MLP held as experts) are cached first, as the policies learn that they always come back; the other slots
    hold routed experts, which uniform routing finds in proportion."""
    held_always = min(slots, layers * always)
    routed = min(1.0, (slots - held_always) / (layers * experts))
    return ((held_always / layers if always else 0) + top_k * routed) / (top_k + always)


def gpu_request(profile: dict, gpu: int | None) -> placement.GpuRequest | None:
    """The GPU tier load would make on the profiled machine: its GPU, `gpu` bytes of it or its memory less the
    CUDA context and a margin; None without a GPU or with a budget of 0."""
    import torch

    from ..runtime.device import default_dtype

    if profile.get("gpu") is None or gpu == 0:
        return None
    total = profile["gpu"]["memory_bytes"]
    budget = gpu if gpu is not None else placement.auto_gpu_budget(total - GPU_CONTEXT_BYTES, total)
    return placement.GpuRequest(profile["gpu"]["device"], budget, default_dtype(torch.device(profile["gpu"]["device"])))


def miss_costs(profile: dict, layout: ModelLayout) -> MissCosts | None:
    """Both ways of running an expert missing from the GPU, from the profile's figures (None without a GPU)."""
    gpu = profile.get("gpu")
    if gpu is None or not layout.chunk_bytes:
        return None
    fmt, s = kernel_key(layout.expert_format), layout.spec
    cpu = profile["cpu"]["kernels"][fmt]
    return MissCosts(layout.chunk_bytes, 2 * 3 * s.hidden_size * s.moe_intermediate_size, gpu["h2d_gbps_pinned"] * 1e9,
                     top_threads(cpu["gemv_gbps"]) * 1e9, top_threads(cpu["gemm_gflops"]) * 1e9,
                     gpu["kernels"][fmt]["gemv_gbps"] * 1e9, gpu["kernels"][fmt]["gemm_gflops"] * 1e9)


def predict(config: dict, profile: dict, *, expert_format: str = "q4", dense_format: str = "q8",
            ram: int | None = None, gpu: int | None = None, ctx: int | None = None, group: int = 32,
            prompt: int = PREFILL_TOKENS) -> Prediction:
    """Placement and speed of a model on a profiled machine (ram/gpu: budgets in bytes, None: the profile's;
    prompt: the prompt length prefill speed is predicted for)."""
    sizes = model_sizes(config, expert_format, dense_format, group)
    s = sizes.spec
    ctx = placement.context_length(s, ctx)
    budget = ram if ram is not None else placement.auto_budget(profile["ram"]["available_bytes"])
    request = gpu_request(profile, gpu)
    try:
        mem = memory_plan(sizes, budget, ctx, request)
    except BudgetError:
        return Prediction(False, impossible_reason(config, sizes, budget, ctx, group), budget)
    total, chunk, kv = sizes.total_experts, sizes.chunk_bytes, sizes.kv_bytes(ctx)
    ram_slots = mem.slots
    tier = mem.gpu
    on_gpu = tier is not None and tier.dense
    gpu_slots = tier.slots if tier is not None else 0
    where = "GPU" if on_gpu else "RAM"
    rows = [
        {"part": "baseline (Python, torch, kernels)", "where": "RAM", "bytes": BASELINE_BYTES},
        {"part": "weights resident (non-expert)", "where": where,
         "bytes": tier.dense_bytes if on_gpu else sizes.resident_bytes},
        {"part": "KV cache", "where": where, "bytes": kv},
        {"part": "scratch", "where": "RAM", "bytes": mem.scratch_bytes + mem.safety_bytes},
        {"part": f"expert slots RAM ({ram_slots} of {total})", "where": "RAM", "bytes": ram_slots * chunk},
    ]
    if tier is not None:
        rows += [{"part": "GPU scratch and allocator reserve", "where": "GPU",
                  "bytes": tier.scratch_bytes + tier.reserve_bytes},
                 {"part": f"expert slots GPU ({gpu_slots} of {total})", "where": "GPU", "bytes": gpu_slots * chunk}]

    k, E, always = s.top_k, s.num_experts, sizes.layout.experts_per_token - s.top_k
    used = sizes.moe_layers * (k + always) * chunk  # expert bytes one token computes with
    # the tiers cache independently: what the GPU misses, the RAM holds in its own proportion
    h_gpu = cached_share(gpu_slots, sizes.moe_layers, E, k, always)
    h_ram = (1 - h_gpu) * cached_share(ram_slots, sizes.moe_layers, E, k, always)
    hit = h_gpu + h_ram
    settings = placement.runtime_settings(profile, sizes.layout)
    _, disk_gbps = reader_choice(profile, chunk)
    disk_rate = disk_gbps * 1e9
    ram_gbps = top_threads(profile["ram"]["read_gbps"])
    kernels = profile["cpu"]["kernels"]
    expert_rate = top_threads(kernels[kernel_key(expert_format)]["gemv_gbps"]) * 1e9
    dense_rate = (top_threads(kernels[dense_format]["gemv_gbps"]) if dense_format in kernels else ram_gbps) * 1e9
    gemm = top_threads(kernels[kernel_key(expert_format)]["gemm_gflops"]) * 1e9
    costs = miss_costs(profile, sizes.layout) if tier is not None else None
    copy_one = costs is not None and gpu_slots > 0 and costs.copy_wins(1)  # where a decode step's misses run
    if tier is not None:
        gpu_kernels = profile["gpu"]["kernels"]
        gpu_rate = gpu_kernels[kernel_key(expert_format)]["gemv_gbps"] * 1e9
        gpu_dense_rate = gpu_kernels[dense_format if dense_format in gpu_kernels else "q8"]["gemv_gbps"] * 1e9
    # read-ahead also fetches the experts it mispredicts: ~10% of what it reads goes unused
    waste = 1 + PREFETCH_WASTE
    missed = used * (1 - h_gpu)  # bytes a decode step runs from RAM, or copies over
    times = {
        "read": used * (1 - hit) * waste / disk_rate,
        "experts": (used * h_gpu / gpu_rate if tier is not None else 0.0)
        + (missed / costs.h2d + missed / gpu_rate if copy_one else missed / expert_rate),
        "dense": sizes.token_dense_bytes / (gpu_dense_rate if on_gpu else dense_rate),
        # attention reads half the cache on average; VRAM is taken as GPU_SPEEDUP times as fast as RAM
        "kv": kv / 2 / ((GPU_SPEEDUP if on_gpu else 1) * ram_gbps * 1e9),
    }
    compute = times["experts"] + times["dense"] + times["kv"]
    per_token = max(times["read"], compute) * (1 + OVERLAP_SLACK)
    if times["read"] >= compute:
        bottleneck = "disk reads"
    else:
        names = {"experts": "expert kernels", "dense": "dense kernels", "kv": "attention (KV cache)"}
        bottleneck = names[max(names, key=lambda key: times[key])]

    # prefill, one engine step of `step` tokens at a time: every expert some token of the step picks is read
    # (unless cached) and multiplied once, at the slower of its bytes at the GEMV rate and its FLOPs at the GEMM
    # rate; reads and compute overlap
    prompt = max(1, prompt)
    step = max(1, min(prompt, mem.prefill_chunk))
    # distinct experts per MoE layer under uniform routing, and those every token uses
    touched = E * (1 - (1 - k / E) ** step) + always
    expert_flops = 2 * 3 * s.hidden_size * s.moe_intermediate_size * step * (k + always) / touched  # per expert
    tokens_each = step * (k + always) / touched  # tokens per expert
    if costs is not None:  # on the GPU tier: GPU hits, and misses where they cost least for that many tokens
        missing = costs.copy(tokens_each) if gpu_slots and costs.copy_wins(tokens_each) else costs.cpu(tokens_each)
        per_expert = h_gpu * max(chunk / costs.gpu_gemv, expert_flops / costs.gpu_gemm) + (1 - h_gpu) * missing
        dense_step = max(sizes.token_dense_bytes / gpu_dense_rate, 2 * sizes.dense_params * step / costs.gpu_gemm) \
            if on_gpu else max(sizes.token_dense_bytes / dense_rate, 2 * sizes.dense_params * step / gemm)
    else:
        per_expert = max(chunk / expert_rate, expert_flops / gemm)
        dense_step = max(sizes.token_dense_bytes / dense_rate, 2 * sizes.dense_params * step / gemm)
    step_compute = sizes.moe_layers * touched * per_expert + dense_step
    step_read = sizes.moe_layers * touched * chunk * (1 - hit) / disk_rate
    prefill = math.ceil(prompt / step) * max(step_compute, step_read) * (1 + OVERLAP_SLACK)

    notes = [("hit rate assumes uniform routing (the cached share of the experts); the expert cache's policies "
             "and read-ahead do better on real routing")]
    if tier is not None and not on_gpu:
        notes.append("the resident weights and KV cache do not fit in the GPU budget: they stay in RAM")
    if tier is not None:
        notes.append(f"experts missing from the GPU run {'copied over' if copy_one else 'on the CPU'} in decode "
                     f"({costs.copy(1) * 1e3:.2f} ms copied, {costs.cpu(1) * 1e3:.2f} ms on the CPU each)")
    bpt = {"ram": int(used * h_ram), "disk": int(used * (1 - hit) * waste)}
    if tier is not None:
        bpt["gpu"] = int(used * h_gpu)
        bpt["pcie"] = int(missed) if copy_one else 0
    return Prediction(True, None, budget, rows, ram_slots, int(gpu_slots), total, hit, bpt, times,
                      1 / per_token, prompt / prefill, bottleneck, notes, settings["readers"],
                      settings["prefetch_depth"], mem.as_dict())
