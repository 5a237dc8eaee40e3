"""The fleet's one canary decision: pooled figures, looks spent once, promotion on evidence.

Every worker of every replica publishes its figures to the store; the worker
whose compare-and-swap makes a look judges the pooled figures. These tests run
many "workers" (each its own :class:`CanaryPool` with its own token) on one
local store, as replicas sharing a volume or a bucket would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from monitoring.canary import (
    ALPHA,
    CanaryComparison,
    CanaryPool,
    judge,
    look_threshold,
    look_z,
    upper_bound_of_increase,
)
from monitoring.store import LocalStore
from service.serving.deploy import DeployState, PromoteRules, PromotionRecord, RollbackRules

EDGES = list(np.linspace(0.1, 0.9, 9))


def comparison() -> CanaryComparison:
    return CanaryComparison("m", "1", "2", EDGES)


def feed(c: CanaryComparison, rng: np.random.Generator, n: int, shift: float = 0.0, error_rate: float = 0.0,
         canary_share: float = 0.5) -> None:
    """``n`` requests split between the variants; the canary's scores shifted by ``shift``."""
    for _ in range(n):
        variant = "canary" if rng.random() < canary_share else "stable"
        score = rng.uniform() + (shift if variant == "canary" else 0.0)
        errored = variant == "canary" and rng.random() < error_rate
        c.variant(variant).record(0.001, 1, 0, errored, np.array([score]))


def workers(store: LocalStore, count: int) -> list[tuple[CanaryPool, CanaryComparison]]:
    return [(CanaryPool(store, f"{i:012x}"), comparison()) for i in range(count)]


def judge_with(pooled: CanaryComparison, rules: RollbackRules, promote: PromoteRules | None = None):
    return lambda look: judge(pooled, rules, promote, look)


def round_of(fleet: list[tuple[CanaryPool, CanaryComparison]], rules: RollbackRules,
             promote: PromoteRules | None = None) -> list[str]:
    """One control round of every worker: publish, pool, try the next look; the verdicts each one made."""
    made = []
    for pool, own in fleet:
        pool.publish(own)
        pooled = pool.pooled("m", own.pair)
        assert pooled is not None
        decision = pool.look("m", own.pair, pooled, rules, judge_with(pooled, rules, promote))
        if decision is not None:
            made.append(decision.verdict)
    return made


def test_the_pool_is_the_sum_of_every_worker(tmp_path: Path) -> None:
    store, rng = LocalStore(tmp_path), np.random.default_rng(1)
    fleet = workers(store, 3)
    whole = comparison()
    for _, own in fleet:
        feed(own, rng, 100, shift=0.1)
    for _, own in fleet:
        for name in ("stable", "canary"):
            whole.variant(name).merge(own.variant(name).snapshot())
    for pool, own in fleet:
        pool.publish(own)
    pooled = fleet[0][0].pooled("m", "1-2")
    assert pooled is not None
    assert pooled.summary() == whole.summary()
    assert pooled.canary.requests + pooled.stable.requests == 300
    assert pooled.started_at == min(own.started_at for _, own in fleet)


def test_a_biased_canary_is_rolled_back_once_for_the_whole_fleet(tmp_path: Path) -> None:
    store, rng = LocalStore(tmp_path), np.random.default_rng(2)
    fleet = workers(store, 6)  # 3 replicas of 2 workers
    rules = RollbackRules(min_requests=120)
    verdicts: list[str] = []
    for _ in range(20):
        for _, own in fleet:
            feed(own, rng, 10, shift=0.4)
        verdicts += round_of(fleet, rules)
    assert verdicts == ["rolled_back"]
    decision = fleet[3][0].decision("m", "1-2")
    assert decision.verdict == "rolled_back" and decision.reason == "prediction_shift"
    # Each worker alone holds a sixth of the traffic: the pooled test saw what none of them could.
    assert decision.requests_at_last_look >= rules.min_requests > max(own.canary.requests for _, own in fleet)


def test_looks_follow_the_schedule_and_each_is_made_once(tmp_path: Path) -> None:
    store, rng = LocalStore(tmp_path), np.random.default_rng(3)
    fleet = workers(store, 4)
    rules = RollbackRules(min_requests=100)
    for _ in range(30):
        for _, own in fleet:
            feed(own, rng, 10)
        assert round_of(fleet, rules) == []  # healthy: never a verdict
    pooled = fleet[0][0].pooled("m", "1-2")
    assert pooled is not None
    looks = fleet[0][0].decision("m", "1-2").looks
    assert look_threshold(looks, 100) <= pooled.canary.requests < look_threshold(looks + 1, 100)


