"""The memory planner: how a RAM budget for the whole process splits between what every token needs and a
pool of expert slots.

    budget = baseline (Python, torch, numba, measured) + resident weights (mapped from the store)
             + KV cache (context length) + scratch (activations of one prefill chunk, bypass buffers)
             + slots x chunk size (the expert cache)

The budget is a ceiling on peak RSS: every term is counted at its largest.
"""

from __future__ import annotations

import re
import resource
from dataclasses import asdict, dataclass

import psutil

from ..errors import BudgetError, EdgerunError

MIN_SLOTS_PER_K = 2  # slots per routed expert of a token: one layer computing while the next one loads
SAFETY_FRACTION = 0.02  # allocator slack and page-table overhead, as a share of the budget
SAFETY_MIN = 32 << 20
AUTO_MARGIN = 0.15  # with no budget given, leave this share of the available RAM to the rest of the machine
AUTO_MARGIN_MIN = 1 << 30

SCRATCH_SHARE = 0.05  # of the budget, for the activations of one prefill chunk
MIN_PREFILL_CHUNK = 32

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str | int | float) -> int:
    """Bytes from a human size: 12GiB, 1.5GB, 800MiB, 4096 (bytes). Decimal units are powers of 10."""
    if isinstance(text, (int, float)):
        if text <= 0:
            raise EdgerunError(f"a size must be positive, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise EdgerunError(f"cannot read {text!r} as a size: write it like 12GiB, 1.5GB or 800MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def current_rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """The process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if psutil.MACOS else peak * 1024


def available_ram() -> int:
    return psutil.virtual_memory().available


@dataclass
class MemoryPlan:
    budget_bytes: int
    baseline_bytes: int  # the process before the model: interpreter, torch, compiled kernels
    resident_bytes: int  # non-expert weights, mapped from the store
    kv_cache_bytes: int
    scratch_bytes: int
    safety_bytes: int
    slot_bytes: int  # one expert chunk
    slots: int  # expert cache capacity
    total_experts: int
    minimum_bytes: int  # the smallest budget this model, context and machine accept
    budget_given: bool
    prefill_chunk: int  # tokens per prefill step, shorter under a tight budget

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
        return d

    def describe(self) -> str:
        return (f"budget {format_size(self.budget_bytes)}: baseline {format_size(self.baseline_bytes)}, weights "
                f"{format_size(self.resident_bytes)}, KV cache {format_size(self.kv_cache_bytes)}, scratch "
                f"{format_size(self.scratch_bytes + self.safety_bytes)}, expert cache {self.slots} of "
                f"{self.total_experts} experts ({format_size(self.slots * self.slot_bytes)})")


def scratch_bytes(*, hidden: int, inter: int, heads: int, vocab: int, top_k: int, context_length: int,
                  chunk: int, slot_bytes: int) -> int:
    """Transient memory of one forward step at its largest (a full prefill chunk), plus the buffers that
    experts the cache declines to hold are read into."""
    T = chunk
    f32 = 4
    activations = 16 * T * hidden * f32  # residual, norms, q/k/v/o, expert inputs and outputs
    experts = 3 * T * top_k * inter * f32  # gate/up products and activations of the routed tokens
    attention = heads * T * context_length * f32  # scores of one chunk against the whole context
    logits = T * vocab * f32  # all-position logits of Model.logits()
    return activations + experts + attention + logits + top_k * slot_bytes


def choose_prefill_chunk(budget: int | None, scratch_of, largest: int) -> int:
    """The longest prefill chunk whose scratch takes at most SCRATCH_SHARE of the budget (at least
    MIN_PREFILL_CHUNK tokens): a tight budget prefills in shorter steps rather than refusing."""
    chunk = largest
    while budget is not None and chunk > MIN_PREFILL_CHUNK and scratch_of(chunk) > SCRATCH_SHARE * budget:
        chunk //= 2
    return chunk


def plan_memory(*, budget: int | None, baseline: int, resident: int, kv_cache: int, scratch: int, slot_bytes: int,
                total_experts: int, top_k: int, context_length: int, prefill_chunk: int) -> MemoryPlan:
    """Split a budget (None: what the machine has, less a margin). Refuses a budget below the minimum with
    one line giving it."""
    given = budget is not None
    if budget is None:
        avail = available_ram() + current_rss()  # this process's own pages count as part of what it has
        budget = max(avail - max(AUTO_MARGIN_MIN, int(avail * AUTO_MARGIN)), 0)
    safety = max(SAFETY_MIN, int(budget * SAFETY_FRACTION))
    fixed = baseline + resident + kv_cache + scratch + safety
    min_slots = min(total_experts, MIN_SLOTS_PER_K * top_k)
    core = fixed - safety + min_slots * slot_bytes
    minimum = core + max(SAFETY_MIN, int(core * SAFETY_FRACTION / (1 - SAFETY_FRACTION)))
    if budget < minimum:
        where = "the budget" if given else "this machine's available RAM (less a safety margin)"
        raise BudgetError(
            f"{where} of {format_size(budget)} is below the minimum of {format_size(minimum)} for this model "
            f"with a {context_length}-token context (weights {format_size(resident)}, KV cache "
            f"{format_size(kv_cache)}, {min_slots} expert slots of {format_size(slot_bytes)}); give more RAM or a "
            f"shorter context"
        )
    slots = min(total_experts, max(min_slots, (budget - fixed) // slot_bytes))
    return MemoryPlan(budget, baseline, resident, kv_cache, scratch, safety, slot_bytes, int(slots), total_experts,
                      minimum, given, prefill_chunk)
