"""The accuracy session's gate arithmetic: perplexity ratio, Wilson lower bound, accuracy recovery."""

import math

import pytest

from harness.accuracy.gates import (
    Z_ONE_SIDED_95,
    accuracy_floor,
    accuracy_gate,
    ppl_floor_gate,
    ppl_gate,
    ratio,
    wilson_lower,
)

Z_TWO_SIDED_95 = 1.959963984540054


def test_wilson_lower_matches_the_published_interval():
    # 50 successes in 100 trials: the two-sided 95 % Wilson score interval is [0.4038, 0.5962]
    # (statsmodels: proportion_confint(50, 100, method="wilson")).
    assert wilson_lower(0.5, 100, Z_TWO_SIDED_95) == pytest.approx(0.4038, abs=1e-4)


def test_wilson_lower_closed_forms():
    # p = 1: the bound reduces to n / (n + z²); p = 0: the bound is 0.
    for n in (1, 10, 500):
        assert wilson_lower(1.0, n) == pytest.approx(n / (n + Z_ONE_SIDED_95**2), rel=1e-12)
        assert wilson_lower(0.0, n) == 0.0


def test_wilson_lower_tightens_with_sample_size():
    bounds = [wilson_lower(0.45, n) for n in (10, 100, 1000, 100_000)]
    assert bounds == sorted(bounds) and bounds[-1] == pytest.approx(0.45, abs=0.003)


@pytest.mark.parametrize(("p", "n", "message"), [(-0.1, 10, "proportion"), (1.1, 10, "proportion"), (0.5, 0, "size")])
def test_wilson_lower_rejects_bad_input(p, n, message):
    with pytest.raises(ValueError, match=message):
        wilson_lower(p, n)


def test_ratio():
    assert ratio(28.0, 27.0) == pytest.approx(1.037037, rel=1e-6)
    assert math.isnan(ratio(0.5, 0.0))


def test_ppl_gate_passes_within_target():
    gate = ppl_gate("wiki_ppl_local", 27.1, 27.0, 1.005)
    assert gate.passed and gate.value == pytest.approx(1.0037, abs=1e-4)


def test_ppl_gate_fails_beyond_target():
    # The case the issue asks for: int8 kernels that saturate in int16 lose ~3 % perplexity, beyond W8A8's 1.03.
    gate = ppl_gate("wiki_ppl_local", 27.04 * 1.06, 27.04, 1.03)
    assert not gate.passed and gate.value == pytest.approx(1.06)


def test_ppl_floor_gate_checks_a_baseline_stays_broken():
    assert ppl_floor_gate("wiki_ppl_local", 27.0 * 5, 27.0, 3.0).passed
    assert not ppl_floor_gate("wiki_ppl_local", 27.0 * 1.2, 27.0, 3.0).passed


def test_accuracy_gate_fails_at_chance_level():
    # Float at 0.46 on 500 SocialIQA items; a broken scheme at chance (1/3) is far below the floor, about 0.40.
    gate = accuracy_gate("siqa_local", 1 / 3, 0.46, 500, 0.95)
    assert not gate.passed
    assert gate.value == pytest.approx(0.7246, abs=1e-4)


def test_accuracy_gate_tolerates_sampling_noise_on_small_samples():
    # 50 items: a 0.40 vs 0.46 difference is well within noise (stderr ~0.07) and must not fail the run ...
    assert accuracy_gate("siqa_local", 0.40, 0.46, 50, 0.95).passed
    # ... while on 5,000 items the same difference is real and fails.
    assert not accuracy_gate("siqa_local", 0.40, 0.46, 5000, 0.95).passed


def test_accuracy_floor_is_the_ratio_for_large_samples():
    assert accuracy_floor(0.88, 10**7, 0.97) == pytest.approx(0.97 * 0.88, abs=1e-3)
    assert accuracy_floor(0.88, 200, 0.97) < 0.97 * 0.88
    assert accuracy_floor(0.99, 10**7, 1.05) == pytest.approx(1.0, abs=1e-3)  # ratio × float clipped to 1