def test_the_spending_sums_to_alpha_and_later_looks_ask_for_more() -> None:
    spent = sum(ALPHA * 6 / (np.pi ** 2 * k ** 2) for k in range(1, 100_000))
    assert spent == pytest.approx(ALPHA, rel=1e-4)
    assert look_z(1) > 3.09 and all(look_z(k) < look_z(k + 1) for k in range(1, 30))
    assert [look_threshold(k, 200) for k in (1, 2, 3)] == [200, 300, 450]


def test_a_healthy_canary_is_never_rolled_back_over_repeated_looks(tmp_path: Path) -> None:
    """20 independent runs, each looked at again and again as traffic grows: no false rollback."""
    rules = RollbackRules(min_requests=50)
    for run in range(20):
        store, rng = LocalStore(tmp_path / str(run)), np.random.default_rng(100 + run)
        fleet = workers(store, 3)
        for _ in range(40):
            for _, own in fleet:
                feed(own, rng, 15, error_rate=0.01)
            assert round_of(fleet, rules) == [], f"run {run} rolled back a healthy canary"
        assert fleet[0][0].decision("m", "1-2").looks >= 6


def test_a_proven_canary_is_promoted_once_with_its_evidence(tmp_path: Path) -> None:
    store, rng = LocalStore(tmp_path), np.random.default_rng(4)
    fleet = workers(store, 3)
    rules, promote = RollbackRules(min_requests=100), PromoteRules(min_requests=600)
    verdicts: list[str] = []
    for _ in range(60):
        for _, own in fleet:
            feed(own, rng, 20)
        verdicts += round_of(fleet, rules, promote)
    assert verdicts == ["promoted"]
    decision = fleet[1][0].decision("m", "1-2")
    assert decision.figures["canary"]["requests"] >= 600
    assert all(b["bound"] < b["limit"] for b in decision.figures["upper_bounds"].values())


def test_no_promotion_without_enough_evidence_or_with_a_worse_canary() -> None:
    rng = np.random.default_rng(5)
    rules = RollbackRules(min_requests=100)
    small = comparison()
    feed(small, rng, 300)
    assert small.proven(rules, PromoteRules(min_requests=1000)) is None  # too few requests
    assert small.proven(rules, PromoteRules(min_requests=100, min_duration_seconds=3600)) is None  # too soon
    assert small.proven(rules, PromoteRules(min_requests=100, min_labelled=10)) is None  # no ground truth yet
    worse = comparison()
    feed(worse, rng, 4000, error_rate=0.015)  # below the 2% rollback limit, but not proven below it
    assert worse.proven(rules, PromoteRules(min_requests=100)) is None
    fine = comparison()
    feed(fine, rng, 4000)
    assert fine.proven(rules, PromoteRules(min_requests=100)) is not None


def test_upper_bound_of_increase_covers_the_true_difference() -> None:
    rng = np.random.default_rng(6)
    covered = 0
    for _ in range(2000):
        a, b = rng.binomial(500, 0.05), rng.binomial(500, 0.08)
        covered += upper_bound_of_increase(a, 500, b, 500, 1.645) >= 0.03
    assert covered / 2000 >= 0.93  # a 95% one-sided bound


def test_a_promotion_holds_while_the_config_names_the_old_stable() -> None:
    from datetime import datetime, timezone

    state = DeployState(promotions={"m": PromotionRecord(version="2", previous="1", at=datetime.now(timezone.utc))})
    assert state.promoted("m", "1") is not None and state.promoted("m", "1").version == "2"
    assert state.promoted("m", "3") is None  # the operator named another stable: the config wins
    assert state.promoted("other", "1") is None


def test_feedback_arriving_after_the_traffic_is_looked_at(tmp_path: Path) -> None:
    """Ground truth comes later than the requests: its growth alone makes a look, so quality is judged."""
    store, rng = LocalStore(tmp_path), np.random.default_rng(7)
    fleet = workers(store, 2)
    rules = RollbackRules(min_requests=100, min_labelled=50)
    for _, own in fleet:
        feed(own, rng, 150)
    assert round_of(fleet, rules) == []
    looks = fleet[0][0].decision("m", "1-2").looks
    for _, own in fleet:  # no new requests: only feedback, the canary wrong far more often
        for i in range(60):
            own.stable.record_feedback(i % 4 == 0)
            own.canary.record_feedback(i % 4 != 0)
    assert round_of(fleet, rules) == ["rolled_back"]
    decision = fleet[0][0].decision("m", "1-2")
    assert decision.reason == "quality" and decision.looks == looks + 1
