"""Canary decisions on a fleet: pooled with alpha-spending looks against each worker alone checking every tick.

Runs the real analysis (:class:`monitoring.canary.CanaryComparison`, its
``evaluate``, ``proven``, :class:`monitoring.canary.Decision` and ``look_z``) on
simulated traffic: ``--workers`` workers (3 replicas of 2 by default) share
the requests round robin, the canary gets ``--traffic`` of them, and the
control loop ticks every ``--tick`` fleet requests.

- *per worker, every tick*: what Vigil did before: each worker judges its own
  share with a fixed z = 3.09 at every tick, and any worker's breach rolls back.
- *pooled, fixed z every tick*: the sum of every worker's figures, judged at every tick
  with z = 3.09: pooling alone, without a guard against checking many times.
- *pooled, alpha-spending looks*: what Vigil does: the sum, judged at the looks of
  :class:`~monitoring.canary.Decision` with the spending of ``look_z``.

Two tables: fleet requests until a shifted canary is rolled back (median and
90th percentile over ``--runs`` runs, and how many runs never decided), and
the share of runs in which a healthy canary is rolled back (false rollbacks).

    .venv/bin/python benchmarks/canary_fleet.py --runs 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitoring.canary import Z_ONE_SIDED, CanaryComparison, Decision, judge  # noqa: E402
from service.serving.deploy import RollbackRules  # noqa: E402

EDGES = list(np.linspace(0.1, 0.9, 9))


def run(rng: np.random.Generator, *, workers: int, traffic: float, shift: float, requests: int, tick: int,
        rules: RollbackRules, pooled: bool, spending: bool = True) -> int | None:
    """Fleet requests until the canary is rolled back, or None if it never is within ``requests``."""
    own = [CanaryComparison("m", "1", "2", EDGES) for _ in range(workers)]
    decision = Decision()
    canary_draws = rng.random(requests) < traffic
    scores = rng.random(requests)
    errors = rng.random(requests) < 0.005
    for i in range(requests):
        variant = "canary" if canary_draws[i] else "stable"
        score = scores[i] + (shift if variant == "canary" else 0.0)
        own[i % workers].variant(variant).record(0.001, 1, 0, bool(errors[i]), np.array([score]))
        if (i + 1) % tick:
            continue
        if pooled:
            fleet = CanaryComparison.pooled("m", [c.snapshot() for c in own])
            assert fleet is not None
            requests_now = fleet.canary.requests
            if not spending:
                if fleet.evaluate(rules, z=Z_ONE_SIDED) is not None:
                    return i + 1
            elif decision.look_due(requests_now, 0, rules.min_requests, rules.min_labelled):
                decision.looks += 1
                decision.requests_at_last_look = requests_now
                if judge(fleet, rules, None, decision.looks) is not None:
                    return i + 1
        elif any(c.evaluate(rules, z=Z_ONE_SIDED) is not None for c in own):
            return i + 1
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--traffic", type=float, default=0.1)
    parser.add_argument("--shift", type=float, default=0.1, help="added to the canary's scores (uniform on [0, 1))")
    parser.add_argument("--requests", type=int, default=40_000, help="fleet requests per run")
    parser.add_argument("--tick", type=int, default=100, help="fleet requests between control-loop ticks")
    parser.add_argument("--min-requests", type=int, default=200)
    args = parser.parse_args()
    rules = RollbackRules(min_requests=args.min_requests)
    common = dict(workers=args.workers, traffic=args.traffic, requests=args.requests, tick=args.tick, rules=rules)
    print(f"{args.workers} workers, canary traffic {args.traffic}, tick every {args.tick} requests, "
          f"min_requests {args.min_requests}, {args.runs} runs of {args.requests} requests\n")
    print("| method | shifted canary: requests to rollback, median | p90 | runs never decided "
          "| healthy canary: runs falsely rolled back |")
    print("|---|---|---|---|---|")
    methods = (("per worker, fixed z every tick (before)", False, False),
               ("pooled, fixed z every tick", True, False),
               ("pooled, alpha-spending looks (now)", True, True))
    for name, pooled, spending in methods:
        times = [run(np.random.default_rng(1000 + r), shift=args.shift, pooled=pooled, spending=spending, **common)
                 for r in range(args.runs)]
        false = [run(np.random.default_rng(5000 + r), shift=0.0, pooled=pooled, spending=spending, **common)
                 for r in range(args.runs)]
        decided = [t for t in times if t is not None]
        median = f"{np.median(decided):,.0f}" if decided else "-"
        p90 = f"{np.quantile(decided, 0.9):,.0f}" if decided else "-"
        print(f"| {name} | {median} | {p90} | {args.runs - len(decided)}/{args.runs} "
              f"| {sum(f is not None for f in false)}/{args.runs} |")


if __name__ == "__main__":
    main()
