"""Per-layer thresholds of approximate decoding, measured on text: what replacing the light experts that miss
costs in each group of MoE layers, and the thresholds that read the fewest bytes within a perplexity budget.

A model's layers differ in how much of their experts' output a token can spare: on the demo model, replacing every
light miss (weight below 0.5) of the first MoE layer costs 5% perplexity and of any later one 0.2-0.3%. One
threshold for all layers is held back by the most sensitive. `calibrate` scores the text decoded one token at a
time (as generation computes it, in the RAM budget the model was loaded with): exactly, then with each group of
consecutive layers replacing its light misses below each threshold of a ladder while the others stay exact, and
picks a threshold per group that saves the most bytes for a sum of losses within the budget. Each group's loss is
counted with one standard error of its per-token differences added: a setting that changes few tokens a lot is
measured with less certainty than one that changes many a little (on the demo model, a pick that replaced misses
below 0.75 in its last layer measured +0.67% on 2048 calibration tokens and cost +1.9% on 4096 others, counted
without it). The pick is then scored as a whole: losses add up to more than their sum when several groups replace
experts (on the demo model, +1.44% together for a sum of +0.94%), so a pick whose perplexity is over the budget is
refused, and the next is sought within a smaller sum. They can also add up to less (on the larger model at a 50%
budget, +0.12% together for a sum of bounds of +0.96%): a pick within the budget then climbs, one group one rung up
the ladder at a time, the group that saves the most bytes alone first, keeping each step whose loss together, with
its standard error, stays within the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import ArgumentError
from .units import format_size

LADDER = (0.2, 0.3, 0.4, 0.5, 0.75, 0.99)  # thresholds tried in each group (0.99: nearly every miss)
VERIFY = 5  # picks scored as a whole before giving up on the budget
MARGIN = 1.0  # standard errors of a measured loss counted against the budget
SHRINK = 0.7  # after a pick over the budget as a whole, the next keeps its summed losses within this much less
CLIMB = 8  # steps up the ladder scored as a whole after a pick within the budget


@dataclass
class Score:
    """Text decoded one token at a time with one container of experts."""
    perplexity: float
    tokens: int
    bytes_per_token: float  # read from the store while decoding
    substituted_rate: float  # of the decoded experts: replaced by experts in memory
    skipped_rate: float  # left out
    low_served_rate: float  # served by low-bit copies
    nll: np.ndarray = field(repr=False, default=None)  # float64 [tokens]: each scored token's negative log-likelihood

    def summary(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "nll"}


def loss(s: Score, exact: Score, margin: float = 0.0) -> float:
    """How much higher s's perplexity is than exact's on the same tokens (0.01: 1%), plus `margin` standard errors
    of the mean of the per-token differences: a bound that noisy settings (few tokens changed a lot) pay for."""
    d = s.nll - exact.nll
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return math.exp(float(d.mean()) + margin * se) - 1


@dataclass
class Calibration:
    thresholds: list[float]  # substitute_below for each MoE layer
    groups: list[list[int]]  # MoE layer positions, by group
    exact: Score
    calibrated: Score
    max_loss: float
    trials: list[dict] = field(default_factory=list)  # every group and threshold scored alone

    @property
    def loss(self) -> float:
        return loss(self.calibrated, self.exact)


def score(model, ids: Sequence[int], bos: int | None = None) -> Score:
    """Perplexity of ids under model, each token decoded in its turn (`Model.logits(..., decode=True)`), in windows
    of the model's context (each starting with bos when given; every token of ids is scored once)."""
    per = model.context_length - 1 - (bos is not None)  # a prompt leaves one place in the cache
    if per < 2:
        raise ArgumentError(f"a context of {model.context_length} tokens is too short to score text")
    # the bytes a setting reads are those it needs: no speculative reads (they take disk time that would go unused)
    host = getattr(model.experts, "host", model.experts)  # a device tier's RAM tier
    speculate = getattr(host, "speculate", False)
    if speculate:
        host.speculate = False
    try:
        return _score(model, ids, bos, per)
    finally:
        if speculate:
            host.speculate = True


