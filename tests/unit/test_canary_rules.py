"""Canary analysis rules: the per-variant figures, the statistics behind them, and each rollback rule at its edges.

Every rule needs an effect beyond its limit *and* evidence that the effect is not
sampling noise; the tests below pin both halves, and the boundaries in between.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from monitoring.canary import (
    Breach,
    CanaryComparison,
    VariantStats,
    chi2_quantile,
    psi,
    binomial_tail,
    rate_increase_is_significant,
)
from service.serving.deploy import RollbackRules

EDGES = [0.25, 0.5, 0.75]
"""Four score buckets: (-inf, 0.25], (0.25, 0.5], (0.5, 0.75], (0.75, inf)."""


def feed(stats: VariantStats, requests: int, *, errors: int = 0, fallbacks: int = 0, instances: int = 1,
         seconds: float = 0.001, scores: list[float] | None = None) -> None:
    """Record ``requests`` requests: the first ``errors`` errored, the first ``fallbacks`` had one fallback
    instance, and request ``i`` scored ``scores[i]`` (requests past the scores have none)."""
    scores = scores or []
    for i in range(requests):
        score = np.array([scores[i]]) if i < len(scores) else None
        stats.record(seconds, instances, int(i < fallbacks), i < errors, score)


def labels(stats: VariantStats, labelled: int, misses: int) -> None:
    for i in range(labelled):
        stats.record_feedback(missed=i < misses)


def comparison(edges: list[float] = EDGES) -> CanaryComparison:
    return CanaryComparison("m", "1", "2", edges)


def scores_for(counts: list[int], edges: list[float] = EDGES) -> list[float]:
    """Scores that fill the buckets of ``edges`` with ``counts`` (one score inside each bucket)."""
    inner = [edges[0] - 0.1] + [(lo + hi) / 2 for lo, hi in zip(edges, edges[1:])] + [edges[-1] + 0.1]
    return [value for value, count in zip(inner, counts) for _ in range(count)]


# ---------------------------------------------------------------------- VariantStats


def test_a_variant_without_requests_reports_zero_for_every_figure() -> None:
    assert VariantStats(np.array(EDGES)).figures() == {
        "requests": 0.0, "error_rate": 0.0, "fallback_rate": 0.0, "p95_latency_seconds": 0.0,
        "labelled": 0.0, "miss_rate": 0.0,
    }


def test_errors_are_per_request_and_fallbacks_per_instance_summed_over_requests() -> None:
    stats = VariantStats(np.array(EDGES))
    stats.record(0.1, 4, 1, False, None)
    stats.record(0.3, 6, 4, True, None)
    figures = stats.figures()
    assert (stats.requests, stats.instances, stats.fallbacks, stats.errors) == (2, 10, 5, 1)
    assert figures["requests"] == 2.0
    assert figures["error_rate"] == 0.5
    assert figures["fallback_rate"] == 0.5
    assert figures["p95_latency_seconds"] == pytest.approx(0.29)  # linear interpolation between 0.1 and 0.3


def test_miss_rate_is_the_share_of_labelled_answers_that_were_wrong() -> None:
    stats = VariantStats(np.array(EDGES))
    labels(stats, 4, 1)
    assert (stats.figures()["labelled"], stats.figures()["miss_rate"]) == (4.0, 0.25)


def test_scores_are_counted_in_buckets_whose_upper_edge_is_inclusive() -> None:
    stats = VariantStats(np.array(EDGES))
    stats.record(0.001, 6, 0, False, np.array([0.1, 0.25, 0.3, 0.9, np.nan, np.inf]))
    assert stats.histogram is not None
    assert stats.histogram.tolist() == [2, 1, 0, 1]  # 0.25 sits on an edge: the bucket below; NaN/inf are not counted
    assert stats.histogram.dtype == np.int64


def test_requests_without_scores_leave_the_histogram_empty() -> None:
    stats = VariantStats(np.array(EDGES))
    stats.record(0.001, 1, 0, False, None)
    stats.record(0.001, 1, 0, False, np.array([]))
    assert stats.histogram is not None and stats.histogram.tolist() == [0, 0, 0, 0]
    assert stats.requests == 2


# ---------------------------------------------------------------------- statistics


def test_chi2_quantile_is_the_wilson_hilferty_approximation_at_p_0_001() -> None:
    # Exact upper 0.1% points: 10.83 (1 dof) and 29.59 (10 dof); the approximation is within 3%.
    assert chi2_quantile(1) == pytest.approx(11.1556047, rel=1e-7)
    assert chi2_quantile(10) == pytest.approx(29.7609007, rel=1e-7)
    assert chi2_quantile(4, z=0) == pytest.approx(3.3696845, rel=1e-7)  # the median (exact: 3.357)


def test_chi2_quantile_counts_fewer_than_one_degree_of_freedom_as_one() -> None:
    assert chi2_quantile(0) == chi2_quantile(-3) == chi2_quantile(1)


@pytest.mark.parametrize("counts", [(0, 0, 5, 10), (5, 10, 0, 0), (0, 0, 0, 0)])
def test_a_rate_with_no_observations_is_never_significantly_higher(counts: tuple[int, int, int, int]) -> None:
    assert rate_increase_is_significant(*counts, z=0) is False


@pytest.mark.parametrize("counts", [(0, 50, 0, 60), (50, 50, 60, 60)])
def test_all_good_or_all_bad_on_both_sides_is_no_increase(counts: tuple[int, int, int, int]) -> None:
    assert rate_increase_is_significant(*counts, z=0) is False


@pytest.mark.parametrize(("counts", "statistic"), [
    ((0, 30, 30, 30), 7.7459667),      # pooled 0.5, standard error sqrt(0.25 * 2/30), difference 1
    ((10, 100, 30, 100), 3.5355339),   # pooled 0.2: 0.2 / sqrt(0.2 * 0.8 * 0.02)
    ((20, 200, 24, 100), 3.2311516),   # unequal sizes: 0.14 / sqrt(p(1-p)(1/200 + 1/100)), p = 44/300
])
def test_an_increase_is_significant_only_beyond_z_pooled_standard_errors(
        counts: tuple[int, int, int, int], statistic: float) -> None:
    assert rate_increase_is_significant(*counts, z=statistic - 1e-6)
    assert not rate_increase_is_significant(*counts, z=statistic + 1e-6)


def test_few_bad_outcomes_are_judged_by_the_exact_conditional_test() -> None:
    # 5 errors in 205 canary requests against 5 in 1,795: z = 4.2, but given 10 errors the canary's
    # share of them is Binomial(10, 0.1025) under no difference, and 5 or more happens 0.18% of the time.
    assert binomial_tail(5, 10, 205 / 2000) == pytest.approx(0.00183, abs=1e-5)
    assert not rate_increase_is_significant(5, 1795, 5, 205, z=3.235)
    assert rate_increase_is_significant(5, 1795, 5, 205, z=2.8)
    # All 8 errors on the canary, equal traffic: 0.5 ** 8 = 0.0039.
    assert rate_increase_is_significant(0, 1000, 8, 1000, z=2.0)
    assert not rate_increase_is_significant(0, 1000, 8, 1000, z=3.09)
    assert binomial_tail(0, 4, 0.3) == pytest.approx(1.0) and binomial_tail(3, 3, 1.0) == 1.0


def test_an_increase_exactly_z_standard_errors_away_is_not_significant() -> None:
    assert not rate_increase_is_significant(0, 2, 2, 2, z=2.0)


def test_a_decrease_is_never_a_significant_increase() -> None:
    assert not rate_increase_is_significant(30, 100, 10, 100, z=0)


def test_psi_of_a_histogram_with_itself_is_zero() -> None:
    assert psi(np.array([5, 3, 0]), np.array([5, 3, 0])) == 0.0


@pytest.mark.parametrize(("expected", "actual"), [([0, 0], [1, 3]), ([1, 3], [0, 0]), ([0, 0], [0, 0])])
def test_psi_against_an_empty_histogram_is_zero(expected: list[int], actual: list[int]) -> None:
    assert psi(np.array(expected), np.array(actual)) == 0.0


def test_psi_adds_half_a_count_to_every_bucket() -> None:
    # (10, 0) against (0, 10): shares 10.5/11 and 0.5/11 swap places.
    assert psi(np.array([10, 0]), np.array([0, 10])) == pytest.approx(2 * (20 / 22) * math.log(21), rel=1e-12)
    expected, actual = np.array([8, 2, 0]), np.array([2, 3, 5])
    e, a = (expected + 0.5) / 11.5, (actual + 0.5) / 11.5
    assert psi(expected, actual) == pytest.approx(float(np.sum((a - e) * np.log(a / e))), rel=1e-12)
    # Different totals: each side is normalised by its own total plus its own pseudo-counts.
    e, a = np.array([3.5, 1.5]) / 5, np.array([1.5, 7.5]) / 9
    assert psi(np.array([3, 1]), np.array([1, 7])) == pytest.approx(float(np.sum((a - e) * np.log(a / e))), rel=1e-12)


# ---------------------------------------------------------------------- CanaryComparison


def test_a_comparison_names_its_model_and_versions_and_summarises_both_variants() -> None:
    c = comparison()
    feed(c.stable, 3, scores=[0.1, 0.9])
    feed(c.canary, 2, errors=1, scores=[0.9])
    assert (c.model, c.stable_version, c.canary_version) == ("m", "1", "2")
    assert c.summary() == {
        "stable_version": "1", "canary_version": "2",
        "stable": c.stable.figures(), "canary": c.canary.figures(),
        "prediction_psi": psi(np.array([1, 0, 0, 1]), np.array([0, 0, 0, 1])),
    }
    assert c.summary()["canary"]["error_rate"] == 0.5


def test_variant_is_the_canary_by_name_and_stable_otherwise() -> None:
    c = comparison()
    assert c.variant("canary") is c.canary
    assert c.variant("stable") is c.stable


def test_bucket_edges_are_sorted_first() -> None:
    c = comparison([0.75, 0.25, 0.5])
    c.canary.record(0.001, 1, 0, False, np.array([0.3]))
    assert c.canary.histogram is not None and c.canary.histogram.tolist() == [0, 1, 0, 0]


# ---------------------------------------------------------------------- evaluate: when anything is judged


@pytest.mark.parametrize(("canary_requests", "judged"), [(49, False), (50, True)])
def test_nothing_is_judged_before_min_requests_canary_requests(canary_requests: int, judged: bool) -> None:
    c = comparison()
    feed(c.stable, 100)
    feed(c.canary, canary_requests, errors=canary_requests)
    breach = c.evaluate(RollbackRules(min_requests=50))
    assert (breach is not None) == judged


@pytest.mark.parametrize(("stable_requests", "judged"), [(19, False), (20, True)])
def test_nothing_is_judged_before_20_stable_requests(stable_requests: int, judged: bool) -> None:
    c = comparison()
    feed(c.stable, stable_requests)
    feed(c.canary, 100, errors=100)
    assert (c.evaluate(RollbackRules(min_requests=50)) is not None) == judged


def test_the_stable_minimum_is_a_parameter() -> None:
    c = comparison()
    feed(c.stable, 40)
    feed(c.canary, 100, errors=100)
    assert c.evaluate(RollbackRules(min_requests=50), min_stable_requests=41) is None
    assert c.evaluate(RollbackRules(min_requests=50), min_stable_requests=40) is not None


# ---------------------------------------------------------------------- evaluate: error rate


def test_an_erroring_canary_breaches_with_both_variants_figures_the_increase_and_the_limit() -> None:
    c = comparison()
    feed(c.stable, 100)
    feed(c.canary, 100, errors=30)
    breach = c.evaluate(RollbackRules(min_requests=50))
    assert breach == Breach("error_rate", {"stable": c.stable.figures(), "canary": c.canary.figures(),
                                           "increase": pytest.approx(0.3), "limit": 0.02})


def test_an_error_increase_within_sampling_noise_is_no_breach() -> None:
    c = comparison()
    feed(c.stable, 100, errors=5)
    feed(c.canary, 10, errors=2)   # 20% against 5%, but z is 1.85 on ten requests
    assert c.evaluate(RollbackRules(min_requests=10)) is None


# ---------------------------------------------------------------------- evaluate: fallback rate


def test_a_canary_falling_back_more_breaches_on_fallback_rate() -> None:
    c = comparison()
    feed(c.stable, 100)
    feed(c.canary, 100, fallbacks=20)
    breach = c.evaluate(RollbackRules(min_requests=50))
    assert breach == Breach("fallback_rate", {"stable": c.stable.figures(), "canary": c.canary.figures(),
                                              "increase": pytest.approx(0.2), "limit": 0.05})


def test_the_fallback_rate_is_per_instance() -> None:
    c = comparison()
    feed(c.stable, 100, instances=10)
    feed(c.canary, 100, instances=10, fallbacks=20)   # 20 of 1000 instances: 2%
    assert c.evaluate(RollbackRules(min_requests=50)) is None


def test_a_fallback_increase_within_sampling_noise_is_no_breach() -> None:
    c = comparison()
    feed(c.stable, 20, fallbacks=2)
    feed(c.canary, 3, fallbacks=1)   # a third against a tenth, on three instances
    assert c.evaluate(RollbackRules(min_requests=3)) is None


# ---------------------------------------------------------------------- evaluate: latency


def test_a_slower_canary_breaches_on_latency_with_the_ratio_and_its_limit() -> None:
    c = comparison()
    feed(c.stable, 100, seconds=0.01)
    feed(c.canary, 100, seconds=0.1)
    breach = c.evaluate(RollbackRules(min_requests=50))
    assert breach == Breach("latency", {"stable": c.stable.figures(), "canary": c.canary.figures(),
                                        "ratio": pytest.approx(10.0), "limit": 1.5})


def test_a_canary_slower_by_less_than_the_latency_floor_is_no_breach() -> None:
    c = comparison()
    feed(c.stable, 100, seconds=0.002)
    feed(c.canary, 100, seconds=0.004)   # twice as slow, but only 2 ms more than a 5 ms floor
    assert c.evaluate(RollbackRules(min_requests=50)) is None


def test_latency_is_not_judged_while_stables_p95_is_zero() -> None:
    c = comparison()
    feed(c.stable, 100, seconds=0.0)
    feed(c.canary, 100, seconds=1.0)
    assert c.evaluate(RollbackRules(min_requests=50)) is None


# ---------------------------------------------------------------------- evaluate: quality (feedback)


def test_a_canary_missing_more_often_breaches_on_quality() -> None:
    c = comparison()
    feed(c.stable, 100)
    feed(c.canary, 100)
    labels(c.stable, 200, 10)
    labels(c.canary, 60, 30)
    breach = c.evaluate(RollbackRules(min_requests=50))
    assert breach == Breach("quality", {"stable": c.stable.figures(), "canary": c.canary.figures(),
                                        "increase": pytest.approx(0.45), "limit": 0.05})


@pytest.mark.parametrize(("canary_labelled", "judged"), [(49, False), (50, True)])
def test_quality_is_judged_once_both_variants_have_min_labelled_answers(canary_labelled: int, judged: bool) -> None:
    c = comparison()
    feed(c.stable, 100)
    feed(c.canary, 100)
    labels(c.stable, 50, 0)
    labels(c.canary, canary_labelled, canary_labelled)
    assert (c.evaluate(RollbackRules(min_requests=50, min_labelled=50)) is not None) == judged


def test_a_miss_increase_within_sampling_noise_is_no_breach() -> None:
    c = comparison()
    feed(c.stable, 100)
    feed(c.canary, 100)
    labels(c.stable, 200, 20)
    labels(c.canary, 3, 1)   # a third against a tenth, on three answers
    assert c.evaluate(RollbackRules(min_requests=50, min_labelled=3)) is None


# ---------------------------------------------------------------------- evaluate: every rule's edges


def variants(stable: dict[str, Any], canary: dict[str, Any]) -> CanaryComparison:
    """A comparison fed with ``feed`` arguments per variant; ``labelled``/``misses`` add feedback."""
    c = comparison()
    for stats, spec in ((c.stable, dict(stable)), (c.canary, dict(canary))):
        labelled, misses = spec.pop("labelled", 0), spec.pop("misses", 0)
        feed(stats, spec.pop("requests"), **spec)
        labels(stats, labelled, misses)
    return c


AT_THE_LIMIT = {
    "error_rate_increase": (0.25, {"requests": 1000}, {"requests": 1000, "errors": 250}),
    "fallback_rate_increase": (0.25, {"requests": 1000}, {"requests": 1000, "fallbacks": 250}),
    "miss_rate_increase": (0.25, {"requests": 100, "labelled": 1000},
                           {"requests": 100, "labelled": 1000, "misses": 250}),
    "p95_latency_ratio": (2.0, {"requests": 100, "seconds": 0.01}, {"requests": 100, "seconds": 0.02}),
    "latency_floor_ms": (250, {"requests": 100, "seconds": 0.25}, {"requests": 100, "seconds": 0.5}),
}
"""Per rule: a limit, and the two variants whose difference is exactly that limit (all clearly significant)."""


@pytest.mark.parametrize("rule", sorted(AT_THE_LIMIT))
def test_a_difference_exactly_at_a_rules_limit_is_no_breach(rule: str) -> None:
    limit, stable, canary = AT_THE_LIMIT[rule]
    c = variants(stable, canary)
    assert c.evaluate(RollbackRules(min_requests=50, **{rule: limit})) is None
    assert c.evaluate(RollbackRules(min_requests=50, **{rule: limit * 0.96})) is not None


@pytest.mark.parametrize(("rule", "reason", "stable", "canary"), [
    ("error_rate_increase", "error_rate", {"requests": 5000, "errors": 500}, {"requests": 5000, "errors": 700}),
    ("fallback_rate_increase", "fallback_rate",
     {"requests": 5000, "fallbacks": 500}, {"requests": 5000, "fallbacks": 700}),
    ("miss_rate_increase", "quality",
     {"requests": 100, "labelled": 5000, "misses": 500}, {"requests": 100, "labelled": 5000, "misses": 700}),
])
def test_a_rate_increase_is_the_canary_rate_minus_stables(
        rule: str, reason: str, stable: dict[str, int], canary: dict[str, int]) -> None:
    c = variants(stable, canary)   # 10% against 14%: significant, but only 4 points more
    assert c.evaluate(RollbackRules(min_requests=50, **{rule: 0.05})) is None
    breach = c.evaluate(RollbackRules(min_requests=50, **{rule: 0.03}))
    assert breach is not None and breach.reason == reason
    assert breach.figures["increase"] == pytest.approx(0.04)


# ---------------------------------------------------------------------- evaluate: prediction shift

SHIFT_STABLE, SHIFT_CANARY = [20, 10, 1, 0, 0], [0, 2, 0, 8, 0]
"""Five buckets; four hold a score (3 degrees of freedom), one of them a single stable score."""
SHIFT_EDGES = [0.2, 0.4, 0.6, 0.8]


def shifted() -> CanaryComparison:
    c = comparison(SHIFT_EDGES)
    feed(c.stable, 31, scores=scores_for(SHIFT_STABLE, SHIFT_EDGES))
    feed(c.canary, 10, scores=scores_for(SHIFT_CANARY, SHIFT_EDGES))
    return c


def test_a_shifted_canary_breaches_with_its_psi_the_noise_and_the_limit() -> None:
    c = shifted()
    shift = psi(np.array(SHIFT_STABLE), np.array(SHIFT_CANARY))
    noise = 3 / (31 * 10 / (31 + 10))   # (buckets with a score - 1) / effective sample size
    breach = c.evaluate(RollbackRules(min_requests=10))
    assert breach == Breach("prediction_shift", {"stable": c.stable.figures(), "canary": c.canary.figures(),
                                                 "psi": pytest.approx(shift), "psi_noise": pytest.approx(noise),
                                                 "limit": 0.2})


def test_the_shift_must_exceed_the_limit_after_subtracting_sampling_noise() -> None:
    c = shifted()
    shift = psi(np.array(SHIFT_STABLE), np.array(SHIFT_CANARY))
    beyond_noise = shift - 3 / (31 * 10 / (31 + 10))
    assert c.evaluate(RollbackRules(min_requests=10, prediction_shift=beyond_noise - 0.01)) is not None
    assert c.evaluate(RollbackRules(min_requests=10, prediction_shift=beyond_noise)) is None
    assert c.evaluate(RollbackRules(min_requests=10, prediction_shift=beyond_noise + 0.01)) is None


def test_a_shift_that_chi_square_calls_noise_is_no_breach() -> None:
    # 40 stable scores spread evenly, 8 canary ones in the top bucket: PSI minus noise is 1.25,
    # but n_eff * PSI = 11.3 is below the 0.1% chi-square point for 3 dof (16.5).
    c = comparison()
    feed(c.stable, 40, scores=scores_for([10, 10, 10, 10]))
    feed(c.canary, 8, scores=scores_for([0, 0, 0, 8]))
    assert c.evaluate(RollbackRules(min_requests=8)) is None
    feed(c.canary, 32, scores=scores_for([0, 0, 0, 32]))
    breach = c.evaluate(RollbackRules(min_requests=8))
    assert breach is not None and breach.reason == "prediction_shift"


def test_the_shift_is_not_judged_while_a_variant_has_no_scores() -> None:
    c = comparison()
    feed(c.stable, 100, scores=scores_for([25, 25, 25, 25]))
    feed(c.canary, 100)
    assert c.evaluate(RollbackRules(min_requests=50)) is None
