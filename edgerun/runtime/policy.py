"""Which experts stay in RAM: a fixed set of expert slots (`ExpertCache`) and the policy that picks
what to evict when a missing expert needs a slot.

A key is `(layer, expert)` with MoE layers numbered 0..L-1 in execution order. The offloading
container reports every expert access (`Policy.access`), the experts each layer used once a token has passed it
(`Policy.observe`), and optionally a router's forecast for a layer ahead (`Policy.predict`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from .. import native

Key = tuple[int, int]

# Forecast policy parameters. Probabilities are combined as log-odds around the prior top_k/num_experts.
RECENCY_CAP = 99         # idle gaps of more tokens than this are pooled: too rare to estimate one by one
PRIOR_STRENGTH = 4.0     # pseudo-counts of the prior in every learned frequency (Laplace-like smoothing)
FREQ_ALPHA = 0.05        # EMA rate of an expert's usage: remembers about the last 20 tokens
FREQ_WEIGHT = 0.5        # the EMA largely repeats what recency says, so it only nudges
TEMPORAL_WEIGHT = 1.0    # the expert-to-expert transition from one token to the next is the best signal
CROSS_WEIGHT = 0.5       # layer-to-layer co-use is noisier: it only ranks the next layer's experts
LONG_RUN_SLACK = 1.0     # context fades: no wait is predicted beyond what the long-run use rate gives
Q_FLOOR = 1e-3           # keeps the expected time to next use finite
PREDICT_CLIP = 1e-3      # a router forecast is never taken as certain either way
PROTECT_FACTOR = 0.25    # a protected layer's keys count as needed this much sooner when choosing what to evict
_NONE = np.empty(0)      # no forecast, for the kernels


class Policy:
    """Eviction policy interface; subclasses override `victim` and whichever hooks they need."""

    name = "base"

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k

    def access(self, key: Key, hit: bool) -> None:
        """Called for every expert access, in order, hit or miss."""

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        """Called after all accesses of one (token, layer) with the experts that layer used."""

    def predict(self, layer: int, probs: Sequence[float]) -> None:
        """Hint: the probability of each expert of `layer` being used by the current token."""

    def victim(self, resident: Collection[Key], incoming: Key) -> Key | None:
        """The resident key to evict so that `incoming` gets a slot, or None to not cache `incoming`."""
        raise NotImplementedError

    def protect(self, layers: int) -> None:
        """Hint: a miss in MoE layers 0..layers-1 stalls the token (nothing reads their experts ahead in time)
        while the disk has time for the others' misses; keep their experts rather than others. 0: none."""


class LRUPolicy(Policy):
    """Evicts the least recently accessed key; always admits."""

    name = "lru"

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        super().__init__(num_layers, num_experts, top_k)
        self._clock = 0
        self._last: dict[Key, int] = {}

    def access(self, key: Key, hit: bool) -> None:
        self._clock += 1
        self._last[key] = self._clock

    def victim(self, resident: Collection[Key], incoming: Key) -> Key | None:
        last = self._last
        return min(resident, key=lambda k: last.get(k, 0), default=None)


class LFUPolicy(Policy):
    """Evicts the key accessed the fewest times so far (ties: the least recently accessed); always admits."""

    name = "lfu"

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        super().__init__(num_layers, num_experts, top_k)
        self._clock = 0
        self._stats: dict[Key, tuple[int, int]] = {}  # key -> (accesses, last access)

    def access(self, key: Key, hit: bool) -> None:
        self._clock += 1
        count = self._stats.get(key, (0, 0))[0]
        self._stats[key] = (count + 1, self._clock)

    def victim(self, resident: Collection[Key], incoming: Key) -> Key | None:
        stats = self._stats
        return min(resident, key=lambda k: stats.get(k, (0, 0)), default=None)


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