def _score(model, ids: Sequence[int], bos: int | None, per: int) -> Score:
    nll, read, uses = [], 0, 0
    counts = np.zeros(3)  # experts replaced, left out, served by copies
    step = per - 1 if bos is None else per
    for start in range(0, len(ids) - (1 if bos is None else 0), step):
        window = ([bos] if bos is not None else []) + list(ids[start:start + per])
        if len(window) < 2:
            break
        logits = model.logits(window, decode=True)[:-1].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits - top).sum(-1, keepdims=True)) - top
        target = np.asarray(window[1:])
        nll.append(-logp[np.arange(len(target)), target])
        s = model.stats()  # of this window's decode steps (a model without offloading reads and replaces nothing)
        read += s.get("decode_bytes_read", 0)
        uses += (len(window) - 1) * len(model.spec.moe_layers) * model.spec.top_k  # a decode step per target
        counts += (s.get("substituted_experts", 0), s.get("skipped_experts", 0), s.get("low_served", 0))
    if not nll:
        raise ArgumentError("the text is too short to score: give at least two tokens")
    nll = np.concatenate(nll)
    return Score(math.exp(nll.mean()), len(nll), read / len(nll), *(counts / max(1, uses)), nll=nll)


def _scored(measured: float, bound: float, s: Score) -> str:
    """How a setting scored, as calibration reports each one."""
    return f"{measured:+.2%} perplexity (at most {bound:+.2%}), {format_size(s.bytes_per_token)} read per token"


def _layers(part: list[int]) -> str:
    return f"layer {part[0]}" if len(part) == 1 else f"layers {part[0]}-{part[-1]}"


def layer_groups(layers: int, groups: int) -> list[list[int]]:
    """MoE layer positions split into `groups` runs of consecutive layers, as even as they go."""
    if not 1 <= groups <= layers:
        raise ArgumentError(f"groups must be from 1 to the model's {layers} MoE layers, got {groups}")
    return [list(map(int, g)) for g in np.array_split(np.arange(layers), groups)]


def pick(trials: dict[tuple[int, float], tuple[float, float]], groups: int, max_loss: float,
         exclude: Sequence[tuple[float, ...]] = ()) -> tuple[float, ...] | None:
    """The threshold of each group (0: exact) that saves the most bytes with a sum of losses within max_loss.

    trials: (group, threshold) -> (loss, bytes saved per token), each measured alone. Losses below 0 (noise) count
    as 0, and so do savings. Exhaustive over the ladder for up to 8 groups, excluding picks already refused."""
    ladder = sorted({t for _, t in trials})
    options = [[(0.0, 0.0, 0.0)] + [(t, max(0.0, trials[g, t][0]), max(0.0, trials[g, t][1]))
                                     for t in ladder if (g, t) in trials] for g in range(groups)]
    best, best_saved = None, -1.0

    def walk(g: int, chosen: tuple, spent: float, saved: float) -> None:
        nonlocal best, best_saved
        if spent > max_loss:
            return
        if g == groups:
            if saved > best_saved and chosen not in exclude:
                best, best_saved = chosen, saved
            return
        for t, dl, ds in options[g]:
            walk(g + 1, chosen + (t,), spent + dl, saved + ds)
    walk(0, (), 0.0, 0.0)
    return best


def climb(trials: dict[tuple[int, float], tuple[float, float]], chosen: tuple[float, ...], scored: Score,
          run: Callable[[tuple[float, ...]], Score], exact: Score, max_loss: float, margin: float = MARGIN,
          steps: int = CLIMB, log: Callable[[str], None] | None = None) -> tuple[tuple[float, ...], Score]:
    """From a pick of thresholds by group, scored as a whole within the budget, raise one group at a time to its next
    threshold measured alone within the budget (the one that saves the most bytes alone first), scoring each step
    as a whole with `run`; a step is kept if its loss with `margin` standard errors stays within max_loss and it
    reads fewer bytes, else its group stays where it is. At most `steps` are scored. Returns the last kept pick and
    its score."""
    say = log or (lambda text: None)
    groups = len(chosen)
    ladder = sorted({t for _, t in trials})
    held: set[int] = set()  # groups whose next step was refused
    for _ in range(steps):
        options = []
        for g in range(groups):
            up = [t for t in ladder if t > chosen[g] and (g, t) in trials and trials[g, t][0] <= max_loss]
            if g not in held and up:
                here = trials[g, chosen[g]][1] if chosen[g] else 0.0
                options.append((trials[g, up[0]][1] - here, g, up[0]))
        if not options:
            break
        _, g, t = max(options)
        step = chosen[:g] + (t,) + chosen[g + 1:]
        s = run(step)
        bound = loss(s, exact, margin)
        kept = bound <= max_loss and s.bytes_per_token < scored.bytes_per_token
        say(f"climb {', '.join(map(str, step))}: {_scored(loss(s, exact), bound, s)}{'' if kept else ', refused'}")
        if kept:
            chosen, scored = step, s
        else:
            held.add(g)
    return chosen, scored


