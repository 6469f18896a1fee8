"""Training-reader benchmark: records/s reading a RAW datasource into numpy, against a bare aiokafka consumer.

Run: `python benchmarks/training_reader.py [--records 500000] [--size 784] [--partitions 1] [--runs 3]`

Starts its own Tansu broker (as the embedded stack does), writes N RAW records of SIZE bytes (Fashion-MNIST
sized: 28x28 uint8, one-byte label keys) to a fresh topic, then times, run after run (interleaved):
  1. bare: an aiokafka consumer with assigned partitions and the same fetch settings, `getmany` until it
     has seen all N records, counting them (the limit: no copy, no decoding);
  2. read_ranges: the training job's reader, returning the N values and keys;
  3. read_datasource: read_ranges + the vectorised RAW decode into (N, 28, 28) and (N,) arrays.
No consumer-group join is in any timing. One untimed warm-up round first (--warmup 0 to skip it): on this
VM the first touch of memory costs up to ~2.5 ms per MB, which only the run that first grows the process
would pay. Prints the median of the runs and the ratios to bare.
Targets (issue 3, 2-core machine): >= 100,000 records/s and >= 0.7 of the bare consumer.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaProducer, TopicPartition

from tierflow.deploy import services
from tierflow.streams import kafka as kio
from tierflow.streams.settings import KafkaSettings
from tierflow.streams.topics import TopicSpec, ensure_topics
from tierflow.tiers.reader import FETCH_OPTIONS, read_datasource, read_ranges

TOPIC = "bench.training"


async def write(kafka: KafkaSettings, n: int, size: int, partitions: int) -> list[dict[str, Any]]:
    """N records (a pool of distinct random samples, cycled) spread round-robin; returns their ranges."""
    await ensure_topics(kafka, extra=[TopicSpec(TOPIC, partitions, -1)])
    rng = np.random.default_rng(0)
    pool = [row.tobytes() for row in rng.integers(0, 256, size=(1000, size), dtype=np.uint8)]
    p: AIOKafkaProducer = kio.producer(kafka, linger_ms=5, max_batch_size=1024 * 1024)
    await p.start()
    counts = [0] * partitions
    try:
        sent = 0
        futures = []
        while sent < n:
            partition = (sent // 1000) % partitions
            batch = p.create_batch()
            while sent < n and batch.append(key=bytes([sent % 10]), value=pool[sent % len(pool)],
                                            timestamp=None) is not None:
                sent += 1
                counts[partition] += 1
            batch.close()
            futures.append(await p.send_batch(batch, TOPIC, partition=partition))
        await asyncio.gather(*futures)
    finally:
        await p.stop()
    return [{"topic": TOPIC, "partition": i, "start": 0, "end": c} for i, c in enumerate(counts) if c]


async def bare(kafka: KafkaSettings, ranges: list[dict[str, Any]]) -> float:
    c = kio.consumer(kafka, **FETCH_OPTIONS)
    await c.start()
    try:
        tps = [TopicPartition(r["topic"], r["partition"]) for r in ranges]
        c.assign(tps)
        for tp, r in zip(tps, ranges, strict=True):
            c.seek(tp, r["start"])
        total = sum(r["end"] - r["start"] for r in ranges)
        started = time.perf_counter()
        seen = 0
        while seen < total:
            batch = await c.getmany(timeout_ms=1000)
            seen += sum(len(records) for records in batch.values())
        return total / (time.perf_counter() - started)
    finally:
        await c.stop()


async def reader(kafka: KafkaSettings, ranges: list[dict[str, Any]]) -> float:
    total = sum(r["end"] - r["start"] for r in ranges)
    started = time.perf_counter()
    values, _ = await read_ranges(kafka, ranges)
    elapsed = time.perf_counter() - started
    assert len(values) == total, (len(values), total)
    return total / elapsed


async def reader_decode(kafka: KafkaSettings, ranges: list[dict[str, Any]], size: int) -> float:
    side = int(size ** 0.5)
    reshape = f"{side} {side}" if side * side == size else str(size)
    source = {"ranges": ranges, "input_format": "RAW",
              "input_config": {"data_type": "uint8", "label_type": "uint8", "data_reshape": reshape}}
    total = sum(r["end"] - r["start"] for r in ranges)
    started = time.perf_counter()
    x, y = await read_datasource(kafka, source)
    elapsed = time.perf_counter() - started
    assert x.shape[0] == total and y.shape == (total,)
    return total / elapsed


async def main(args: argparse.Namespace) -> int:
    port = services.free_port()
    log = Path(tempfile.mkdtemp(prefix="tierflow-bench-")) / "tansu.log"
    broker = services.spawn(services.tansu_spec(port), log)
    try:
        services.wait_for_port(port, deadline_s=20, proc=broker, what="Tansu broker")
        kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}", topic_prefix="bench")
        started = time.perf_counter()
        ranges = await write(kafka, args.records, args.size, args.partitions)
        print(f"wrote {args.records:,} records of {args.size} bytes to {args.partitions} partition(s) in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        results: dict[str, list[float]] = {"bare aiokafka": [], "read_ranges": [], "read_datasource": []}
        for _ in range(args.warmup):
            # Untimed: on this VM the host takes back guest memory a process freed, so the first touch of
            # memory costs up to ~2.5 ms per MB; whichever run first grows the process would pay it alone.
            warm = (await bare(kafka, ranges), await reader(kafka, ranges),
                    await reader_decode(kafka, ranges, args.size))
            print("warm-up: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in zip(results, warm, strict=True)), flush=True)
        for run in range(1, args.runs + 1):
            results["bare aiokafka"].append(await bare(kafka, ranges))
            results["read_ranges"].append(await reader(kafka, ranges))
            results["read_datasource"].append(await reader_decode(kafka, ranges, args.size))
            print(f"run {run}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in results.items()), flush=True)
        medians = {k: statistics.median(v) for k, v in results.items()}
        base = medians["bare aiokafka"]
        print(f"\nmedian of {args.runs} runs, {args.records:,} records of {args.size} bytes:")
        for name, value in medians.items():
            print(f"  {name:<16} {value:>10,.0f} records/s   ratio to bare {value / base:.2f}")
        ok = medians["read_datasource"] >= 100_000 and medians["read_datasource"] / base >= 0.7
        print(f"targets (>= 100,000 records/s and >= 0.7 of bare, read + decode): {'met' if ok else 'NOT met'}")
        return 0
    finally:
        services.stop(broker)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--size", type=int, default=784)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    sys.exit(asyncio.run(main(parser.parse_args())))
