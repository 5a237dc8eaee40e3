"""A small closed-loop load generator, run as its own process so the load comes from outside the service.

    python -m tests.reliability.loadgen URL BODIES.json --requests N | --seconds S --concurrency C

Each of C threads keeps one connection and sends bodies in turn until N requests
in total were answered (or S seconds passed). Prints one JSON line: requests,
answered (200), instances answered, 5xx, other statuses, connection errors.
A thread that fails otherwise makes the process exit 1 with its traceback.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
import traceback

import httpx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("bodies")
    parser.add_argument("--requests", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    bodies = [json.dumps(b).encode() for b in json.loads(open(args.bodies).read())]
    sizes = [len(json.loads(b)["instances"]) for b in bodies]
    tickets = itertools.count()
    deadline = time.monotonic() + args.seconds if args.seconds else None
    lock = threading.Lock()
    totals = {"requests": 0, "answered": 0, "instances": 0, "errors5xx": 0, "other": 0, "connection_errors": 0}
    failures: list[str] = []

    def worker() -> None:
        try:
            send()
        except BaseException:  # noqa: BLE001 - reported by the main thread
            failures.append(traceback.format_exc())

    def send() -> None:
        counts = dict.fromkeys(totals, 0)
        with httpx.Client(base_url=args.url, timeout=30, headers={"content-type": "application/json"}) as client:
            while True:
                ticket = next(tickets)
                if args.requests and ticket >= args.requests:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    break
                which = ticket % len(bodies)
                try:
                    response = client.post("/predict", content=bodies[which])
                except httpx.TransportError:
                    counts["connection_errors"] += 1
                    continue
                counts["requests"] += 1
                if response.status_code == 200:
                    counts["answered"] += 1
                    counts["instances"] += sizes[which]
                elif response.status_code >= 500:
                    counts["errors5xx"] += 1
                else:
                    counts["other"] += 1
        with lock:
            for key, value in counts.items():
                totals[key] += value

    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    totals["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(totals), flush=True)
    if failures:
        print("\n".join(failures), file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