class ForecastPolicy(Policy):
    """Evicts the key expected to be needed farthest in the future (an online estimate of Belady's
    choice), and declines to cache a missing expert that would itself be needed last.

    The layer order is fixed, so a key of layer l can next be used when the pass reaches l again,
    d = (l - current layer) mod L steps ahead (L for the current layer). With q the probability that
    the key is used at that opportunity, its expected next use is d + L (1 - q) / q. q combines, as
    log-odds: how often an expert is reused after the same number of idle tokens (learned online),
    the expert's recent usage rate, the layer's token-to-token expert transitions, and for the next
    layer the co-use with what the current layer picked (or the router's forecast, if given). The
    context behind q fades after a few tokens, so the wait L (1 - q) / q is capped at LONG_RUN_SLACK
    times L (1 - r) / r, r being the share of all tokens so far that used the expert.
    """

    name = "default"

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        super().__init__(num_layers, num_experts, top_k)
        L, E = num_layers, num_experts
        self._prior = min(max(top_k / num_experts, Q_FLOOR), 1 - Q_FLOOR)
        self._logit_prior = float(_logit(np.float64(self._prior)))
        seed = PRIOR_STRENGTH * self._prior
        self._layer = 0                  # layer of the latest access or observe
        self._step: list[int] = []       # experts the current layer has used for the current token
        self._in_step = False            # the current layer's accesses are not observed yet
        self._observed = -1              # layer of the latest observe
        self._tokens = np.zeros(L, np.int64)  # tokens each layer has finished
        self._uses = np.zeros((L, E))    # tokens that used each key
        # token index of each key's last use; never used counts as idle for the longest gap
        self._last_use = np.full((L, E), -RECENCY_CAP, np.int64)
        self._gap_hits = np.zeros(RECENCY_CAP + 1)   # uses at an opportunity, by tokens idle before it
        self._gap_total = np.zeros(RECENCY_CAP + 1)  # opportunities, by tokens idle before them
        self._recency = np.full(RECENCY_CAP + 1, self._logit_prior)  # log-odds of use, by idle tokens
        self._freq = np.full((L, E), self._prior)
        self._trans = np.full((L, E, E), seed)       # [l, a, b]: b used at l right after a was
        self._trans_total = np.full((L, E), PRIOR_STRENGTH)
        self._cross = np.full((L, E, E), seed)       # [l, a, b]: b used at l+1 after a at l (l < L-1)
        self._cross_total = np.full((L, E), PRIOR_STRENGTH)
        # each layer's experts at its last token: the first _prev_n[l] of row l
        self._prev_ids = np.zeros((L, E), np.int64)
        self._prev_n = np.zeros(L, np.int64)
        # per layer, as of its last token: log-odds of use at the next chance, the cap on the wait
        # (both without the next-layer term) and the expected wait itself
        self._logodds = np.full((L, E), self._logit_prior)
        self._max_wait = np.full((L, E), self._long_run_wait(np.zeros(E), 0))
        self._wait = self._waits(self._logodds, self._max_wait)
        self._stale: set[int] = set()    # layers observed since their rows were computed
        self._forecast: dict[int, np.ndarray] = {}
        self._eta: np.ndarray | None = None  # victim's flat expected next uses, until the state they read changes
        self._protect = 0                # layers 0.._protect-1 are protected (see protect)
        # [current layer] -> steps until each layer comes again, as a column
        ahead = (np.arange(L)[None, :] - np.arange(L)[:, None]) % L
        ahead[ahead == 0] = L
        self._ahead = ahead[:, :, None].astype(np.float64)

    def access(self, key: Key, hit: bool) -> None:
        layer, expert = key
        if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):  # the kernels do not check
            raise ValueError(f"no key {key} in a policy of {self.num_layers} layers x {self.num_experts} experts")
        if layer != self._layer or not self._in_step:
            self._layer, self._step, self._in_step = layer, [], True
        if expert not in self._step:
            self._step.append(expert)
            self._eta = None

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        used = [int(e) for e in experts]
        if not 0 <= layer < self.num_layers or used and not 0 <= min(used) <= max(used) < self.num_experts:
            raise ValueError(f"layer {layer} experts {used} are not all in a policy of {self.num_layers} layers x "
                             f"{self.num_experts} experts")
        t = int(self._tokens[layer])
        before = layer > 0 and self._observed == layer - 1  # the same token's previous layer
        if not native.policy(
                "observe", t, self._last_use[layer], self._uses[layer], self._freq[layer], self._gap_total,
                self._gap_hits, self._trans[layer], self._trans_total[layer], self._prev_ids[layer],
                self._prev_n[layer], self._cross[layer - 1], self._cross_total[layer - 1], self._prev_ids[layer - 1],
                self._prev_n[layer - 1] if before else 0, np.array(used, np.int64), RECENCY_CAP, FREQ_ALPHA, Q_FLOOR):
            self._observe_counts(layer, used, t, before)
        self._tokens[layer] = t + 1
        self._prev_ids[layer, :len(used)] = used
        self._prev_n[layer] = len(used)
        self._observed = layer
        self._layer, self._step, self._in_step = layer, used, False
        self._forecast.pop(layer, None)
        self._stale.add(layer)
        self._eta = None

    def _observe_counts(self, layer: int, used: list[int], t: int, before: bool) -> None:
        """observe's counts in NumPy (kernels.policy_observe computes the same)."""
        gap = np.minimum(t - self._last_use[layer], RECENCY_CAP)
        self._gap_total += np.bincount(gap, minlength=RECENCY_CAP + 1)
        for g in gap[used].tolist():
            self._gap_hits[g] += 1
        self._last_use[layer, used] = t
        self._uses[layer, used] += 1
        freq = self._freq[layer]
        freq *= 1 - FREQ_ALPHA
        freq[used] += FREQ_ALPHA
        np.clip(freq, Q_FLOOR, 1 - Q_FLOOR, out=freq)  # keeps its log-odds finite
        self._count(self._trans[layer], self._trans_total[layer], self._prev(layer), used)
        if before:
            self._count(self._cross[layer - 1], self._cross_total[layer - 1], self._prev(layer - 1), used)

    def _prev(self, layer: int) -> list[int]:
        """The experts `layer` used at its last token."""
        return self._prev_ids[layer, :self._prev_n[layer]].tolist()

    @staticmethod
    def _count(table: np.ndarray, totals: np.ndarray, before: list[int], after: list[int]) -> None:
        for a in before:
            table[a, after] += 1
            totals[a] += 1

    def predict(self, layer: int, probs: Sequence[float]) -> None:
        p = np.asarray(probs, dtype=np.float64)
        if p.shape != (self.num_experts,):
            raise ValueError(f"expected {self.num_experts} expert probabilities for layer {layer}, got {p.shape}")
        self._forecast[layer] = np.minimum(np.maximum(p, PREDICT_CLIP), 1 - PREDICT_CLIP)  # np.clip, at less cost
        if layer == self._layer + 1:  # the only forecast expected_next_use reads
            self._eta = None

    def protect(self, layers: int) -> None:
        protect = max(0, min(self.num_layers, int(layers)))
        if protect != self._protect:
            self._protect, self._eta = protect, None

    def victim(self, resident: Collection[Key], incoming: Key) -> Key | None:
        E = self.num_experts
        eta = self._eta
        if eta is None:  # admissions between two accesses (a layer's read-ahead) ask the same question
            eta = self.expected_next_use()  # a new array
            if self._protect:
                eta[:self._protect] *= PROTECT_FACTOR
            eta = self._eta = eta.ravel()
        keys = list(resident)
        if not keys:
            return None
        best = keys[int(eta[np.fromiter((layer * E + expert for layer, expert in keys), np.intp, len(keys))].argmax())]
        if eta[incoming[0] * E + incoming[1]] > eta[best[0] * E + best[1]]:
            return None
        return best

    def expected_next_use(self) -> np.ndarray:
        """[L, E] expected number of layer steps until each key is next used."""
        L, cur, step = self.num_layers, self._layer, self._step
        eta = np.empty((L, self.num_experts))
        forecast = self._forecast.get(cur + 1, _NONE)
        if native.policy(
                "next_use", eta, self._ahead[cur, :, 0], self._wait, self._logodds, self._max_wait, self._recency,
                self._gap_hits, self._gap_total, np.array(sorted(self._stale), np.int64), self._tokens,
                self._last_use, self._freq, self._uses, self._trans, self._trans_total, self._cross,
                self._cross_total, self._prev_ids, self._prev_n, cur, np.array(step, np.int64), self._in_step,
                forecast, self._prior, self._logit_prior, RECENCY_CAP, PRIOR_STRENGTH, LONG_RUN_SLACK, FREQ_ALPHA,
                Q_FLOOR, FREQ_WEIGHT, TEMPORAL_WEIGHT, CROSS_WEIGHT):
            self._stale.clear()
            return eta
        return self._next_use()

    def _next_use(self) -> np.ndarray:
        """expected_next_use in NumPy (kernels.policy_next_use computes the same)."""
        L, cur, step = self.num_layers, self._layer, self._step
        if self._stale:
            s = PRIOR_STRENGTH
            self._recency = _logit((self._gap_hits + s * self._prior) / (self._gap_total + s))
            for layer in self._stale:
                gap = np.minimum(self._tokens[layer] - self._last_use[layer], RECENCY_CAP)
                self._logodds[layer] = self._row(layer, self._prev(layer), gap, self._freq[layer])
                self._max_wait[layer] = self._long_run_wait(self._uses[layer], self._tokens[layer])
                self._wait[layer] = self._waits(self._logodds[layer], self._max_wait[layer])
            self._stale.clear()
        eta = self._ahead[cur] + self._wait
        if self._in_step:
            # mid-token at the current layer: count the token in progress as if it were observed
            gap = np.minimum(self._tokens[cur] + 1 - self._last_use[cur], RECENCY_CAP)
            gap[step] = 1
            freq = self._freq[cur] * (1 - FREQ_ALPHA)
            freq[step] += FREQ_ALPHA
            uses = self._uses[cur].copy()
            uses[step] += 1
            max_wait = self._long_run_wait(uses, self._tokens[cur] + 1)
            eta[cur] = L + self._waits(self._row(cur, step, gap, freq), max_wait)
        nxt = cur + 1
        if nxt < L and (step or nxt in self._forecast):
            p_cross = self._forecast.get(nxt)
            if p_cross is None:
                p_cross = (self._cross[cur, step] / self._cross_total[cur, step, None]).sum(0) / len(step)
            logodds = self._logodds[nxt] + CROSS_WEIGHT * (_logit(p_cross) - self._logit_prior)
            eta[nxt] = 1 + self._waits(logodds, self._max_wait[nxt])
        return eta

    def _row(self, layer: int, cond: Sequence[int], gap: np.ndarray, freq: np.ndarray) -> np.ndarray:
        """Log-odds that each expert of `layer` is used at its next chance, given the experts `cond`
        used at the layer's latest token, the tokens since each expert's use and their usage rates."""
        lp = self._logit_prior
        out = self._recency[gap] + FREQ_WEIGHT * (_logit(freq) - lp)
        if cond:
            p_next = (self._trans[layer, cond] / self._trans_total[layer, cond, None]).sum(0) / len(cond)
            out += TEMPORAL_WEIGHT * (_logit(p_next) - lp)
        return out

    def _long_run_wait(self, uses: np.ndarray, tokens: int) -> np.ndarray:
        rate = (uses + PRIOR_STRENGTH * self._prior) / (tokens + PRIOR_STRENGTH)
        return LONG_RUN_SLACK * self.num_layers * (1 - rate) / rate

    def _waits(self, logodds: np.ndarray, max_wait: np.ndarray) -> np.ndarray:
        # L (1 - q) / q with q = sigmoid(logodds) >= Q_FLOOR, capped by the long-run wait
        wait = self.num_layers * np.minimum(np.exp(-logodds), (1 - Q_FLOOR) / Q_FLOOR)
        return np.minimum(wait, max_wait)


