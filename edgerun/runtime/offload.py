"""Experts offloaded to the store: a global cache of expert slots in RAM, filled by background reads,
with the experts of the next layers predicted and prefetched while the current layer computes.

Tiers: the store (NVMe) backs a pool of RAM slots; each tier is an `ExpertCache` over its own slots with
its own policy, so a GPU tier is one more cache in front of this one.

Shapes: T = tokens in the call, D = hidden, E = experts, K = experts per token, L = MoE layers.
"""

from __future__ import annotations

import mmap
import time
import weakref
from collections.abc import Sequence

import numpy as np
import torch

from .. import native
from ..store.store import ExpertStore
from .experts import HeldChunk, Lookahead, Phase, Residency, RoutedExperts
from .placement import MAX_PREFETCH_DEPTH
from .policy import ExpertCache, make_policy
from .quantized import ACTIVATION_CODES
from .reader import PREFETCH, QUEUED, ExpertReader, ReadRequest

WASTE_LIMIT = 0.3  # share of a token's prefetches left unused above which the depth shrinks
UPGRADE_AFTER = 3  # tokens a low-bit copy serves before its chunk is read over it when the disk is idle
HINTED_LAYERS = 2  # layers ahead whose forecast probabilities the cache policy is given
SLACK_LIMIT = 0.7  # share of the decoded tokens' time the disk reads below which the first layers are protected
PROTECTED_SHARE = 0.25  # of the slots, at most what the protected layers' experts fill when all are kept
SPECULATE_PRECISION = 0.5  # share of a distance's forecast experts used, from which the cache's declines are read
PRECISION_RATE = 0.05  # weight of each layer's forecasts in the running share per distance


def per_layer(value: float | Sequence[float], layers: int, name: str = "threshold") -> tuple[float, ...]:
    """A threshold for each of `layers` MoE layers: one value (or a sequence of one) for all, or one per layer."""
    values = (float(value),) if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    if len(values) == 1:
        return values * layers
    if len(values) != layers:
        raise ValueError(f"{name} has {len(values)} values; the model has {layers} MoE layers")
    return values


def as_setting(values: tuple[float, ...]) -> float | list[float]:
    """Per-layer thresholds as they are reported: one number when every layer has the same."""
    return values[0] if len(set(values)) <= 1 else list(values)


class SlotPool:
    """Page-aligned buffers of one chunk each (aligned for O_DIRECT), and the expert views of each.

    Anonymous memory: a slot costs RAM only once something was read into it."""

    def __init__(self, count: int, store: ExpertStore):
        self.count = count
        self.size = store.chunk_bytes
        self._mem = mmap.mmap(-1, max(1, count) * self.size)
        self.data = np.frombuffer(self._mem, dtype=np.uint8)
        self._layout = store.expert_layout
        self._views: list = [None] * count
        self._biases: list = [None] * count

    def buffer(self, slot: int) -> np.ndarray:
        return self.data[slot * self.size:(slot + 1) * self.size]

    def views(self, slot: int):
        v = self._views[slot]
        if v is None:
            v = self._views[slot] = self._layout.views(self.buffer(slot))
        return v

    def biases(self, slot: int) -> list[np.ndarray]:
        """[gate_up bias, down bias] of the slot's expert, or [] for experts without biases."""
        b = self._biases[slot]
        if b is None:
            b = self._biases[slot] = self._layout.bias_views(self.buffer(slot))
        return b


