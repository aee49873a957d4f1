"""Expert cache policies and slot bookkeeping, on short access sequences worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from edgerun.runtime import policy as policy_module
from edgerun.runtime.policy import POLICIES, ExpertCache, ForecastPolicy, make_policy


def run(cache: ExpertCache, keys) -> list:
    """Look every key up and admit it on a miss; the evicted keys (None: free slot, "bypass": declined)."""
    evicted = []
    for key in keys:
        if cache.lookup(key) is None:
            got = cache.admit(key)
            evicted.append("bypass" if got is None else got[1])
    return evicted


A, B, C, D = (0, 0), (0, 1), (0, 2), (0, 3)


def test_make_policy_names():
    assert set(POLICIES) == {"lru", "lfu", "default"}
    for name in POLICIES:
        assert make_policy(name, 4, 8, 2).name == name
    with pytest.raises(ValueError, match="unknown cache policy 'fifo'; choose one of default, lru, lfu"):
        make_policy("fifo", 4, 8, 2)


def test_lru_evicts_least_recently_used():
    cache = ExpertCache(2, make_policy("lru", 1, 4, 1))
    # A B fill; A hits; C evicts B (A was used more recently); B evicts A; C hits
    assert run(cache, [A, B, A, C, B, C]) == [None, None, B, A]
    assert (cache.hits, cache.accesses) == (2, 6)
    assert cache.hit_rate == pytest.approx(2 / 6)
    assert sorted(cache.resident()) == [B, C]


def test_lfu_evicts_least_frequently_used():
    cache = ExpertCache(2, make_policy("lfu", 1, 4, 1))
    # A twice, B once: C evicts B; B has now been accessed twice, C once: B evicts C
    assert run(cache, [A, A, B, C, B]) == [None, None, B, C]
    assert cache.hits == 1
    # equal counts: the least recently accessed goes
    cache = ExpertCache(2, make_policy("lfu", 1, 4, 1))
    assert run(cache, [A, B, C]) == [None, None, A]


def test_free_slots_first_then_eviction_reuses_the_slot():
    cache = ExpertCache(3, make_policy("lru", 1, 4, 1))
    assert [cache.admit(k) for k in (A, B, C)] == [(0, None), (1, None), (2, None)]
    for key in (B, C, A):
        cache.lookup(key)
    assert cache.admit(D) == (1, B)  # B is least recent; D takes over its slot
    assert cache.contains(D) and not cache.contains(B)
    assert cache.slot_of(D) == 1 and cache.slot_of(B) is None
    with pytest.raises(ValueError, match="already cached"):
        cache.admit(D)


def test_pinned_keys_are_never_evicted():
    cache = ExpertCache(2, make_policy("lru", 1, 4, 1))
    cache.admit(A)
    cache.admit(B)
    cache.lookup(B)  # A is now least recently used, but pinned
    assert cache.admit(C, pinned=[A, C]) == (1, B)
    assert cache.admit(D, pinned=[A, C]) is None
    assert sorted(cache.resident()) == [A, C]


def test_remove_frees_the_slot():
    cache = ExpertCache(2, make_policy("lru", 1, 4, 1))
    cache.admit(A)
    cache.admit(B)
    cache.remove(A)
    cache.remove(D)  # not resident: nothing happens
    assert not cache.contains(A) and cache.resident() == [B]
    assert cache.admit(C) == (0, None)


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        ExpertCache(0, make_policy("lru", 1, 4, 1))


def fresh_after_layer_1() -> ForecastPolicy:
    # 4 layers of 4 experts, top-1; the first token has just passed layer 1, which used expert 3
    policy = make_policy("default", 4, 4, 1)
    policy.access((1, 3), False)
    policy.observe(1, [3])
    return policy


def test_forecast_prefers_evicting_what_comes_back_last():
    policy = fresh_after_layer_1()
    eta = policy.expected_next_use()
    # layers 2, 3, 0 have seen nothing (equal statistics): they come back 1, 2, 3 steps ahead
    assert eta[2, 0] < eta[3, 0] < eta[0, 0]
    assert eta[2, 0] == pytest.approx(1 + 4 * 3) and eta[0, 0] == pytest.approx(3 + 4 * 3)  # q = prior 1/4
    # layer 1 was just used, so its experts come back last; the expert it did not pick the very last
    assert eta[1, 0] > eta[0, 0] and eta[1, 0] > eta[1, 3]
    assert policy.victim([(2, 0), (3, 0), (0, 0)], (1, 3)) == (0, 0)
    assert policy.victim([(2, 0), (1, 0), (0, 0)], (1, 3)) == (1, 0)


def test_protected_layers_keep_their_experts():
    policy = fresh_after_layer_1()
    # layer 0 comes back last of layers 2, 3, 0: it is evicted first ...
    assert policy.victim([(2, 0), (3, 0), (0, 0)], (2, 1)) == (0, 0)
    policy.protect(1)  # ... unless its experts are protected: then the next latest goes
    assert policy.victim([(2, 0), (3, 0), (0, 0)], (2, 1)) == (3, 0)
    policy.protect(0)
    assert policy.victim([(2, 0), (3, 0), (0, 0)], (2, 1)) == (0, 0)
    policy.protect(99)  # every layer: as if none
    assert policy.victim([(2, 0), (3, 0), (0, 0)], (2, 1)) == (0, 0)
    for name in ("lru", "lfu"):  # a hint the other policies may ignore
        make_policy(name, 4, 4, 1).protect(2)


@pytest.fixture
def uncapped(monkeypatch):
    """Take the long-run cap on waits out of the way (it is tested on its own) so that a single token's
    evidence shows."""
    monkeypatch.setattr(policy_module, "LONG_RUN_SLACK", 1e9)


def test_forecast_bypasses_a_key_needed_later_than_every_resident(uncapped):
    policy = fresh_after_layer_1()
    policy.access((1, 2), False)  # the next token at layer 1 misses expert 2
    # the next layer's expert is due in 1 step; expert 2 of layer 1 not before the next token
    assert policy.victim([(2, 0)], (1, 2)) is None
    assert policy.victim([(2, 0), (1, 0)], (1, 2)) == (1, 0)  # (1, 0) was idle: it goes instead
    cache = ExpertCache(1, make_policy("default", 4, 4, 1))
    assert run(cache, [(2, 0), (1, 2)]) == [None, "bypass"]
    assert cache.resident() == [(2, 0)]


def test_forecast_uses_the_router_prediction_for_the_next_layer(uncapped):
    policy = fresh_after_layer_1()
    eta = policy.expected_next_use()
    assert eta[2, 0] == pytest.approx(eta[2, 1])
    with pytest.raises(ValueError, match="expected 4 expert probabilities for layer 2"):
        policy.predict(2, [0.5, 0.5])
    policy.predict(2, [0.9, 0.2, 0.3, 0.25])
    eta = policy.expected_next_use()
    assert eta[2, 0] < eta[2, 2] < eta[2, 3] < eta[2, 1]
    assert eta[2, 3] == pytest.approx(1 + 4 * 3)  # the prior itself changes nothing
    policy.access((2, 0), False)
    policy.observe(2, [0])  # the prediction is used up once layer 2 has run
    eta = policy.expected_next_use()
    assert eta[2, 1] == pytest.approx(eta[2, 2])


def test_forecast_wait_is_capped_by_the_long_run_rate():
    # expert 0 ran for 30 tokens, then expert 1 for 10: the context says 0 is unlikely next, but it
    # is still the most used expert overall, so its wait is at most LONG_RUN_SLACK times what its share implies
    policy = make_policy("default", 1, 4, 1)
    for t in range(40):
        expert = 0 if t < 30 else 1
        policy.access((0, expert), False)
        policy.observe(0, [expert])
    share = (30 + 1) / (40 + 4)  # with the prior's pseudo-counts
    eta = policy.expected_next_use()
    assert eta[0, 0] == pytest.approx(1 + policy_module.LONG_RUN_SLACK * (1 - share) / share)
    assert eta[0, 2] > eta[0, 0]


def test_forecast_learns_that_experts_alternate():
    # one layer whose expert alternates 0, 1, 0, 1, ...: the one just used is not needed next
    policy = make_policy("default", 1, 4, 1)
    for t in range(40):
        policy.access((0, t % 2), False)
        policy.observe(0, [t % 2])
    eta = policy.expected_next_use()
    assert eta[0, 0] < eta[0, 1] < eta[0, 2]  # last token used expert 1; expert 2 never
    cache = ExpertCache(1, make_policy("default", 1, 4, 1))
    lru = ExpertCache(1, make_policy("lru", 1, 4, 1))
    for t in range(40):
        for c in (cache, lru):
            if c.lookup((0, t % 2)) is None:
                c.admit((0, t % 2))
            c.policy.observe(0, [t % 2])
    assert lru.hits == 0 and cache.hits >= 15  # holds one expert across the other's tokens


def test_forecast_policy_kernels_match_its_numpy_code(monkeypatch):
    """The kernels that compute observe's counts and the expected next uses give what the policy's NumPy code
    gives, decision by decision, on a random run of accesses, forecasts, evictions and observations."""
    from edgerun import native

    if native.BACKEND != "numba":
        pytest.skip("the numba kernels are off")
    L, E, K = 5, 8, 2

    def run_policy(seed: int) -> list:
        rng = np.random.default_rng(seed)
        policy, out = ForecastPolicy(L, E, K), []
        for _ in range(25):
            for layer in range(L):
                used = rng.choice(E, K, replace=False).tolist()
                for e in used:
                    policy.access((layer, e), bool(rng.random() < 0.5))
                if layer + 1 < L and rng.random() < 0.5:
                    policy.predict(layer + 1, rng.dirichlet(np.ones(E)).tolist())
                out.append(policy.expected_next_use())
                resident = [(int(k) // E, int(k) % E) for k in rng.choice(L * E, 12, replace=False)]
                out.append(policy.victim(resident, (layer, int(rng.integers(E)))))
                policy.observe(layer, used)
        return out

    fast = run_policy(3)
    monkeypatch.setattr(native, "policy", lambda *args: False)
    slow = run_policy(3)
    victims = [(a, b) for a, b in zip(fast, slow) if not isinstance(a, np.ndarray)]
    assert sum(a is not None for a, _ in victims) > 10  # evictions were chosen, not only declined
    for a, b in zip(fast, slow):
        if isinstance(a, np.ndarray):
            np.testing.assert_allclose(a, b, rtol=1e-12)
        else:
            assert a == b


def test_forecast_victims_between_accesses_are_those_of_a_policy_that_computes_every_one_afresh():
    """victim keeps its expected next uses until an access, observe, forecast of the next layer or protection
    changes them: on a random run of all of those, with several admissions between them, it picks what a policy
    recomputing them for every admission picks."""
    L, E, K = 6, 8, 2

    def run_policy(seed: int, afresh: bool) -> list:
        rng = np.random.default_rng(seed)
        policy, out = ForecastPolicy(L, E, K), []
        def admissions(layer: int, rounds: int) -> None:
            for _ in range(rounds):
                for j in range(layer + 1, min(L, layer + 4)):  # the read-ahead's
                    if rng.random() < 0.5:
                        policy.predict(j, rng.dirichlet(np.ones(E)).tolist())
                    if rng.random() < 0.2:
                        policy.protect(int(rng.integers(3)))
                    resident = [(int(k) // E, int(k) % E) for k in rng.choice(L * E, 14, replace=False)]
                    if afresh:
                        policy._eta = None
                    out.append(policy.victim(resident, (j % L, int(rng.integers(E)))))

        for _ in range(20):
            for layer in range(L):
                used = rng.choice(E, K, replace=False).tolist()
                for e in used:
                    policy.access((layer, e), bool(rng.random() < 0.5))
                    admissions(layer, 2)
                policy.observe(layer, used)
                admissions(layer - 1, 1)  # after the layer is observed, before the next one's accesses
        return out

    cached, afresh = run_policy(5, False), run_policy(5, True)
    assert sum(v is not None for v in cached) > 100 and sum(v is None for v in cached) > 10  # both kinds of answer
    assert cached == afresh


def test_forecast_policy_refuses_keys_outside_its_shape():
    """The kernels index without bounds checks: a key outside the policy's layers and experts is refused first."""
    policy = ForecastPolicy(3, 4, 2)
    with pytest.raises(ValueError, match=r"no key \(0, 4\) in a policy of 3 layers x 4 experts"):
        policy.access((0, 4), False)
    with pytest.raises(ValueError, match=r"layer 3 experts \[1\] are not all in a policy of 3 layers x 4 experts"):
        policy.observe(3, [1])
    with pytest.raises(ValueError, match="are not all in"):
        policy.observe(0, [1, -1])
    policy.observe(0, [1, 3])
