"""Routing traces: which experts every layer picked for every token, as JSON lines, one object per
(token, layer):

    {"problem_id": 0, "layer": 3, "experts": [7, 0], "gating_probs": [0.8, 0.2], "token_idx": 12}

Other keys are allowed and ignored. Replaying a trace against an expert cache gives the hit rate a
policy would reach with that many expert slots, next to Belady's offline optimum, and, under the thresholds of
approximate decoding, the experts it would read.
"""

from __future__ import annotations

import heapq
import json
import math
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch

from ..errors import TraceError
from .offload import per_layer
from .policy import ExpertCache, make_policy

Step = tuple[int, tuple[int, ...]]  # (layer, experts it used), in replay order


class Trace(list[Step]):
    """The steps of a trace in replay order (problem, token, layer), with the model's shape; `records` are the
    same steps with where they come from and their routing weights: ((problem, token, layer), experts, probs)."""

    def __init__(self, steps: Sequence[Step] = (), num_layers: int = 0, num_experts: int = 0, top_k: int = 0,
                 records: Sequence[tuple[tuple[int, int, int], tuple[int, ...], tuple[float, ...]]] = ()):
        super().__init__(steps)
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.records = list(records)

    @property
    def accesses(self) -> int:
        return sum(len(experts) for _, experts in self)


def _int_field(rec: dict, name: str) -> int:
    value = rec.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f'"{name}" must be a non-negative integer, got {value!r}')
    return value


def _parse(line: str) -> tuple[tuple[int, int, int], tuple[int, ...], tuple[float, ...]]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    problem, token, layer = (_int_field(rec, k) for k in ("problem_id", "token_idx", "layer"))
    experts, probs = rec.get("experts"), rec.get("gating_probs")
    if not isinstance(experts, list) or not experts:
        raise ValueError('"experts" must be a non-empty list')
    if any(not isinstance(e, int) or isinstance(e, bool) or e < 0 for e in experts):
        raise ValueError(f'"experts" must hold non-negative integers, got {experts!r}')
    if len(set(experts)) != len(experts):
        raise ValueError(f'"experts" repeats an expert: {experts!r}')
    if not isinstance(probs, list) or len(probs) != len(experts) or \
            any(not isinstance(p, (int, float)) or isinstance(p, bool) for p in probs):
        raise ValueError('"gating_probs" must be a list of numbers, one per expert')
    return (problem, token, layer), tuple(experts), tuple(float(p) for p in probs)


def read_trace(path: str | Path) -> Trace:
    """Read a JSON-lines routing trace; records may come in any order. Raises TraceError naming the
    file and line of the first bad record."""
    path = Path(path)
    records: dict[tuple[int, int, int], tuple[tuple[int, ...], tuple[float, ...]]] = {}
    first_line: dict[tuple[int, int, int], int] = {}
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    where, experts, probs = _parse(line)
                except ValueError as e:
                    raise TraceError(f"{path} line {n}: {e}") from None
                if where in records:
                    raise TraceError(f"{path} line {n}: a second record for problem {where[0]} token {where[1]} "
                                     f"layer {where[2]} (first on line {first_line[where]})")
                records[where] = experts, probs
                first_line[where] = n
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise TraceError(f"{path} is not a UTF-8 text file") from None
    if not records:
        raise TraceError(f"{path} holds no routing records")
    ordered = [(where, *records[where]) for where in sorted(records)]
    steps = [(where[2], experts) for where, experts, _ in ordered]
    return Trace(steps, num_layers=max(layer for layer, _ in steps) + 1,
                 num_experts=max(max(experts) for _, experts in steps) + 1,
                 top_k=max(len(experts) for _, experts in steps), records=ordered)


