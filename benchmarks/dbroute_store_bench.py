"""What the position store's run_id check costs a read, side by side in one run.

Before issue 14, ``RedisPositionStore.get`` read the repository's position,
the floor and the epoch marker's existence in one pipeline (GET, GET,
EXISTS). Now it is one script that also compares the marker with the
server's ``run_id`` (``INFO server``), so a Redis restarted from its AOF (or
failed over) is never trusted without a new floor. This times both against
one throwaway redis-server on a free port (its own temp dir), in alternating
rounds, over 100 repositories that have positions.

Usage: ``python benchmarks/dbroute_store_bench.py [--reads N] [--rounds R] [--json]``
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time

import redis
from regmw_dbroute.lsn import to_key
from regmw_dbroute.store import RedisPositionStore
from _common import free_port


def pipeline_get(client: redis.Redis, store: RedisPositionStore, repository: str) -> list:
    """The previous ``get``: one pipeline, no run_id check."""
    pipe = client.pipeline(transaction=False)
    pipe.get(store.key(repository))
    pipe.get(store._floor_key)
    pipe.exists(store._epoch_key)
    return pipe.execute()


def timed(fn, repositories: list[str], reads: int) -> list[float]:
    samples = []
    for index in range(reads):
        started = time.perf_counter()
        fn(repositories[index % len(repositories)])
        samples.append(time.perf_counter() - started)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="regmw-store-bench-")
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", workdir],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        store = RedisPositionStore(client, lambda key: f"bench:{key}")
        store.initialize(1, 600)
        repositories = [f"group/project-{index}" for index in range(100)]
        for index, repository in enumerate(repositories):
            client.set(store.key(repository), to_key(1000 + index), px=600_000)
        results: dict[str, list[float]] = {"pipeline": [], "script": []}
        for _ in range(args.rounds):
            results["pipeline"] += timed(lambda repo: pipeline_get(client, store, repo), repositories, args.reads)
            results["script"] += timed(store.get, repositories, args.reads)
        summary = {
            name: {"p50_us": round(statistics.median(samples) * 1e6, 1),
                   "p99_us": round(statistics.quantiles(samples, n=100)[98] * 1e6, 1),
                   "reads": len(samples)}
            for name, samples in results.items()
        }
        summary["ratio_p50"] = round(summary["script"]["p50_us"] / summary["pipeline"]["p50_us"], 2)
        print(f"{'get':<44} {'p50 µs':>8} {'p99 µs':>8}")
        print(f"{'pipeline GET, GET, EXISTS (before)':<44} {summary['pipeline']['p50_us']:>8} "
              f"{summary['pipeline']['p99_us']:>8}")
        print(f"{'script with the run_id check (now)':<44} {summary['script']['p50_us']:>8} "
              f"{summary['script']['p99_us']:>8}")
        print(f"script / pipeline, p50: {summary['ratio_p50']}")
        if args.json:
            print(json.dumps(summary))
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