POLICIES = ("default", "lru", "lfu")
_CLASSES = {cls.name: cls for cls in (ForecastPolicy, LRUPolicy, LFUPolicy)}


def make_policy(name: str, num_layers: int, num_experts: int, top_k: int) -> Policy:
    """The policy called `name` (one of POLICIES) for a model of this shape."""
    cls = _CLASSES.get(name)
    if cls is None:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
    return cls(num_layers, num_experts, top_k)


class ExpertCache:
    """Maps resident keys to slots 0..capacity-1 and asks the policy what to evict when full."""

    def __init__(self, capacity: int, policy: Policy):
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.policy = policy
        self.hits = 0
        self.accesses = 0
        self._slots: dict[Key, int] = {}
        self._free = list(range(capacity - 1, -1, -1))  # popped from the end: slot 0 first

    def lookup(self, key: Key) -> int | None:
        """The slot holding `key`, or None on a miss; counts the access and tells the policy."""
        slot = self._slots.get(key)
        hit = slot is not None
        self.accesses += 1
        self.hits += hit
        self.policy.access(key, hit)
        return slot

    def admit(self, key: Key, pinned: Collection[Key] = ()) -> tuple[int, Key | None] | None:
        """Give `key` a slot: (slot, evicted key or None) for the caller to fill, or None when the
        policy declines or every resident key is pinned. Free slots are used first."""
        if key in self._slots:
            raise ValueError(f"expert {key} is already cached")
        if self._free:
            slot = self._free.pop()
            self._slots[key] = slot
            return slot, None
        candidates = [k for k in self._slots if k not in pinned] if pinned else list(self._slots)
        if not candidates:
            return None
        evicted = self.policy.victim(candidates, key)
        if evicted is None:
            return None
        slot = self._slots.pop(evicted)
        self._slots[key] = slot
        return slot, evicted

    def adopt(self, key: Key, slot: int, pinned: Collection[Key] = ()) -> tuple[int, Key | None] | None:
        """Admit `key` already held in `slot`, a slot outside the cache: (the slot the cache gives up in exchange,
        evicted key or None), or None as admit declines."""
        got = self.admit(key, pinned)
        if got is not None:
            self._slots[key] = slot
        return got

    def remove(self, key: Key) -> None:
        """Forget `key` (e.g. its read failed) and free its slot."""
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._free.append(slot)

    def contains(self, key: Key) -> bool:
        return key in self._slots

    def slot_of(self, key: Key) -> int | None:
        return self._slots.get(key)

    def resident(self) -> list[Key]:
        return list(self._slots)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0