class RecentRouting:
    """A routing observer: the experts each layer chose for its last `capacity` tokens. Written by the generating
    thread and readable from any other while it runs."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._layers: dict[int, deque] = {}

    def __call__(self, layer: int, idx: torch.Tensor, weights: torch.Tensor) -> None:
        """Record idx [tokens, K]: the experts layer chose for each token."""
        rows = idx[-self.capacity:].tolist()
        with self._lock:
            if layer not in self._layers:
                self._layers[layer] = deque(maxlen=self.capacity)
            self._layers[layer].extend(rows)

    def counts(self, layer: int, num_experts: int, tokens: int) -> tuple[list[int], int]:
        """(how many of the layer's last `tokens` tokens chose each expert, tokens counted)."""
        with self._lock:
            rows = list(self._layers.get(layer, ()))[-tokens:] if tokens > 0 else []
        out = [0] * num_experts
        for row in rows:
            for e in row:
                out[e] += 1
        return out, len(rows)


class TraceWriter:
    """Writes the decoder's routing decisions to a new trace file, in the format read_trace reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file: IO[str] | None = self.path.open("w", encoding="utf-8")
        except OSError as e:
            raise TraceError(f"cannot write trace {self.path}: {e.strerror or e}") from None
        self._token: tuple[int, int] | None = None

    def record(self, problem_id: int, token_idx: int, layer: int, experts: Sequence[int],
               probs: Sequence[float]) -> None:
        """Write one (token, layer) record; the previous token is flushed when a new one starts."""
        if self._file is None:
            raise ValueError(f"trace {self.path} is closed")
        token = (int(problem_id), int(token_idx))
        if self._token is not None and token != self._token:
            self._file.flush()
        self._token = token
        rec = {"problem_id": token[0], "layer": int(layer), "experts": [int(e) for e in experts],
               "gating_probs": [float(p) for p in probs], "token_idx": token[1]}
        self._file.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shape(steps: Sequence[Step]) -> tuple[int, int, int]:
    if not steps:
        raise TraceError("the trace has no steps to replay")
    if isinstance(steps, Trace):
        return steps.num_layers, steps.num_experts, steps.top_k
    return (max(layer for layer, _ in steps) + 1, max(max(e) for _, e in steps) + 1,
            max(len(e) for _, e in steps))


def capacity_from_fraction(frac: float, total: int) -> int:
    """A cache of `frac` of `total` experts, rounded, at least one slot."""
    if not 0 < frac <= 1:
        raise TraceError(f"cache fraction must be in (0, 1], got {frac}")
    return max(1, round(frac * total))


def _check_capacity(capacity: int, total: int) -> None:
    if not 1 <= capacity <= total:
        raise TraceError(f"cache capacity must be between 1 and the trace's {total} experts, got {capacity}")


def replay(steps: Sequence[Step], capacity: int, policy_name: str = "default",
           skip_below: float | Sequence[float] = 0.0, substitute_below: float | Sequence[float] = 0.0) -> dict:
    """Run the steps through an ExpertCache of `capacity` slots: every expert is looked up, a miss
    is admitted (the step's other experts pinned), then the policy observes the step.

    With skip_below or substitute_below (a routing weight, or one per layer; a Trace from read_trace, whose records
    hold the weights), each step is a decoded token's under approximate decoding, by OffloadedExperts' rule: an
    expert that misses and weighs less than skip_below is left out; one from skip_below up to substitute_below is
    replaced by an expert of its layer in the cache that the step did not pick (the lowest numbered: a trace gives no
    other expert's probability), or read when the layer has none there. `reads` counts the experts read (every
    miss): with thresholds, the bytes a token reads are reads_per_token chunks, against the same replay's without;
    of a token's experts, left_out_per_token are left out, replaced_per_token replaced and light_reads_per_token
    read for want of a stand-in."""
    num_layers, num_experts, top_k = _shape(steps)
    _check_capacity(capacity, num_layers * num_experts)
    cache = ExpertCache(capacity, make_policy(policy_name, num_layers, num_experts, top_k))
    policy = cache.policy
    try:
        skip, light = (per_layer(v, num_layers, name) for name, v in (("skip_below", skip_below),
                                                                      ("substitute_below", substitute_below)))
    except ValueError as e:
        raise TraceError(str(e)) from None
    light = [max(a, b) for a, b in zip(skip, light)]
    approximate = any(light)
    if approximate and len(getattr(steps, "records", ())) != len(steps):
        raise TraceError("replaying approximate decoding needs the trace's routing weights (a trace read from a file)")
    weights = [probs for _, _, probs in steps.records] if approximate else ()
    left_out = replaced = light_reads = 0
    for i, (layer, experts) in enumerate(steps):
        used = list(experts)
        read_anyway = set()
        if approximate:
            for k, (e, w) in enumerate(zip(experts, weights[i])):
                if w >= light[layer] or cache.contains((layer, e)):
                    continue
                if w < skip[layer]:
                    used[k] = None
                    left_out += 1
                    continue
                stand_in = next((x for x in range(num_experts) if x not in used and cache.contains((layer, x))), None)
                if stand_in is None:
                    read_anyway.add(e)
                else:
                    used[k] = stand_in
                    replaced += 1
        keys = [(layer, e) for e in used if e is not None]
        for key in keys:
            if cache.lookup(key) is None:
                light_reads += key[1] in read_anyway
                cache.admit(key, pinned=keys)
        policy.observe(layer, experts)
    tokens = len(steps) / num_layers
    reads = cache.accesses - cache.hits
    return {"hits": cache.hits, "accesses": cache.accesses, "hit_rate": cache.hit_rate, "reads": reads,
            "reads_per_token": reads / tokens, "left_out_per_token": left_out / tokens,
            "replaced_per_token": replaced / tokens, "light_reads_per_token": light_reads / tokens}


def belady(steps: Sequence[Step], capacity: int) -> float:
    """Hit rate of Belady's offline optimum among policies that always admit: on a miss, evict the
    resident key whose next use is farthest away (the step's other experts are pinned, as in replay).
    A policy that may decline to cache can beat it when there are very few slots."""
    num_layers, num_experts, _ = _shape(steps)
    _check_capacity(capacity, num_layers * num_experts)
    seq = [(layer, e) for layer, experts in steps for e in experts]
    next_use: list[float] = [math.inf] * len(seq)
    seen: dict[tuple[int, int], int] = {}
    for i in range(len(seq) - 1, -1, -1):
        next_use[i] = seen.get(seq[i], math.inf)
        seen[seq[i]] = i
    due: dict[tuple[int, int], float] = {}  # resident key -> its next use
    heap: list[tuple[float, tuple[int, int]]] = []  # (-next use, key); outdated entries are skipped
    hits = i = 0
    for layer, experts in steps:
        keys = [(layer, e) for e in experts]
        for key in keys:
            if key in due:
                hits += 1
            elif len(due) >= capacity and not _evict_farthest(due, heap, keys):
                i += 1
                continue
            due[key] = next_use[i]
            heapq.heappush(heap, (-next_use[i], key))
            i += 1
    return hits / len(seq)


def _evict_farthest(due: dict, heap: list, pinned: list) -> bool:
    """Drop the resident key used farthest ahead, other than `pinned`; False if all are pinned."""
    kept = []
    evicted = False
    while heap and not evicted:
        entry = heapq.heappop(heap)
        key = entry[1]
        if due.get(key) != -entry[0]:
            continue  # outdated: the key was used or evicted since
        if key in pinned:
            kept.append(entry)
        else:
            del due[key]
            evicted = True
    for entry in kept:
        heapq.heappush(heap, entry)
    return evicted


class TracedRouting:
    """Routing taken from a trace instead of the model's routers, so that a benchmark runs with the routing of a
    real model. Every MoE layer's router is replaced by one that gives the tokens of each call the experts and
    weights the trace gives its next tokens (token by token, problem by problem, wrapping around at the end). The
    read-ahead asks the same routers, so it foresees a later layer's experts for the current token exactly: a
    perfect forecast, where a model's own next-layer routers guess most but not all of them."""

    def __init__(self, trace: Trace):
        tokens: dict[tuple[int, int], dict[int, tuple]] = {}
        for (problem, token, layer), experts, probs in trace.records:
            tokens.setdefault((problem, token), {})[layer] = experts, probs
        L, K = trace.num_layers, trace.top_k
        # tokens the trace gives K experts at every layer (a trace cut short leaves its last token incomplete)
        rows = [layers for _, layers in sorted(tokens.items())
                if len(layers) == L and all(len(experts) == K for experts, _ in layers.values())]
        if not rows:
            raise TraceError(f"no token of the trace has {K} experts at each of its {L} layers")
        self.idx = torch.tensor([[layers[layer][0] for layer in range(L)] for layers in rows])  # [N, L, K]
        self.weights = torch.tensor([[layers[layer][1] for layer in range(L)] for layers in rows])  # [N, L, K]
        self.num_experts = trace.num_experts
        self.probs: torch.Tensor | None = None  # [N, L, E] once installed, E the model's experts
        self.arrays: tuple = ()  # idx, weights and probs as NumPy arrays, once installed
        self.cursor = [0] * L  # per MoE layer, the trace token its next call starts at

    def install(self, decoder) -> None:
        """Route `decoder`'s MoE layers by the trace from now on. The decoder must have the trace's MoE layers,
        experts per layer and experts per token."""
        N, L, K = self.idx.shape
        spec = decoder.spec
        if (len(decoder.moe_layers), spec.top_k) != (L, K) or spec.num_experts < self.num_experts:
            raise TraceError(f"the trace routes {L} MoE layers to {K} of at least {self.num_experts} experts; this "
                             f"model has {len(decoder.moe_layers)} MoE layers routing to {spec.top_k} of "
                             f"{spec.num_experts}")
        # each chosen expert's weight, 0 for the others: what forecasts read as the routers' probabilities
        self.probs = torch.zeros(N, L, spec.num_experts).scatter_(2, self.idx, self.weights)
        self.arrays = self.idx.numpy(), self.weights.numpy(), self.probs.numpy()  # for _TracedRouter.ahead
        pos = {layer: i for i, layer in enumerate(decoder.moe_layers)}
        for layer, part in decoder.moe.items():
            part.router = _TracedRouter(self, pos[layer])

        def advance(layer: int, idx: torch.Tensor, weights: torch.Tensor) -> None:
            self.cursor[pos[layer]] += idx.shape[0]
        decoder.observers.append(advance)  # called once for every call the decoder makes (not for forecasts)


class _TracedRouter:
    def __init__(self, routing: TracedRouting, pos: int):
        self.routing, self.pos = routing, pos

    def ahead(self, routers: list, x: torch.Tensor):
        """For a decode step (x [1, D]): what each of `routers` (this trace's) will give, as the rows of one Routing
        (Decoder.lookahead_many); None otherwise."""
        from ..models.routers import Routing

        r = self.routing
        if x.shape[0] != 1 or x.device.type != "cpu" or any(getattr(o, "routing", None) is not r for o in routers):
            return None
        layers = [o.pos for o in routers]
        at = np.array([r.cursor[p] % r.idx.shape[0] for p in layers]), np.array(layers)
        idx, weights, probs = (torch.from_numpy(a[at]) for a in r.arrays)  # copies; NumPy's indexing is quicker
        return Routing(idx, weights.to(x.dtype), probs)

    def __call__(self, x: torch.Tensor):
        from ..models.routers import Routing

        r = self.routing
        if x.shape[0] == 1 and x.device.type == "cpu":  # a decode step: the trace's row, copied
            # by basic indexing: ahead([self], x) gives the same at twice the cost, once a layer
            at = r.cursor[self.pos] % r.idx.shape[0], slice(self.pos, self.pos + 1)
            idx, weights, probs = (torch.from_numpy(a[at].copy()) for a in r.arrays)
            return Routing(idx, weights.to(x.dtype), probs)
        rows = (r.cursor[self.pos] + torch.arange(x.shape[0])) % r.idx.shape[0]
        idx, weights = r.idx[rows, self.pos], r.weights[rows, self.pos]
        return Routing(idx.to(x.device), weights.to(x.device, x.dtype), r.probs[rows, self.pos].to(x.device))
