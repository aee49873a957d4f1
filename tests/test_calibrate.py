"""Per-layer thresholds of approximate decoding, and `calibrate`, which measures them on text."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import edgerun
from edgerun.calibrate import Score, calibrate, climb, layer_groups, loss, pick, score
from edgerun.cli import main
from edgerun.commands.run import layer_weights, layer_weights_text
from edgerun.errors import EdgerunError
from edgerun.runtime.offload import OffloadedExperts
from edgerun.store.convert import convert
from edgerun.store.store import ExpertStore
from edgerun.synthetic import mixtral_config, write_random_mixtral
from test_offload import budget_for

IDS = [int(i) for i in np.random.default_rng(7).integers(3, 128, size=40)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A q4 store of a tiny Mixtral with 4 MoE layers x 8 experts."""
    base = tmp_path_factory.mktemp("calibrate")
    src = write_random_mixtral(base / "hf", mixtral_config(64, 4, 8, 96, heads=4, kv_heads=2))
    convert(src, base / "q4", quant="q4", progress=False)
    return base / "q4"


def offloaded(store, slots: int, **kwargs) -> edgerun.Model:
    model = edgerun.load(store, context_length=24)
    model.use_experts(OffloadedExperts(ExpertStore(store), model.spec.activation, slots,
                                       **{"prefetch": False, **kwargs})).close()
    return model


def test_thresholds_apply_to_their_own_layer(store):
    model = offloaded(store, 4, substitute_below=[0.0, 0.999, 0.0, 0.0])
    experts = model.experts
    real, seen = experts._substitute, []

    def recorded(pos, chosen, probs):
        seen.append(pos)
        return real(pos, chosen, probs)
    experts._substitute = recorded
    model.logits(IDS[:20], decode=True)
    assert seen and set(seen) == {1}  # misses of the other layers were read
    s = model.stats()
    assert s["substituted_experts"] > 0 and s["substitute_below"] == [0.0, 0.999, 0.0, 0.0]
    # one value for every layer is reported as one number; the same value per layer is the same setting
    assert experts.variant(substitute_below=[0.3] * 4).substitute_below == 0.3
    experts.speculate = False  # a variant keeps the read-ahead's settings, speculative reads included
    assert experts.variant(skip_below=0.2).speculate is False
    with pytest.raises(ValueError, match="has 3 values"):
        experts.variant(skip_below=[0.1, 0.2, 0.3])
    with pytest.raises(EdgerunError, match="substitute_below has 3 values; .* has 4 MoE layers"):
        edgerun.load(store, substitute_below=[0.1, 0.2, 0.3])
    with pytest.raises(EdgerunError, match="skip_below must be a routing weight"):
        edgerun.load(store, skip_below=[0.1, 1.5, 0.1, 0.1])


def test_per_layer_weights_on_the_command_line():
    assert layer_weights("0.3") == 0.3
    assert layer_weights("0.2,0.5x3") == [0.2, 0.5, 0.5, 0.5]
    assert layer_weights("0x2, 0.25") == [0.0, 0.0, 0.25]
    assert layer_weights_text([0.2, 0.5, 0.5, 0.5, 0.0]) == "0.2,0.5x3,0"
    assert layer_weights(layer_weights_text([0.0] * 8 + [0.5] * 24)) == [0.0] * 8 + [0.5] * 24
    for bad in ("x", "0.5x0", "0.5xx2", "1.5", "0.2,,0.3"):
        with pytest.raises(Exception, match="weight"):
            layer_weights(bad)