class OffloadedExperts(RoutedExperts):
    """q8/q4 experts of a store, computed by the fused kernel on slots of a bounded expert cache. Read-ahead runs
    the next layers' own routers (through the decoder's lookahead) on the current layer's input. The cache and
    its slots are made when the container is attached to its decoder, which says how many experts a token uses."""

    def __init__(self, store: ExpertStore, activation: str, slots: int, *, policy: str = "default",
                 prefetch: bool = True, workers: int = 1, direct: bool | None = None, depth: int = 1,
                 skip_below: float | Sequence[float] = 0.0, renormalize: bool = True,
                 low_below: float | Sequence[float] = 0.0, low_when_late: bool = False,
                 substitute_below: float | Sequence[float] = 0.0):
        if activation not in ACTIVATION_CODES:
            raise ValueError(f"no expert kernel for activation {activation}")
        self.store = store
        self.activation = ACTIVATION_CODES[activation]
        self._made = {"activation": activation, "slots": slots, "policy": policy, "prefetch": prefetch,
                      "workers": workers, "direct": direct, "depth": depth}  # for variant()
        self.layers = list(store.moe_layers)
        # the thresholds of approximate decoding, one per MoE layer (by position)
        n = len(self.layers)
        self._skip = per_layer(skip_below, n, "skip_below")
        self._sub = per_layer(substitute_below, n, "substitute_below")
        self._lowb = per_layer(low_below, n, "low_below")
        self._light = tuple(map(max, self._skip, self._sub))
        if (max(self._lowb) > 0 or low_when_late) and store.low_layout is None:
            raise ValueError(f"the store {store.path} has no low-bit copies of its experts")
        self.pos = {layer: i for i, layer in enumerate(self.layers)}
        self.top_k = 0  # experts a token uses per layer, from the decoder
        self.capacity = slots
        self.cache: ExpertCache | None = None
        self.policy_name = policy
        self.pool: SlotPool | None = None
        self.reader = ExpertReader(store, workers, direct)
        weakref.finalize(self, self.reader.close)  # the reader's threads end with the model
        self.decoder: Lookahead | None = None  # set by attach
        self.prefetch = prefetch
        self.speculate = True  # forecasts the cache declines are read into free scratch slots
        self.depth = max(1, min(MAX_PREFETCH_DEPTH, depth))
        # approximate decoding: a decoded token's expert that is not in memory and weighs less than skip_below (of
        # its layer) is left out, the other experts' weights scaled back to the routing's sum when renormalize
        self.skip_below, self.renormalize = as_setting(self._skip), renormalize
        # a decoded token's expert that is not in memory and weighs from skip_below up to substitute_below is
        # replaced by the layer's most probable expert in memory that the token did not choose, weighted by its own
        # probability (scaled as the routing scaled the expert it replaces); read when none is in memory. The
        # lightest are left out rather than replaced: a replacement costs the compute of an expert, and where the
        # budget holds half the experts computing, not reading, sets the pace
        self.substitute_below = as_setting(self._sub)
        # a decoded token's expert that is not in memory and weighs less than low_below is read from its low-bit
        # copy; a low copy serves only such tokens (a heavier one, or prefill, reads the chunk over it), and one
        # that keeps being used (UPGRADE_AFTER tokens) is upgraded to the chunk when the reader is idle
        self.low_below = as_setting(self._lowb)
        # with low_when_late, a decoded token's expert the read-ahead did not bring (a demand read, which the
        # token waits for: the disk is behind) is read from its low-bit copy whatever its weight, and a copy in
        # the cache serves every decoded token, those that weigh it at low_below or more marking it for upgrade
        self.low_when_late = low_when_late
        self._low: dict[tuple[int, int], int] = {}  # keys whose slot holds a low-bit copy: tokens it served
        self._upgrade: set[tuple[int, int]] = set()  # low copies in steady use: read the chunk when the disk is free
        self._upgrading: set[tuple[int, int]] = set()  # those being read: not stale prefetches, whatever the layer
        self._weight: dict[int, float] = {}  # the decoded token's routing weights at the current layer
        self._pending: dict[tuple[int, int], ReadRequest] = {}  # reads into cache slots not yet consumed
        self._prefetched: set[tuple[int, int]] = set()  # reads issued as prefetches, not yet used
        self._scratch_free: list[int] = []
        self._scratch_queue: list[int] = []
        self._scratch: dict[int, tuple[int, ReadRequest]] = {}  # expert -> (scratch slot, read)
        self._ahead: dict[tuple[int, int], tuple[int, ReadRequest]] = {}  # forecasts the cache declined, being read
        self._predicted: dict[int, set[int]] = {}  # layer position -> experts predicted for the current token
        self._forecasts: dict[int, dict[int, set[int]]] = {}  # layer position -> {layers ahead: experts forecast}
        # by layers ahead, the share of the decoded tokens' forecast experts that their layer used (running)
        self._precision = [1.0] * (n + 1)
        self._held: dict[tuple[int, int], int] = {}  # chunks a device tier is copying out of their slots
        self._decode = False  # the phase of the current step
        self._steps = 0  # steps begun
        self._x: torch.Tensor | None = None
        self._token_prefetches = self._token_wasted = 0
        self._clock: tuple[float, float] | None = None  # (time, reader's read_seconds) when this token began
        self._busy = 1.0  # share of the decoded tokens' time the disk read, averaged over the last few
        self.reset_stats()

    def variant(self, **approximate) -> OffloadedExperts:
        """A new container like this one (store, slots, policy, read-ahead) with other settings of approximate
        decoding (skip_below, substitute_below, low_below, low_when_late, renormalize; exact where not given)."""
        made = dict(self._made)
        out = OffloadedExperts(self.store, made.pop("activation"), made.pop("slots"), **made, **approximate)
        out.speculate = self.speculate
        return out

    # -- the contract with the engine -----------------------------------------------------------------------
    def attach(self, decoder: Lookahead) -> None:
        if list(decoder.moe_layers) != self.layers or decoder.stored_experts != self.store.num_experts:
            raise ValueError(f"the decoder's {decoder.stored_experts} experts of layers {decoder.moe_layers} are not "
                             f"the store's {self.store.num_experts} of layers {self.layers}")
        self.decoder = decoder
        if self.cache is None:
            k, slots = decoder.experts_per_token, self.capacity
            self.top_k = k
            self.cache = ExpertCache(slots, make_policy(self.policy_name, len(self.layers), self.store.num_experts, k))
            self.pool = SlotPool(slots + k, self.store)  # the last k are scratch for experts the cache declines
            self._scratch_free = list(range(slots, slots + k))
            native.warmup_routed(k, self.store.expert_layout.fmt)  # the one-token kernel, now: not in a token

    def begin_step(self, phase: Phase, tokens: int) -> None:
        decode = phase == "decode"
        if decode and self._steps:  # how the previous token's read-ahead went sets this one's depth
            idle = self.reader.queued() == 0 and not self._running()
            if self._token_prefetches and self._token_wasted > WASTE_LIMIT * self._token_prefetches:
                self.depth = max(1, self.depth - 1)
            elif idle and self.late:
                self.depth = min(MAX_PREFETCH_DEPTH, self.depth + 1)
        self._token_prefetches = self._token_wasted = 0
        for key in list(self._ahead):
            self._drop_ahead(key)
        for slot, req in self._scratch.values():  # left by a step that ended in an error
            self._release_scratch(slot, req)
        self._scratch.clear()
        self._scratch_queue.clear()
        self._protect_unreachable(decode)
        self._predicted.clear()
        self._forecasts.clear()
        self._prefetched.clear()  # what arrived and was not used stays cached as any resident expert
        self._decode = decode
        self._steps += 1
        if decode:
            self.decode_tokens += 1
            if self._decode_bytes0 is None:
                self._decode_bytes0 = self.reader.bytes_read
                self._decode_read0 = self.reader.read_seconds

    def _protect_unreachable(self, decode: bool) -> None:
        """While the last decoded tokens left the disk idle for more than 1 - SLACK_LIMIT of their time, tell the
        policy to keep the experts of the layers the read-ahead cannot reach in time (the first `depth`: they are
        known only once the token is) rather than others: there a miss in a later layer is read ahead while others
        compute, and one in these layers stalls the token. As many of those layers as fill PROTECTED_SHARE of the
        slots with all their experts, none under a budget that small (the others' extra misses would outgrow the
        disk's spare time). Where the disk sets the pace every miss costs its read, and without read-ahead every
        miss stalls: there the policy keeps what it expects to be used soonest."""
        now, read = time.perf_counter(), self.reader.read_seconds
        if decode and self._clock is not None and now > self._clock[0]:
            busy = min(1.0, (read - self._clock[1]) / (now - self._clock[0]))
            self._busy = 0.5 * (self._busy + busy)
            fit = int(PROTECTED_SHARE * self.capacity / self.store.num_experts)
            slack = self.prefetch and self._busy < SLACK_LIMIT
            self.cache.policy.protect(min(self.depth, fit) if slack else 0)
        self._clock = (now, read) if decode else None

    # -- statistics -----------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        # decode steps only: each access is a cache hit, a prefetch that arrived (or is late), or a demand read
        self.accesses = self.hits = self.prefetch_hits = self.late = 0
        self.recall_used = self.recall_predicted = 0
        self.prefetches = self.prefetches_used = 0
        self.stall_seconds = 0.0
        self.decode_tokens = 0
        self.skipped = 0  # decoded tokens' experts left out (skip_below)
        self.substituted = 0  # decoded tokens' experts replaced by one in memory (substitute_below)
        self.low_reads = self.low_served = self.upgrades = self.read_overs = 0  # low_below
        self.ahead_reads = self.ahead_used = 0  # forecasts the cache declined, read into scratch slots
        self._bytes0 = self.reader.bytes_read
        self._decode_bytes0: int | None = None  # bytes read when the first decode step began
        self._decode_read0 = 0.0  # the reader's read_seconds then

    def stats(self) -> dict:
        size = self.store.chunk_bytes
        total = len(self.layers) * self.store.num_experts
        bytes_read = self.reader.bytes_read - self._bytes0
        decode_bytes = 0 if self._decode_bytes0 is None else self.reader.bytes_read - self._decode_bytes0
        decode_read = 0.0 if self._decode_bytes0 is None else self.reader.read_seconds - self._decode_read0
        used_per_token = len(self.layers) * self.top_k * size

        def rate(n: int) -> float:
            return n / self.accesses if self.accesses else 0.0
        return {
            "offload": True,
            "policy": self.policy_name,
            "expert_slots": self.capacity,
            "experts_total": total,
            "hit_rate": rate(self.hits),
            "prefetch_hit_rate": rate(self.prefetch_hits),
            "late_prefetch_rate": rate(self.late),
            "demand_read_rate": rate(self.accesses - self.hits - self.prefetch_hits - self.late),
            "prefetch_recall": self.recall_predicted / self.recall_used if self.recall_used else 0.0,
            "prefetch_precision": self.prefetches_used / self.prefetches if self.prefetches else 0.0,
            "prefetch_depth": self.depth,
            "bytes_read": bytes_read,
            "decode_bytes_read": decode_bytes,
            "bytes_read_per_token": decode_bytes / self.decode_tokens if self.decode_tokens else 0.0,
            "expert_bytes_per_token": used_per_token,
            "ideal_bytes_per_token": used_per_token * max(0.0, 1 - self.capacity / total),
            "read_stall_seconds": self.stall_seconds,  # decode steps waiting for reads
            "read_stall_per_token": self.stall_seconds / self.decode_tokens if self.decode_tokens else 0.0,
            "decode_read_seconds": decode_read,  # the disk reading while decoding (see Model.stats' read_busy_share)
            "decode_read_bytes_per_s": decode_bytes / decode_read if decode_read else 0.0,
            "skip_below": self.skip_below,
            "skipped_experts": self.skipped,
            "skipped_rate": self.skipped / (self.skipped + self.accesses) if self.skipped + self.accesses else 0.0,
            "substitute_below": self.substitute_below,
            "substituted_experts": self.substituted,
            "substituted_rate": rate(self.substituted),
            "low_below": self.low_below,
            "low_when_late": self.low_when_late,
            "low_format": self.store.low_layout.fmt if self.store.low_layout else None,
            "low_reads": self.low_reads,
            "low_served": self.low_served,
            "low_served_rate": rate(self.low_served),
            "low_upgrades": self.upgrades,  # in the background, of copies in steady use
            "low_read_overs": self.read_overs,  # copies a heavier token or a prefill needed the chunk of
            "speculative_reads": self.ahead_reads,  # forecasts the cache declined, read into scratch slots
            "speculative_reads_used": self.ahead_used,  # used from their scratch slots, or taken into the cache
            "forecast_precision": [round(p, 3) for p in self._precision[1:self.depth + 1]],  # by layers ahead
            "direct_io": self.reader.direct,
        }

    def residency(self) -> Residency:
        if self.cache is None:
            return Residency(set(), set())
        pending = [k for k, r in list(self._pending.items()) if not r.done.is_set()]
        cached = self.cache.resident()
        loading = {(self.layers[p], e) for p, e in pending}
        return Residency({(self.layers[p], e) for p, e in cached} - loading, loading)

    # -- the layer call -------------------------------------------------------------------------------------
    def __call__(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self._routed(layer, x, idx, weights)

    def in_slots(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                 probs: torch.Tensor | None = None) -> tuple[list[int], list[float]] | torch.Tensor:
        """What the call computes for one token x [1, D], up to the experts: where each of them is whole in a cache
        slot once the schedule is done, their slots and weights (after light misses) for the caller to compute
        (the decode step's kernel: runtime/fused.py); otherwise the output, as the call gives it. probs [1, E]: the
        router's probabilities for x where the caller has them (else light misses run the router again)."""
        return self._routed(layer, x, idx, weights, in_slots=True, probs=probs)

    def _routed(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, in_slots: bool = False,
                probs: torch.Tensor | None = None):
        self._x = x
        pos = self.pos[layer]
        if x.shape[0] != 1:
            out = super().__call__(layer, x, idx, weights)
            if self._decode:
                self.cache.policy.observe(pos, idx[0].tolist())
            return out
        chosen, w = idx[0].tolist(), weights[0].tolist()  # one token: lists from here on
        if self._decode and (self._lowb[pos] > 0 or self.low_when_late):
            self._weight = dict(zip(chosen, w))
        used, used_w = chosen, w
        if self._decode and self._light[pos] > 0:
            used, used_w = self._light_misses(layer, x, chosen, w, probs)
        if not used:
            out = torch.zeros_like(x)
        else:
            out = self._one_token(layer, x, used, used_w, in_slots)
        if self._decode:
            self.cache.policy.observe(pos, chosen)
        return out

    def _one_token(self, layer: int, x: torch.Tensor, chosen: list[int], w: list[float], in_slots: bool):
        """A token's experts: in one kernel call when the schedule finds every one of them in memory (or, in_slots,
        their slots and weights), else one by one as their reads arrive (RoutedExperts.one_by_one)."""
        order = self.schedule(layer, chosen)
        pos = self.pos[layer]
        if any(e in self._scratch or not self._complete((pos, e)) for e in order):
            return self.one_by_one(layer, x, chosen, order, torch.tensor([w]))
        slots = [self._acquire(layer, e)[0] for e in chosen]
        if in_slots:
            return slots, w
        experts = []
        for slot in slots:
            (gu_qs, gu_scales), (d_qs, d_scales) = self.pool.views(slot)
            experts.append((gu_qs, gu_scales, d_qs, d_scales, *(self.pool.biases(slot) or (None, None))))
        return self.in_one_call(x, experts, torch.tensor([w]))

    def light_misses(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor):
        pos = self.pos[layer]
        if not self._decode or self._light[pos] <= 0 or idx.shape[0] != 1:
            return idx, weights
        chosen, w = self._light_misses(layer, x, idx[0].tolist(), weights[0].tolist())
        return torch.tensor([chosen], dtype=idx.dtype), torch.tensor([w], dtype=weights.dtype)

    def _light_misses(self, layer: int, x: torch.Tensor, chosen: list[int], w: list[float],
                      probs: torch.Tensor | None = None) -> tuple[list[int], list[float]]:
        """A decoded token's experts `chosen` and weights `w` with those that are neither cached (here or in a tier
        in front) nor being read and weigh less than skip_below left out, and those that weigh from skip_below up
        to substitute_below replaced by experts in memory, with the thresholds of the layer. probs [1, E]: the
        router's probabilities for x, if the caller has them."""
        pos = self.pos[layer]
        skip_below, substitute_below, below = self._skip[pos], self._sub[pos], self._light[pos]
        light = [k for k, (e, wk) in enumerate(zip(chosen, w))
                 if wk < below and not self.cache.contains((pos, e)) and not self.elsewhere((pos, e))]
        if not light:
            return chosen, w
        chosen, w, replaced, p = list(chosen), list(w), set(), None
        for k in light:
            if skip_below <= w[k] < substitute_below:
                if p is None:  # the router's probability of every expert (x is this layer's router input)
                    p = (self.decoder.lookahead(layer, layer, x).probs if probs is None else probs)[0].float().tolist()
                e = chosen[k]
                sub = self._substitute(pos, chosen, p) if e < len(p) else None  # not an `always` expert
                if sub is not None:
                    w[k] = w[k] * p[sub] / p[e] if p[e] > 0 else 0.0
                    chosen[k] = sub
                    replaced.add(k)
                    if (pos, sub) in self._low:
                        self._weight[sub] = 0.0  # a low-bit copy standing in serves as it is: never read over
        self.substituted += len(replaced)
        keep = [k for k in range(len(chosen)) if k not in light or k in replaced or w[k] >= skip_below]
        self.skipped += len(chosen) - len(keep)
        if len(keep) == len(chosen):
            return chosen, w
        kept_w = [w[k] for k in keep]
        if self.renormalize and sum(kept_w) > 0:
            scale = sum(w) / sum(kept_w)
            kept_w = [v * scale for v in kept_w]
        return [chosen[k] for k in keep], kept_w

    def _substitute(self, pos: int, chosen: list[int], probs: list[float]) -> int | None:
        """The most probable expert of layer position pos that is in memory (in a tier in front, or here: its whole
        chunk, or its low-bit copy, and not being read) and that is not among `chosen`, or None. A copy stands in as
        well as a chunk: it is the light expert's replacement that is approximate, not the copy."""
        best = None
        for e, p in enumerate(probs):
            key = (pos, e)
            if e in chosen or not self.elsewhere(key) and not self._complete(key):
                continue
            if best is None or p > probs[best]:
                best = e
        return best

    def schedule(self, layer: int, experts: list[int]) -> list[int]:
        """Find each expert in the cache or start its read, start the prefetches of the next layers, and
        order the work: experts in memory first, then reads in the order they will arrive."""
        pos = self.pos[layer]
        decode = self._decode
        needed = {(pos, e) for e in experts}
        self._cancel_stale(pos, needed)
        if decode:
            for d, top in self._forecasts.pop(pos, {}).items():
                self._precision[d] += PRECISION_RATE * (len(top.intersection(experts)) / len(top) - self._precision[d])
        ready, loading = [], []
        for e in experts:
            key = (pos, e)
            slot = self.cache.lookup(key)
            prefetched = key in self._prefetched
            if prefetched:
                self._prefetched.discard(key)
                self.prefetches_used += 1
            if decode:
                self.accesses += 1
                if pos > 0:
                    self.recall_used += 1
                    self.recall_predicted += e in self._predicted.get(pos, ())
            if slot is not None and key in self._low:
                light = self._weight.get(e, 1.0) < self._lowb[pos]
                if decode and (light or self.low_when_late):
                    self.low_served += 1
                    self._low[key] += 1
                    if self._low[key] >= UPGRADE_AFTER or not light:
                        self._upgrade.add(key)
                else:  # the copy is not good enough for this token: the chunk is read over it
                    self._read_over_low(key, layer, e, slot)
                    self.read_overs += 1
                    loading.append(e)  # a demand read in the statistics
                    continue
            if slot is not None:
                req = self._pending.get(key)
                if decode:
                    if not prefetched:
                        self.hits += 1  # resident before this token asked for it
                    else:
                        self._count_arrival(req)
                if req is not None:
                    self.reader.promote(req)
                    loading.append(e)
                else:
                    ready.append(e)
                continue
            ahead = self._ahead.get(key)
            if ahead is not None and ahead[1].low and not self._low_read(layer, e, demand=True):
                self._drop_ahead(key)  # a copy read ahead that this token weighs too heavily for: read the chunk
                ahead = None
            if ahead is not None:  # read ahead into a scratch slot: kept in the cache if the policy takes it now
                self.ahead_used += 1
                self.low_served += ahead[1].low
                if decode:
                    self._count_arrival(ahead[1])
                if not self._adopt(key, self._pinned(needed), serving=True):
                    self._scratch[e] = self._ahead.pop(key)
                loading.append(e)
                continue
            admitted = self.cache.admit(key, pinned=self._pinned(needed))
            if admitted is None:
                self._scratch_queue.append(e)
                continue
            slot, evicted = admitted
            if evicted is not None:
                self._forget(evicted)
            low = self._low_read(layer, e, demand=True)
            self._submit(key, layer, e, slot, demand=True, low=low)
            if low:
                self.low_served += 1
                self._low[key] = 1
            loading.append(e)
        while len(self._scratch_queue) > len(self._scratch_free) and self._ahead:  # speculation makes way
            self._drop_ahead(max(self._ahead))
        for _ in range(min(len(self._scratch_free), len(self._scratch_queue))):
            self._start_scratch(layer)
        if self.prefetch and self.decoder is not None:
            self._prefetch(pos, needed)
        if self._upgrade:
            self._start_upgrades(pos)
        return ready + loading + [e for e in experts if e not in ready and e not in loading]

    def _count_arrival(self, req: ReadRequest | None) -> None:
        """A decoded token's expert read ahead (req None: arrived and done with): in time, or late."""
        if req is None or req.done.is_set():
            self.prefetch_hits += 1
        else:
            self.late += 1

    def _acquire(self, layer: int, e: int) -> tuple[int, bool]:
        """(slot, whether it is a scratch slot) of an expert `schedule` was given, once its read is done."""
        key = (self.pos[layer], e)
        scratch = self._scratch.pop(e, None)
        if scratch is not None:
            slot, req = scratch
            try:
                self._wait(req)
            except BaseException:
                self._release_scratch(slot, req)
                raise
            return slot, True
        req = self._pending.pop(key, None)
        self._upgrading.discard(key)
        if req is not None:
            try:
                self._wait(req)
            except BaseException:
                self.reader.cancel(req)
                self.cache.remove(key)
                raise
        return self.cache.slot_of(key), False

    def _free_scratch(self, layer: int, slot: int) -> None:
        self._scratch_free.append(slot)
        if self._scratch_queue:
            self._start_scratch(layer)

    def expert(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        slot, scratch = self._acquire(layer, e)
        (gu_qs, gu_scales), (d_qs, d_scales) = self.pool.views(slot)
        xs = x.to(torch.float32).contiguous()
        out = np.empty(xs.shape, dtype=np.float32)
        native.expert_ffn(xs.numpy(), gu_qs, gu_scales, d_qs, d_scales, self.activation, out, *self.pool.biases(slot))
        if scratch:
            self._free_scratch(layer, slot)
        return torch.from_numpy(out)

    # -- a device tier in front -----------------------------------------------------------------------------
    def prepare(self, layer: int, x: torch.Tensor, experts: list[int]) -> list[int]:
        self._x = x
        return self.schedule(layer, experts)

    def in_slot(self, layer: int, e: int) -> bool:
        return self.cache.contains((self.pos[layer], e))

    def chunk(self, layer: int, e: int) -> HeldChunk:
        slot, _ = self._acquire(layer, e)
        return self._hold((self.pos[layer], e), slot)

    def resident_chunk(self, layer: int, e: int) -> HeldChunk | None:
        key = (self.pos[layer], e)
        if not self._complete(key):
            return None
        return self._hold(key, self.cache.slot_of(key))

    def _complete(self, key: tuple[int, int]) -> bool:
        """Whether key's cache slot holds its whole chunk: cached, and any read into it done without error."""
        if not self.cache.contains(key):
            return False
        req = self._pending.get(key)
        return req is None or self._whole(req)

    def _whole(self, req: ReadRequest) -> bool:
        """Whether a read into a cache slot is done and left its whole chunk there (no error, not stopped early)."""
        return req.done.is_set() and req.error is None and req.offset == self.pool.size

    def _hold(self, key: tuple[int, int], slot: int) -> HeldChunk:
        """The slot's chunk, which no admission evicts until it is released."""
        self._held[key] = self._held.get(key, 0) + 1

        def release() -> None:
            left = self._held.pop(key) - 1
            if left:
                self._held[key] = left
        return HeldChunk(self.pool.buffer(slot), release)

    def observe(self, layer: int, experts: list[int]) -> None:
        self.cache.policy.observe(self.pos[layer], experts)

    # -- helpers --------------------------------------------------------------------------------------------
    def _wait(self, req: ReadRequest) -> None:
        if req.done.is_set() or not self._decode:
            self.reader.wait(req)
            return
        t0 = time.perf_counter()
        self.reader.wait(req)
        self.stall_seconds += time.perf_counter() - t0  # a decode step waiting

    def _low_read(self, layer: int, e: int, demand: bool) -> bool:
        """Whether the decoded token's expert e of the layer, missing, is read from its low-bit copy."""
        return self._decode and (self._weight.get(e, 1.0) < self._lowb[self.pos[layer]]
                                 or demand and self.low_when_late)

    def _start_scratch(self, layer: int) -> None:
        e = self._scratch_queue.pop(0)
        slot = self._scratch_free.pop()
        low = self._low_read(layer, e, demand=True)
        self.low_reads += low
        self.low_served += low
        req = self.reader.submit(None, layer, e, self.pool.buffer(slot), demand=True, low=low)
        self._scratch[e] = (slot, req)

    def _submit(self, key, layer: int, e: int, slot: int, demand: bool, low: bool = False) -> None:
        """Start the read of an expert (its chunk, or its low-bit copy) into its cache slot."""
        self._upgrading.discard(key)
        self._pending[key] = self.reader.submit(key, layer, e, self.pool.buffer(slot), demand=demand, low=low)
        if low:
            self._low[key] = 0
            self.low_reads += 1
        else:
            self._low.pop(key, None)
            self._upgrade.discard(key)

    def _read_over_low(self, key, layer: int, e: int, slot: int, demand: bool = True) -> None:
        """Replace the low-bit copy in the slot by the chunk."""
        req = self._pending.pop(key, None)
        if req is not None:
            self.reader.cancel(req)  # returns once nothing writes into the slot
        self._submit(key, layer, e, slot, demand=demand)

    def _start_upgrades(self, pos: int) -> None:
        """Read the chunks of low copies used again, while the reader has nothing else to do; not those of the
        current layer (computed next) nor one a device tier holds."""
        if self.reader.queued() or any(not r.done.is_set() for r in self._pending.values()):
            return
        for key in sorted(self._upgrade):
            slot = self.cache.slot_of(key)
            if slot is None or key not in self._low:  # evicted, or already read over
                self._upgrade.discard(key)
                continue
            req = self._pending.get(key)
            if key[0] == pos or key in self._held or req is not None and not req.done.is_set():
                continue  # for a later call
            self._upgrade.discard(key)
            self._read_over_low(key, self.layers[key[0]], key[1], slot, demand=False)
            self._upgrading.add(key)
            self.upgrades += 1
            return  # one at a time: the disk stays free for what the next layers need

    def _pinned(self, needed: set) -> set:
        """Keys no admission may evict: this layer's, reads under way, and prefetches not yet used."""
        return needed | self._prefetched | self._running() | self._held.keys()

    def _running(self) -> set:
        return {k for k, r in self._pending.items() if r.state != QUEUED}

    def _forget(self, key) -> None:
        """key left the cache: stop its read if one is under way."""
        req = self._pending.pop(key, None)
        if req is not None:
            self.reader.cancel(req)
        self._prefetched.discard(key)
        self._low.pop(key, None)
        self._upgrade.discard(key)
        self._upgrading.discard(key)

    def _cancel_stale(self, pos: int, needed: set) -> None:
        """Prefetches for this layer that routing did not choose, or for layers already passed."""
        stale = [k for k in self._pending
                 if (k[0] < pos or (k[0] == pos and k not in needed)) and k not in self._upgrading]
        for key in [k for k in self._ahead if k[0] < pos or k[0] == pos and k not in needed]:
            self._drop_ahead(key)
        for key in stale:
            req = self._pending.pop(key)
            self.reader.cancel(req)
            if req.state != QUEUED and self._whole(req):
                continue  # it arrived complete: keep it cached
            self.cache.remove(key)
            self._prefetched.discard(key)
            self._low.pop(key, None)
            self._token_wasted += 1

    def forecast(self, pos: int, x: torch.Tensor) -> dict[int, tuple[list[int], list[float] | None, dict]]:
        """For the MoE layers after position pos (up to the prefetch depth): the experts their routers pick for x,
        the input of layer pos, and, for one token, the routing weight of each expert picked ({} for several
        tokens) and, for the next two layers, every expert's probability (the cache policy's hint; None beyond).

        The policy reads a layer's hint only while the layer before it runs (ForecastPolicy.expected_next_use),
        so a hint for layer pos + 3 or later would be replaced, by a forecast from nearer, before it is read."""
        ahead = range(pos + 1, min(len(self.layers), pos + 1 + self.depth))
        if not ahead:
            return {}
        if x.shape[0] != 1:
            return {j: (self.decoder.lookahead(self.layers[pos], self.layers[j], x).idx.unique().tolist(), None, {})
                    for j in ahead}
        rows = self.decoder.lookahead_many(self.layers[pos], [self.layers[j] for j in ahead], x)
        tops, weights = rows.idx.tolist(), rows.weights.tolist()
        probs = rows.probs[:HINTED_LAYERS].tolist()
        return {j: (top, probs[i] if i < HINTED_LAYERS else None, dict(zip(top, w)))
                for i, (j, top, w) in enumerate(zip(ahead, tops, weights))}

    def _prefetch(self, pos: int, needed: set) -> None:
        """Read the experts the next layers' routers pick for this layer's input."""
        pinned = self._pinned(needed)
        for j, (top, probs, weights) in self.forecast(pos, self._x).items():
            if probs is not None:
                self.cache.policy.predict(j, probs)
            self._predicted.setdefault(j, set()).update(top)
            if self._decode and top:
                self._forecasts.setdefault(j, {})[j - pos] = set(top)
            speculate = self.speculate and self._decode and self._precision[j - pos] >= SPECULATE_PRECISION
            for e in top:
                key = (j, e)
                if self.cache.contains(key) or self.elsewhere(key):
                    continue
                if self._decode and weights.get(e, 1.0) < self._light[j]:
                    continue  # it would be left out or replaced if still missing: reading it ahead spends the bytes
                low = self._decode and weights.get(e, 1.0) < self._lowb[j]
                if key in self._ahead:  # the policy may take it from nearer: a prefetch from then on
                    if not self._adopt(key, pinned):
                        continue
                    self.ahead_used += 1
                else:
                    admitted = self.cache.admit(key, pinned=pinned)
                    if admitted is None:
                        if speculate and self._scratch_free:
                            self._read_ahead(key, low)
                        continue
                    slot, evicted = admitted
                    if evicted is not None:
                        self._forget(evicted)
                    self._submit(key, self.layers[j], e, slot, demand=False, low=low)  # not late: by weight
                self._prefetched.add(key)
                pinned.add(key)
                self.prefetches += 1
                self._token_prefetches += 1
        if self._decode and self.speculate and self._scratch_free and self._busy >= SLACK_LIMIT \
                and self._x.shape[0] == 1 and not self.reader.queued():
            self._read_further(pos)

    def _read_further(self, pos: int) -> None:
        """The disk sets the pace of decoding, and the reader has nothing queued: the layers within the read-ahead's
        depth need nothing more read (their experts are in memory, or light enough to be left out or replaced), and
        the disk would idle until the token reaches layers further on. Read the forecast experts of the first of
        those that the token will need into the free scratch slots, behind every other read, from as far as
        forecasts come true at least SPECULATE_PRECISION of the time: a wrong forecast costs disk time that would go
        unused, and evicts nothing. The layers further on are routed a read-ahead's depth at a time, up to the first
        that needs a read."""
        step = MAX_PREFETCH_DEPTH
        for start in range(pos + 1 + self.depth, len(self.layers), step):
            far = range(start, min(len(self.layers), start + step))
            if self._precision[start - pos] < SPECULATE_PRECISION:
                return
            rows = self.decoder.lookahead_many(self.layers[pos], [self.layers[j] for j in far], self._x)
            for j, top, weights in zip(far, rows.idx.tolist(), rows.weights.tolist()):
                if self._precision[j - pos] < SPECULATE_PRECISION:
                    return
                self._forecasts.setdefault(j, {})[j - pos] = set(top)  # how far forecasts come true
                wanted = [(e, w) for e, w in zip(top, weights) if w >= self._light[j]
                          and not self.cache.contains((j, e)) and (j, e) not in self._ahead
                          and not self.elsewhere((j, e))]
                for e, w in wanted[:len(self._scratch_free)]:
                    self._read_ahead((j, e), low=w < self._lowb[j])
                if wanted:
                    return

    def _read_ahead(self, key: tuple[int, int], low: bool = False) -> None:
        """Read a forecast expert the cache declined (its chunk, or its low-bit copy) into a scratch slot, behind
        every other read."""
        slot = self._scratch_free.pop()
        req = self.reader.submit(None, self.layers[key[0]], key[1], self.pool.buffer(slot), demand=False,
                                 speculative=True, low=low)
        self._ahead[key] = (slot, req)
        self.ahead_reads += 1
        self.low_reads += low

    def _adopt(self, key: tuple[int, int], pinned: set, serving: bool = False) -> bool:
        """Move a read ahead into the cache, in its scratch slot, if the policy now takes it; the slot the cache
        gives up (free, or its victim's) becomes scratch. serving: the token asking for it now uses it (a copy
        counts that token among those it served)."""
        slot, req = self._ahead[key]
        got = self.cache.adopt(key, slot, pinned=pinned)
        if got is None:
            return False
        del self._ahead[key]
        freed, evicted = got
        if evicted is not None:
            self._forget(evicted)
        self._scratch_free.append(freed)
        req.key = key
        self._pending[key] = req
        self.reader.promote(req, PREFETCH)
        if req.low:
            self._low[key] = int(serving)
        else:
            self._low.pop(key, None)
        return True

    def _drop_ahead(self, key: tuple[int, int]) -> None:
        """Stop a read ahead (stale, or its slot is needed) and free its scratch slot."""
        self._release_scratch(*self._ahead.pop(key))

    def _release_scratch(self, slot: int, req: ReadRequest) -> None:
        """Free a scratch slot once its read (done, failed or under way) no longer writes into it."""
        self.reader.cancel(req)  # returns once nothing writes into the slot
        self._scratch_free.append(slot)

    def close(self) -> None:
        self.reader.close()
