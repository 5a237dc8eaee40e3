"""Routing rules: the circuit breaker, the inline-or-thread call policy, who answers, and assembling answers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from service.core.predictor import Predictions
from service.serving.deploy import BreakerConfig, CanaryConfig, ModelPolicy
from service.serving.routing import (
    MAX_PROBE_SECONDS,
    MIN_PROBE_SECONDS,
    PROBE_CEILING_SECONDS,
    Breaker,
    ModelEntry,
    ServedVersion,
    VersionHealth,
    degraded_reason,
    invalid_rows,
    merge,
    state_of,
)
from tests.cards import card


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock | None = None, transitions: list[str] | None = None, **config: float) -> Breaker:
    settings = {"window": 10, "min_calls": 5, "error_rate": 0.2, "cooldown_seconds": 30, "probes": 2} | config
    return Breaker(BreakerConfig(**settings), None if transitions is None else transitions.append,
                   clock=clock or Clock())


def opened(clock: Clock, transitions: list[str] | None = None, **config: float) -> Breaker:
    b = breaker(clock, transitions, min_calls=1, error_rate=0.5, **config)
    b.record(False)
    assert b.state == "open"
    return b


# ---------------------------------------------------------------------- Breaker


def test_a_new_breaker_is_closed_and_lets_calls_through() -> None:
    b = breaker()
    assert (b.state, b.allow(), b.bad_rate) == ("closed", True, 0.0)


def test_the_breaker_opens_only_once_min_calls_were_seen() -> None:
    b = breaker(min_calls=3, error_rate=0.2)
    b.record(False)
    b.record(False)
    assert b.state == "closed"   # 100% bad, but two calls are too few
    b.record(True)
    assert b.state == "open"


def test_a_bad_rate_exactly_at_the_limit_keeps_the_breaker_closed() -> None:
    b = breaker(window=10, min_calls=5, error_rate=0.2)
    for ok in (True, True, True, True, False):
        b.record(ok)
    assert b.bad_rate == 0.2 and b.state == "closed"
    b.record(False)   # 2 of 6
    assert b.state == "open"


def test_the_bad_rate_is_over_the_last_window_calls() -> None:
    b = breaker(window=4, min_calls=4, error_rate=0.9)
    for ok, rate in [(False, 1.0), (True, 0.5), (True, 1 / 3), (True, 0.25),
                     (True, 0.0),     # the first call (bad) leaves the window
                     (False, 0.25), (True, 0.25), (True, 0.25), (True, 0.25),
                     (True, 0.0)]:
        b.record(ok)
        assert b.bad_rate == pytest.approx(rate)
    assert b.state == "closed"


def test_an_open_breaker_refuses_calls_until_the_cooldown_has_passed() -> None:
    clock = Clock()
    b = opened(clock, cooldown_seconds=30)
    clock.now = 29.99
    assert not b.allow() and b.state == "open"
    clock.now = 30.0
    assert b.allow() and b.state == "half_open"
    assert b.allow()   # half-open: every call is a probe


def test_the_cooldown_counts_from_when_the_breaker_opened() -> None:
    clock = Clock()
    clock.now = 100.0
    b = opened(clock, cooldown_seconds=30)
    clock.now = 129.0
    assert not b.allow()
    clock.now = 130.0
    assert b.allow()


def test_calls_finishing_while_open_are_ignored() -> None:
    clock = Clock()
    b = opened(clock)
    rate = b.bad_rate
    for _ in range(5):
        b.record(True)
    assert b.state == "open" and b.bad_rate == rate


def test_probes_close_the_breaker_with_a_fresh_window() -> None:
    clock = Clock()
    transitions: list[str] = []
    b = breaker(clock, transitions, window=10, min_calls=3, error_rate=0.5, probes=2)
    for _ in range(3):
        b.record(False)
    clock.now = 30.0
    assert b.allow()
    b.record(True)
    assert b.state == "half_open"
    b.record(True)
    assert b.state == "closed"
    assert transitions == ["open", "half_open", "closed"]
    assert b.bad_rate == 0.0
    b.record(True)
    assert b.bad_rate == 0.0   # the bad calls before opening are forgotten
    b.record(False)
    b.record(False)
    assert b.state == "open"   # 2 of 3: a fresh window, judged again from min_calls


def test_one_failed_probe_reopens_and_the_next_half_open_needs_every_probe_again() -> None:
    clock = Clock()
    b = opened(clock, probes=3, cooldown_seconds=10)
    clock.now = 10.0
    assert b.allow()
    b.record(True)
    b.record(True)
    b.record(False)
    assert b.state == "open" and not b.allow()
    clock.now = 19.0
    assert not b.allow()   # the cooldown restarts at the failed probe
    clock.now = 20.0
    assert b.allow()
    b.record(True)
    b.record(True)
    assert b.state == "half_open"
    b.record(True)
    assert b.state == "closed"


def test_a_breaker_works_without_a_transition_callback() -> None:
    b = Breaker(BreakerConfig(window=2, min_calls=1, error_rate=0.5))
    b.record(False)
    assert b.state == "open"


# ---------------------------------------------------------------------- inline or thread


def version(**fields: float) -> ServedVersion:
    served = ServedVersion(card=None, validator=None, fallback=None, predictor=None, breaker=None)  # type: ignore[arg-type]
    for name, value in fields.items():
        setattr(served, name, value)
    return served


def test_the_first_call_sets_the_typical_time_and_schedules_a_probe_a_second_later() -> None:
    served = version()
    served.note_call(0.01, now=5.0, inline=False)
    assert served.call_seconds_ewma == 0.01
    assert served.next_probe == 5.0 + MIN_PROBE_SECONDS


def test_later_calls_move_the_typical_time_by_a_tenth() -> None:
    served = version(call_seconds_ewma=0.001)
    served.note_call(0.002, now=1.0)
    assert served.call_seconds_ewma == pytest.approx(0.0011, rel=1e-12)


def test_one_long_call_counts_for_at_most_ten_typical_calls_plus_a_millisecond() -> None:
    served = version(call_seconds_ewma=0.0005)
    served.note_call(1.0, now=1.0)   # a worker descheduled mid-call: the sample counts as 6 ms
    assert served.call_seconds_ewma == pytest.approx(0.9 * 0.0005 + 0.1 * 0.006, rel=1e-12)
    assert served.calls_inline(1.0)


def test_a_timed_out_call_counts_in_full() -> None:
    served = version(call_seconds_ewma=0.001)
    served.note_call(1.0, now=1.0, inline=False, timed_out=True)
    assert served.call_seconds_ewma == pytest.approx(0.9 * 0.001 + 0.1 * 1.0, rel=1e-12)


def test_turning_slow_moves_calls_to_threads_and_schedules_a_probe_a_second_later() -> None:
    served = version(call_seconds_ewma=0.0019, probe_interval=8.0, next_probe=0.0)
    served.note_call(0.003, now=50.0)    # 0.9 * 1.9 ms + 0.1 * 3 ms = 2.01 ms
    assert served.call_seconds_ewma >= served.inline_seconds
    assert (served.probe_interval, served.next_probe) == (MIN_PROBE_SECONDS, 50.0 + MIN_PROBE_SECONDS)
    assert not served.calls_inline(50.5)
    assert served.calls_inline(51.0)


def test_a_typical_time_reaching_exactly_the_threshold_moves_calls_to_threads() -> None:
    threshold = 0.9 * 0.001 + 0.1 * 0.002
    served = version(call_seconds_ewma=0.001, inline_seconds=threshold, probe_interval=8.0, next_probe=0.0)
    served.note_call(0.002, now=50.0)
    assert served.call_seconds_ewma == threshold
    assert (served.probe_interval, served.next_probe) == (MIN_PROBE_SECONDS, 50.0 + MIN_PROBE_SECONDS)


def test_staying_slow_on_threads_keeps_the_probe_schedule() -> None:
    served = version(call_seconds_ewma=0.002, probe_interval=4.0, next_probe=5.0)
    served.note_call(0.002, now=3.0, inline=False)
    assert (served.probe_interval, served.next_probe) == (4.0, 5.0)
    assert served.call_seconds_ewma == pytest.approx(0.002)


def test_a_call_on_a_thread_is_averaged_in_even_when_slow() -> None:
    served = version(call_seconds_ewma=0.01)
    served.note_call(0.02, now=3.0, inline=False)
    assert served.call_seconds_ewma == pytest.approx(0.011, rel=1e-12)


def test_a_probe_on_the_loop_replaces_the_typical_time() -> None:
    served = version(call_seconds_ewma=0.002, probe_interval=1.0, next_probe=10.0)
    served.note_call(0.001, now=10.0, inline=True)
    assert served.call_seconds_ewma == 0.001
    assert (served.probe_interval, served.next_probe) == (1.0, 10.0)
    assert served.calls_inline(10.001)


def test_a_call_counts_as_made_on_the_loop_unless_said_otherwise() -> None:
    served = version(call_seconds_ewma=0.01, probe_interval=1.0, next_probe=10.0)
    served.note_call(0.001, now=10.0)
    assert served.call_seconds_ewma == 0.001   # a probe: its time replaces the history


@pytest.mark.parametrize("seconds", [0.002, 0.003])
def test_a_probe_still_slow_doubles_the_wait_for_the_next(seconds: float) -> None:
    served = version(call_seconds_ewma=0.01, probe_interval=1.0, next_probe=10.0)
    served.note_call(seconds, now=10.0, inline=True)
    assert served.call_seconds_ewma == seconds
    assert (served.probe_interval, served.next_probe) == (2.0, 12.0)


def test_the_wait_between_probes_stops_at_a_minute() -> None:
    served = version(call_seconds_ewma=0.01, probe_interval=40.0, next_probe=10.0)
    served.note_call(0.01, now=10.0, inline=True)
    assert (served.probe_interval, served.next_probe) == (MAX_PROBE_SECONDS, 10.0 + MAX_PROBE_SECONDS)


def test_calls_run_inline_while_typically_faster_than_the_threshold() -> None:
    assert version(call_seconds_ewma=0.0019, next_probe=100.0).calls_inline(0.0)
    assert not version(call_seconds_ewma=0.002, next_probe=100.0).calls_inline(99.9)
    assert version(call_seconds_ewma=0.002, next_probe=100.0).calls_inline(100.0)   # a probe is due
    assert version(call_seconds_ewma=0.005, inline_seconds=0.01).calls_inline(0.0)


def test_a_model_slower_than_the_probe_ceiling_is_never_probed_on_the_loop() -> None:
    assert not version(call_seconds_ewma=PROBE_CEILING_SECONDS, next_probe=0.0).calls_inline(1000.0)
    assert version(call_seconds_ewma=PROBE_CEILING_SECONDS * 0.99, next_probe=0.0).calls_inline(1000.0)


# ---------------------------------------------------------------------- who answers


def served(loaded: bool = True, drift: bool = False, quality: bool = False, breaker_state: str = "closed",
           clock: Clock | None = None) -> ServedVersion:
    clock = clock or Clock()
    b = breaker(clock) if breaker_state == "closed" else opened(clock)
    if breaker_state == "half_open":
        clock.now = 1e9
        assert b.allow()
    return ServedVersion(card=None, validator=None, fallback=None,  # type: ignore[arg-type]
                         predictor=object() if loaded else None, breaker=b,  # type: ignore[arg-type]
                         health=VersionHealth(drift_detected=drift, quality_degraded=quality))


ALERT = ModelPolicy()
FALLBACK = ModelPolicy(on_drift="fallback", on_quality_degraded="fallback")


@pytest.mark.parametrize(("version_", "policy", "reason", "state"), [
    (served(), ALERT, None, "serving"),
    (served(), FALLBACK, None, "serving"),
    (served(loaded=False, drift=True, quality=True, breaker_state="open"), FALLBACK, "load_failed", "load_failed"),
    (served(drift=True), ALERT, None, "serving"),
    (served(drift=True), FALLBACK, "drift", "degraded_by_drift"),
    (served(drift=True, quality=True), FALLBACK, "drift", "degraded_by_drift"),
    (served(quality=True), ALERT, None, "serving"),
    (served(quality=True), FALLBACK, "quality", "degraded_by_quality"),
    (served(drift=True, quality=True), ModelPolicy(on_quality_degraded="fallback"), "quality", "degraded_by_quality"),
    (served(drift=True, quality=True), ModelPolicy(on_drift="fallback"), "drift", "degraded_by_drift"),
    (served(breaker_state="open"), ALERT, "breaker_open", "breaker_open"),
    (served(breaker_state="half_open"), ALERT, None, "breaker_half_open"),
    (served(drift=True, breaker_state="open"), FALLBACK, "drift", "breaker_open"),
    (served(quality=True, breaker_state="open"), ModelPolicy(on_quality_degraded="fallback"), "quality",
     "breaker_open"),
])
def test_the_fallback_reason_and_the_listed_state_follow_health_and_policy(
        version_: ServedVersion, policy: ModelPolicy, reason: str | None, state: str) -> None:
    assert degraded_reason(version_, policy) == reason
    assert state_of(version_, policy) == state


def test_a_model_version_that_failed_to_load_is_never_asked() -> None:
    unloaded = served(loaded=False)
    assert degraded_reason(unloaded, ALERT) == "load_failed"
    assert state_of(unloaded, ALERT) == "load_failed"


def test_asking_after_the_cooldown_moves_an_open_breaker_to_half_open() -> None:
    clock = Clock()
    version_ = served(breaker_state="open", clock=clock)
    clock.now = 1e9
    assert degraded_reason(version_, ALERT) is None
    assert state_of(version_, ALERT) == "breaker_half_open"


# ---------------------------------------------------------------------- invalid outputs


def test_regression_outputs_outside_the_declared_range_or_not_finite_are_invalid() -> None:
    c = card(output_range=(0.0, 10.0))
    values = np.array([0.0, 10.0, -1e-9, 10.000001, np.nan, np.inf, -np.inf, 5.0])
    rows = invalid_rows(c, Predictions(values=values), margin=0.25)
    assert rows.tolist() == [False, False, True, True, True, True, True, False]


def test_regression_outputs_may_exceed_the_reference_range_by_the_margin() -> None:
    c = card(prediction_range=(0.0, 100.0))
    values = np.array([-25.0, 125.0, -25.1, 125.1])
    assert invalid_rows(c, Predictions(values=values), margin=0.25).tolist() == [False, False, True, True]
    assert invalid_rows(c, Predictions(values=values), margin=0.5).tolist() == [False, False, False, False]


def test_a_class_row_with_any_non_finite_probability_is_invalid() -> None:
    c = card(task="classification", labels=["a", "b"])
    probs = np.array([[0.5, 0.5], [np.nan, 0.5], [0.2, np.inf], [0.1, 0.9]])
    rows = invalid_rows(c, Predictions(labels=["a"] * 4, probabilities=probs), margin=0.25)
    assert rows.tolist() == [False, True, True, False]


def test_finite_class_probabilities_are_all_valid() -> None:
    c = card(task="classification", labels=["a", "b"])
    rows = invalid_rows(c, Predictions(labels=["a"] * 3, probabilities=np.full((3, 2), 0.5)), margin=0.25)
    assert rows.dtype == bool and rows.tolist() == [False, False, False]


# ---------------------------------------------------------------------- merging answers


def test_one_part_answering_every_row_is_the_answer() -> None:
    part = Predictions(values=np.array([1.0, 2.0]))
    assert merge(2, [(np.array([0, 1]), part)]) is part


def test_one_part_answering_some_rows_is_placed_at_those_rows() -> None:
    merged = merge(3, [(np.array([2]), Predictions(values=np.array([7.0])))])
    assert merged.values is not None and merged.values[2] == 7.0 and len(merged.values) == 3


def test_values_from_several_parts_land_on_their_rows() -> None:
    merged = merge(4, [(np.array([0, 2]), Predictions(values=np.array([1.0, 3.0]))),
                       (np.array([1, 3]), Predictions(values=np.array([2.0, 4.0])))])
    assert merged.values is not None and merged.values.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert merged.values.dtype == np.float64
    assert merged.labels is None and merged.probabilities is None


def test_labels_and_probabilities_from_several_parts_land_on_their_rows() -> None:
    model = Predictions(labels=["a", "b"], probabilities=np.array([[0.9, 0.1], [0.2, 0.8]]))
    fallback = Predictions(labels=["a"], probabilities=np.array([[0.6, 0.4]]))
    merged = merge(3, [(np.array([0, 2]), model), (np.array([1]), fallback)])
    assert merged.labels == ["a", "a", "b"]
    assert merged.probabilities is not None
    assert merged.probabilities.tolist() == [[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]
    assert merged.values is None


# ---------------------------------------------------------------------- stable or canary


def entry(traffic: float, sticky: bool = True, with_canary: bool = True) -> ModelEntry:
    stable, canary = served(), served()
    stable.variant, canary.variant = "stable", "canary"
    policy = ModelPolicy(canary=CanaryConfig(version="2", traffic=traffic, sticky=sticky)) if with_canary \
        else ModelPolicy()
    return ModelEntry(name="m", policy=policy, stable=stable, canary=canary if with_canary else None,
                      canary_traffic=traffic)


STICKY_DRAWS = {"alice": 0.8669973945765952, "bob": 0.1603500636916173, "carol": 0.41091068515048274}
"""blake2b (8 bytes, big-endian, over 2**64) of ``"m\\x00<key>"``: a key's place must not move between releases,
or a deploy would reshuffle which clients see the canary."""


def test_without_a_canary_every_request_goes_to_stable() -> None:
    e = entry(0.5, with_canary=False)
    assert all(e.choose(key) is e.stable for key in (None, "alice", "bob"))


def test_a_canary_with_no_traffic_gets_nothing() -> None:
    e = entry(0.0)
    assert all(e.choose(key) is e.stable for key in (None, "alice", "bob"))
    rolled_back = entry(0.0)
    rolled_back.policy = ModelPolicy()   # the config no longer names a canary, the version is still loaded
    assert rolled_back.choose("bob") is rolled_back.stable


@pytest.mark.parametrize("key", sorted(STICKY_DRAWS))
def test_a_sticky_key_reaches_the_canary_when_its_hash_falls_under_the_traffic_share(key: str) -> None:
    draw = STICKY_DRAWS[key]
    assert entry(draw + 1e-12).choose(key).variant == "canary"   # type: ignore[union-attr]
    assert entry(draw).choose(key).variant == "stable"           # type: ignore[union-attr]
    assert entry(draw - 1e-12).choose(key).variant == "stable"   # type: ignore[union-attr]


def test_a_sticky_key_always_reaches_the_same_variant() -> None:
    e = entry(0.5)
    assert {e.choose("alice").variant for _ in range(20)} == {"stable"}  # type: ignore[union-attr]
    assert {e.choose("bob").variant for _ in range(20)} == {"canary"}  # type: ignore[union-attr]


def test_the_whole_traffic_share_goes_to_the_canary() -> None:
    e = entry(1.0)
    assert all(e.choose(key) is e.canary for key in ("alice", "bob", "carol", None))


@pytest.mark.parametrize(("key", "sticky"), [(None, True), ("alice", False)])
def test_requests_without_a_key_or_stickiness_draw_at_random(
        key: str | None, sticky: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    e = entry(0.5, sticky=sticky)
    monkeypatch.setattr(random, "random", lambda: 0.1)
    assert e.choose(key) is e.canary
    monkeypatch.setattr(random, "random", lambda: 0.9)
    assert e.choose(key) is e.stable
    monkeypatch.setattr(random, "random", lambda: 0.5)
    assert e.choose(key) is e.stable