def test_score_is_the_perplexity_of_every_token_once(store):
    model = offloaded(store, 32)  # every expert in memory: decoding is exact
    want_nll = 0.0
    per = model.context_length - 2  # a bos, and a place left in the cache
    for start in range(0, len(IDS), per):
        window = [1] + IDS[start:start + per]
        logits = model.logits(window).astype(np.float64)[:-1]
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        want_nll -= sum(logp[i, t] for i, t in enumerate(window[1:]))
    s = score(model, IDS, bos=1)
    assert s.tokens == len(IDS)
    assert s.perplexity == pytest.approx(math.exp(want_nll / len(IDS)), rel=2e-3)  # decode steps: int8 input
    assert s.bytes_per_token == 0 and s.substituted_rate == 0
    assert score(model, IDS).tokens == len(IDS) - 1  # without a bos the first token is only context
    resident = edgerun.load(store, context_length=24)  # no offloading: the same perplexity, nothing read
    assert score(resident, IDS, bos=1).perplexity == pytest.approx(s.perplexity, rel=1e-6)


def test_score_counts_the_bytes_a_setting_needs_without_speculative_reads(store, monkeypatch):
    from edgerun.runtime import offload

    monkeypatch.setattr(offload, "SPECULATE_PRECISION", 0.0)  # read ahead whatever the routers forecast
    model = offloaded(store, 4, prefetch=True)
    experts, reads = model.experts, []
    read_ahead = experts._read_ahead
    monkeypatch.setattr(experts, "_read_ahead", lambda key, low=False: reads.append(key) or read_ahead(key, low))
    s = score(model, IDS, bos=1)
    assert s.bytes_per_token > 0 and not reads and experts.speculate
    for start in range(0, len(IDS), 20):
        model.logits([1] + IDS[start:start + 20], decode=True)
    assert reads  # outside scoring the cache's declined forecasts are read ahead


def test_pick_saves_the_most_bytes_within_the_budget():
    trials = {(0, 0.3): (0.004, 10.0), (0, 0.5): (0.03, 40.0),
              (1, 0.3): (0.002, 8.0), (1, 0.5): (0.006, 30.0),
              (2, 0.3): (-0.001, 5.0), (2, 0.5): (0.009, 12.0)}
    assert pick(trials, 3, 0.01) == (0.3, 0.5, 0.3)  # 45 bytes for 1.0%; (0, 0.5, 0.5) is 1.5%
    assert pick(trials, 3, 0.01, exclude=[(0.3, 0.5, 0.3)]) == (0.3, 0.5, 0.0)  # 40 bytes, next best
    assert pick(trials, 3, 0.0) == (0.0, 0.0, 0.3)  # a loss measured below 0 costs nothing
    assert layer_groups(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]


def test_a_loss_that_few_tokens_carry_counts_with_its_uncertainty():
    def scored(nll):
        nll = np.asarray(nll, dtype=np.float64)
        return Score(math.exp(nll.mean()), len(nll), 0.0, 0.0, 0.0, 0.0, nll=nll)
    exact = scored([1.0, 2.0, 1.0, 3.0])
    few = scored([1.0, 2.0, 1.0, 3.4])  # one token 0.4 worse: differences 0, 0, 0, 0.4 (mean 0.1, error 0.1)
    many = scored([1.1, 2.1, 1.1, 3.1])  # every token 0.1 worse: the same perplexity, no spread
    assert loss(few, exact) == pytest.approx(few.perplexity / exact.perplexity - 1) == pytest.approx(math.exp(0.1) - 1)
    assert loss(few, exact, margin=1.0) == pytest.approx(math.exp(0.2) - 1)
    assert loss(many, exact, margin=1.0) == pytest.approx(math.exp(0.1) - 1)


