"""How soon after the fleet's rollback decision every replica stops serving the canary.

Three ``vigil serve`` replicas (one worker each, each its own ``VIGIL_DATA_DIR``)
share a moto S3 store, with the default control interval (``VIGIL_CONTROL_INTERVAL_SECONDS``,
1 s) unless ``--control-seconds`` says otherwise. ``--biased`` models have a canary
answering 80 higher than stable (the fleet rolls each back on ``prediction_shift``),
and ``--steady`` more models have a healthy canary (the same model registered again)
that keeps receiving traffic, so every control round has that many canaries to
publish and read. Traffic goes round robin to the replicas, straight to each,
on ``--threads`` threads.

For each biased model the script reads the decision's time from the store
(``decision.json``, written once by the worker that made the verdict) and polls
every replica's ``GET /models`` every 20 ms: the lag of a replica is the time
from the decision to the first poll at which the canary's share of its traffic
is 0, that is, once the routing it swapped in sends every request to stable.
(``vigil_canary_phase`` says so too, but only after the next metrics flush;
``GET /canary/{model}`` reads the pooled figures from the store on each call,
and polled this often would load the store the replicas are measured on.) The issue's target:
the last replica within 5 s.

    .venv/bin/python benchmarks/fleet_rollback.py                  # 5 biased, 17 steady: 22 canaries
    .venv/bin/python benchmarks/fleet_rollback.py --steady 0       # the biased ones alone
    .venv/bin/python benchmarks/fleet_rollback.py --store local    # a shared directory, no S3 server
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import train  # noqa: E402  (examples/train.py)

from monitoring.canary import CanaryPool  # noqa: E402
from monitoring.store import LocalStore, S3Store, Store  # noqa: E402
from service.registry.register import register_model  # noqa: E402
from service.serving.deploy import STATE_KEY  # noqa: E402
from tests.onnx_graphs import modified_regressor  # noqa: E402
from tests.s3server import CREDENTIALS, s3_server  # noqa: E402
from tests.servers import looping, vigil_server, wait_for  # noqa: E402

RULES = {"min_requests": 40, "error_rate_increase": 0.02, "p95_latency_ratio": 1.5,
         "fallback_rate_increase": 0.05, "prediction_shift": 0.2}
POLL_SECONDS = 0.02


def canary_shares(listing: dict[str, Any]) -> dict[str, float]:
    """The share of traffic each model's canary gets now, from a replica's ``GET /models``."""
    return {m["name"]: m["canary"]["traffic"] for m in listing["models"] if m.get("canary")}


def build_registry(work: Path, biased: list[str], steady: list[str]) -> tuple[Path, list[dict[str, Any]]]:
    """The diabetes example as stable 1 of every model; canary 2 biased (``biased``) or the same (``steady``)."""
    example = next(e for e in train.EXAMPLES if e.name == "diabetes")
    trained = train.train(example, work / "trained")
    src, reference = trained / "model.onnx", trained / "reference.parquet"
    shifted = modified_regressor(src, work / "biased.onnx", offset=80.0)
    root = work / "models"
    for name in [*biased, *steady]:
        register_model(name, src, reference, target="target", registry=root, version="1")
        register_model(name, shifted if name in biased else src, reference, target="target", registry=root,
                       version="2")
    frame = pd.read_parquet(reference)
    rows = frame.drop(columns=[c for c in ("target", "prediction") if c in frame]).to_dict(orient="records")
    return root, rows


def run(args: argparse.Namespace) -> tuple[dict[str, list[float]], list[float]]:
    """Lag (seconds from the decision) of each replica, per biased model; the store's stamp round trips."""
    biased = [f"biased-{i:02d}" for i in range(args.biased)]
    steady = [f"steady-{i:02d}" for i in range(args.steady)]
    work = Path(tempfile.mkdtemp(prefix="vigil-fleet-rollback-"))
    try:
        registry, rows = build_registry(work, biased, steady)
        canary = {"version": "2", "traffic": 0.5, "sticky": False, "rollback_when": RULES}
        deploy = work / "deploy.yaml"
        deploy.write_text(yaml.safe_dump({"models": {m: {"stable": "1", "canary": canary}
                                                     for m in [*biased, *steady]}}))
        with ExitStack() as stack:
            store: Store
            if args.store == "s3":
                s3 = stack.enter_context(s3_server())
                url = s3.new_bucket()
                env = {**CREDENTIALS, **s3.env(), "VIGIL_STORE": url, "VIGIL_DEPLOY": str(deploy)}
                store = S3Store(url, endpoint_url=s3.endpoint)
            else:  # a directory every replica mounts (a shared volume)
                env = {"VIGIL_STORE": str(work / "shared"), "VIGIL_DEPLOY": str(deploy)}
                store = LocalStore(work / "shared")
            if args.control_seconds is not None:
                env["VIGIL_CONTROL_INTERVAL_SECONDS"] = str(args.control_seconds)
            for name, value in CREDENTIALS.items():
                os.environ.setdefault(name, value)
            replicas = [stack.enter_context(vigil_server(registry, env=env, timeout=180)) for _ in range(3)]
            pool = CanaryPool(store, "benchmark")
            models = [*biased, *steady]

            def traffic(stop: threading.Event) -> None:
                clients = [httpx.Client(base_url=r.url, timeout=30.0) for r in replicas]
                i = 0
                try:
                    while not stop.is_set():
                        model = models[i % len(models)]
                        clients[i % len(clients)].post(
                            "/predict", json={"model": model, "instances": [rows[i % len(rows)]]})
                        i += 1
                finally:
                    for client in clients:
                        client.close()

            seen: dict[tuple[str, int], float] = {}

            def poll(stop: threading.Event) -> None:
                with httpx.Client(timeout=30.0) as client:
                    while not stop.is_set():
                        shares = [canary_shares(client.get(f"{replica.url}/models").json()) for replica in replicas]
                        for model in biased:
                            for r, replica in enumerate(replicas):
                                if (model, r) in seen:
                                    continue
                                if shares[r].get(model) == 0.0:
                                    seen[(model, r)] = time.time()
                        stop.wait(POLL_SECONDS)

            round_trips: list[float] = []

            def probe(stop: threading.Event) -> None:
                """The store's answer time to the one read each replica's control tick needs (a stamp)."""
                while not stop.wait(0.1):
                    started = time.perf_counter()
                    store.stamp(STATE_KEY)
                    round_trips.append(time.perf_counter() - started)

            with ExitStack() as loops:
                loops.enter_context(looping(probe, name="store-probe"))
                for t in range(args.threads):
                    loops.enter_context(looping(traffic, name=f"traffic-{t}"))
                loops.enter_context(looping(poll, name="poll"))
                wait_for(lambda: len(seen) == len(biased) * len(replicas), timeout=300, interval=0.2,
                         what=lambda: f"{len(seen)} of {len(biased) * len(replicas)} replica verdicts seen")
            lags: dict[str, list[float]] = {}
            for model in biased:
                made = pool.decision(model, "1-2")
                assert made.at is not None and made.verdict == "rolled_back", (model, made)
                lags[model] = [seen[(model, r)] - made.at for r in range(len(replicas))]
            return lags, round_trips
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--biased", type=int, default=5, help="models whose canary is rolled back")
    parser.add_argument("--steady", type=int, default=17, help="models with a healthy canary beside them")
    parser.add_argument("--store", choices=("s3", "local"), default="s3",
                        help="the shared store: moto's S3 API server, or one directory every replica mounts")
    parser.add_argument("--threads", type=int, default=3, help="traffic threads")
    parser.add_argument("--control-seconds", type=float, default=None,
                        help="VIGIL_CONTROL_INTERVAL_SECONDS (default: the service's own, 1 s)")
    args = parser.parse_args()
    started = time.time()
    lags, round_trips = run(args)
    every = np.array([lag for model in lags.values() for lag in model])
    last = np.array([max(model) for model in lags.values()])
    print(f"{args.biased} rolled-back canaries beside {args.steady} healthy ones, 3 replicas, {args.store} store, "
          f"control interval {args.control_seconds or 1.0:g} s, {time.time() - started:.0f} s in all")
    print("| | median | max |")
    print("|---|---:|---:|")
    print(f"| decision → a replica says rolled_back (s) | {np.median(every):.2f} | {every.max():.2f} |")
    print(f"| decision → the last replica says so (s) | {np.median(last):.2f} | {last.max():.2f} |")
    trips = np.array(round_trips) * 1000
    print(f"| the store's answer to a stamp (ms) | {np.median(trips):.1f} | {trips.max():.1f} |")
    for model, model_lags in lags.items():
        print(f"  {model}: " + ", ".join(f"{lag:.2f}" for lag in model_lags))


if __name__ == "__main__":
    main()
