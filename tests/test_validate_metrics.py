"""The perplexity ratio's interval in `smolexport validate`: from the standard error of the mean per-token
log-likelihood difference (the larger of the textbook and the batch-means one)."""

import numpy as np

from smolexport.validate.metrics import compare_logits, nll_difference_stderr


def test_independent_differences_give_the_textbook_standard_error():
    rng = np.random.default_rng(0)
    sigma, n = 0.3, 32 * 400
    errors = [nll_difference_stderr(rng.normal(0.05, sigma, n)) / (sigma / np.sqrt(n)) for _ in range(20)]
    assert 0.9 < np.mean(errors) < 1.1


def test_correlated_differences_widen_the_interval():
    """Tokens' losses come in correlated runs; the per-token spread would claim 4x too narrow an interval for
    runs of 16 equal differences, the batch means do not."""
    rng = np.random.default_rng(1)
    runs = np.repeat(rng.normal(0.0, 0.3, 400), 16)
    naive = runs.std(ddof=1) / np.sqrt(len(runs))
    assert nll_difference_stderr(runs) > 3 * naive


def test_interval_from_logits_contains_the_ratio_and_is_none_when_too_short():
    rng = np.random.default_rng(2)
    n, vocab = 640, 50
    reference = rng.normal(0, 2, (n, vocab))
    targets = rng.integers(0, vocab, n)
    same = compare_logits(reference, reference, targets)
    assert same.ppl_ratio_interval() == (1.0, 1.0)

    export = reference + rng.normal(0, 0.5, (n, vocab))
    c = compare_logits(reference, export, targets)
    ratio = np.exp(c.nll_export - c.nll_reference)
    low, high = c.ppl_ratio_interval()
    assert low < ratio < high and high - low > 0.01
    # the interval holds the ratio of other texts of the same kind: the two halves of this one
    halves = [compare_logits(reference[s], export[s], targets[s]) for s in (slice(0, n // 2), slice(n // 2, n))]
    for half in halves:
        assert low - 0.02 < np.exp(half.nll_export - half.nll_reference) < high + 0.02

    short = compare_logits(reference[:40], export[:40], targets[:40])
    assert short.nll_difference_stderr is None and short.ppl_ratio_interval() is None