def test_a_pick_that_costs_less_together_climbs_while_the_whole_stays_within_the_budget():
    def scored(worse: float, read: float) -> Score:  # every token `worse` nats worse: no spread, the loss is exact
        nll = np.full(50, 2.0 + worse)
        return Score(math.exp(nll.mean()), len(nll), read, 0.0, 0.0, 0.0, nll=nll)
    exact = scored(0.0, 100.0)
    # measured alone: group 0 saves more at each rung than group 1, whose 0.75 is over the budget alone
    trials = {(0, 0.3): (0.002, 10.0), (0, 0.5): (0.004, 30.0), (0, 0.75): (0.008, 50.0),
              (1, 0.3): (0.001, 5.0), (1, 0.5): (0.003, 8.0), (1, 0.75): (0.02, 20.0)}
    together = {(0.3, 0.3): (0.002, 85.0), (0.5, 0.3): (0.003, 70.0), (0.75, 0.3): (0.0125, 55.0),
                (0.5, 0.5): (0.005, 66.0)}  # the loss in nats and the bytes read, scored as a whole
    asked = []

    def run(chosen):
        asked.append(chosen)
        return scored(*together[chosen])
    chosen, s = climb(trials, (0.3, 0.3), scored(*together[0.3, 0.3]), run, exact, 0.01)
    # group 0 up to 0.5 (kept), then to 0.75 (over the budget: refused, and group 0 stays), then group 1 up to 0.5;
    # group 1's 0.75 is never tried: over the budget alone
    assert asked == [(0.5, 0.3), (0.75, 0.3), (0.5, 0.5)]
    assert chosen == (0.5, 0.5) and s.bytes_per_token == 66.0
    assert loss(s, exact) <= 0.01
    # a step that reads no fewer bytes is not kept, and `steps` bounds what is scored
    together[0.5, 0.3] = (0.003, 90.0)
    asked.clear()
    assert climb(trials, (0.3, 0.3), scored(*together[0.3, 0.3]), run, exact, 0.01, steps=1)[0] == (0.3, 0.3)
    assert asked == [(0.5, 0.3)]


def test_calibrate_keeps_what_it_measures_within_the_budget(store):
    model = offloaded(store, 6)
    c = calibrate(model, IDS, max_loss=0.05, groups=2, ladder=(0.3, 0.999), bos=1)
    assert c.groups == [[0, 1], [2, 3]] and len(c.thresholds) == 4
    assert c.thresholds[0] == c.thresholds[1] and c.thresholds[2] == c.thresholds[3]
    assert c.exact.substituted_rate == 0 and c.calibrated.perplexity / c.exact.perplexity - 1 <= 0.05
    assert {r["group"] for r in c.trials} <= {0, 1} and c.trials
    if any(c.thresholds):
        assert c.calibrated.substituted_rate > 0 and c.calibrated.bytes_per_token < c.exact.bytes_per_token
    # what it reports is what decoding with its thresholds gives
    again = offloaded(store, 6, substitute_below=c.thresholds)
    assert score(again, IDS, bos=1).perplexity == pytest.approx(c.calibrated.perplexity, rel=1e-6)
    assert isinstance(model.experts, OffloadedExperts) and model.experts.substitute_below == 0.0  # put back
    # a budget no loss fits: exact
    tight = calibrate(model, IDS, max_loss=1e-9, groups=4, ladder=(0.999,), bos=1)
    assert tight.calibrated.perplexity <= tight.exact.perplexity * (1 + 1e-9)
    with pytest.raises(EdgerunError, match="nothing to calibrate"):
        calibrate(edgerun.load(store), IDS)


def test_calibrate_on_the_command_line(store, tmp_path, capsys, monkeypatch):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    budget = budget_for(store, 6, monkeypatch)
    args = ["calibrate", str(store), "--ram", str(budget), "--text", str(text), "--tokens", "24", "--ctx", "16",
            "--groups", "2", "--max-loss", "50"]
    assert main(args) == 0
    out = capsys.readouterr()
    slots = int(re.search(r"(\d+) of 32 experts in RAM under this budget", out.err).group(1))
    assert slots < 32 and "exact: perplexity" in out.err and "layers 0-1 below 0.2" in out.err
    line = out.out.splitlines()[0]
    assert line.startswith("--substitute-below ") and len(layer_weights(line.split()[1])) == 4
    for bad, message in ((["--max-loss", "150"], "between 0 and 100"), (["--groups", "9"], "at most 8 groups"),
                         (["--text", str(tmp_path / "none.txt")], "cannot read the text")):
        assert main(args + bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert main(["calibrate", str(store), "--ram", "64GB", "--text", str(text)]) == 2
    assert "nothing to calibrate" in capsys.readouterr().err