def calibrate(model, ids: Sequence[int], *, max_loss: float = 0.01, groups: int = 4,
              ladder: Sequence[float] = LADDER, bos: int | None = None, margin: float = MARGIN,
              log: Callable[[str], None] | None = None) -> Calibration:
    """Per-layer substitute_below for a model loaded under a RAM budget (its experts offloaded), from the text ids:
    the thresholds that save the most bytes read per decoded token for at most max_loss (0.01: 1%) more
    perplexity than exact decoding on ids (each group's loss counted with `margin` standard errors, see `loss`)."""
    from .runtime.offload import OffloadedExperts

    base = model.experts
    if not isinstance(base, OffloadedExperts):
        raise ArgumentError("nothing to calibrate: approximate decoding changes only experts that miss, and this "
                            "model's are not offloaded (give a RAM budget below its size: --ram, or ram=; calibrate "
                            "without a GPU tier, gpu=0, and use the thresholds with one)")
    if not 0 < max_loss < 1:
        raise ArgumentError(f"max_loss must be a fraction of perplexity between 0 and 1, got {max_loss!r}")
    if not ladder or any(not 0 < t < 1 for t in ladder):
        raise ArgumentError(f"thresholds must be routing weights between 0 and 1, got {list(ladder)!r}")
    if not 1 <= groups <= 8:
        raise ArgumentError(f"at most 8 groups of layers (and at least 1), got {groups}")
    layers = len(base.layers)
    parts = layer_groups(layers, min(groups, layers))
    say = log or (lambda text: None)

    def spread(chosen: tuple[float, ...]) -> list[float]:  # a threshold per group -> per layer
        return [chosen[g] for g, part in enumerate(parts) for _ in part]

    def run(thresholds: list[float]) -> Score:
        experts = base.variant(substitute_below=thresholds)
        model.use_experts(experts)
        try:
            return score(model, ids, bos)
        finally:
            experts.close()

    try:
        exact = run([0.0] * layers)
        say(f"exact: perplexity {exact.perplexity:.3f}, {format_size(exact.bytes_per_token)} read per token")
        trials, rows = {}, []
        for g, part in enumerate(parts):
            for t in sorted(ladder):
                thresholds = [t if i in part else 0.0 for i in range(layers)]
                s = run(thresholds)
                measured, bound = loss(s, exact), loss(s, exact, margin)
                trials[g, t] = (bound, exact.bytes_per_token - s.bytes_per_token)
                rows.append({"group": g, "layers": part, "threshold": t, "perplexity": s.perplexity,
                             "loss": measured, "bound": bound, "bytes_per_token": s.bytes_per_token,
                             "substituted_rate": s.substituted_rate})
                say(f"{_layers(part)} below {t}: {_scored(measured, bound, s)}")
                if bound > max_loss:
                    break  # higher thresholds of this group cost more still
        refused: list[tuple[float, ...]] = []
        for attempt in range(VERIFY):
            chosen = pick(trials, len(parts), max_loss * SHRINK ** attempt, refused)
            if chosen is None or not any(chosen):
                break
            s = run(spread(chosen))
            measured = loss(s, exact)
            say(f"together {', '.join(map(str, chosen))}: {measured:+.2%} perplexity, "
                f"{format_size(s.bytes_per_token)} read per token")
            if measured <= max_loss:
                chosen, s = climb(trials, chosen, s, lambda c: run(spread(c)), exact, max_loss, margin, log=say)
                return Calibration(spread(chosen), parts, exact, s, max_loss, rows)
            refused.append(chosen)
        return Calibration([0.0] * layers, parts, exact, exact, max_loss, rows)
    finally:
        model.use_experts(base)
