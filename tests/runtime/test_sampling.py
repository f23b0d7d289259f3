"""Sampling: pure functions over a logits vector, checked by exact probabilities and by many seeded draws."""

import numpy as np
import pytest
from smolexport_runtime.sampling import SamplingConfig, greedy, make_sampler, probabilities, sample

LOGITS = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15], dtype=np.float64))


def test_greedy_is_argmax():
    assert greedy(LOGITS) == 1
    assert make_sampler(SamplingConfig())(LOGITS) == 1
    assert make_sampler(SamplingConfig(temperature=0.9, greedy=True))(LOGITS) == 1


def test_probabilities_without_filters_are_softmax():
    np.testing.assert_allclose(probabilities(LOGITS), [0.05, 0.4, 0.1, 0.3, 0.15])


def test_top_k_keeps_the_k_best_renormalised():
    probs = probabilities(LOGITS, top_k=2)
    np.testing.assert_allclose(probs, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0])


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    # Sorted: 0.4, 0.3 (0.7), 0.15 (0.85), ... top_p=0.8 needs the first three.
    probs = probabilities(LOGITS, top_p=0.8)
    np.testing.assert_allclose(probs, [0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85])
    # A single dominant token is always kept even when p is tiny.
    assert np.count_nonzero(probabilities(LOGITS, top_p=0.01)) == 1


def test_temperature_sharpens_and_flattens():
    cold, hot = probabilities(LOGITS, temperature=0.5), probabilities(LOGITS, temperature=2.0)
    assert cold[1] > 0.4 > hot[1]


@pytest.mark.parametrize(("top_k", "top_p", "allowed"), [(2, 1.0, {1, 3}), (0, 0.8, {1, 3, 4}), (3, 0.6, {1, 3})])
def test_tokens_outside_the_filter_are_never_sampled(top_k, top_p, allowed):
    config = SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p)
    rng = np.random.default_rng(0)
    draws = [sample(LOGITS, config, rng) for _ in range(3000)]
    assert set(draws) == allowed
    # And the kept ones come out in proportion to their renormalised probability.
    probs = probabilities(LOGITS, 1.0, top_k, top_p)
    freq = np.bincount(draws, minlength=LOGITS.size) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.04)


def test_same_seed_same_draws_other_seed_differs():
    config = SamplingConfig(temperature=1.0, seed=7)
    logits = np.zeros(1000)
    a, b = make_sampler(config), make_sampler(config)
    run_a, run_b = [a(logits) for _ in range(20)], [b(logits) for _ in range(20)]
    assert run_a == run_b
    other = make_sampler(SamplingConfig(temperature=1.0, seed=8))
    assert [other(logits) for _ in range(20)] != run_a


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_invalid_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)
