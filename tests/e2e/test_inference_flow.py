"""Inference end to end through the orchestrator: the trained chain (shared with the training e2e tests) is
deployed with `POST /inferences`, its tiers run as local workloads started by the orchestrator (each one
fetching its configuration and its checksum-verified sub-model from the API), a Kafka-ML client (kafka-python,
raw float32 bytes in, `{"values": ...}` out) gets an answer for every input, the API shows predictions and
statistics, and stop/delete remove the workloads.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np
import orjson
import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import Env

pytestmark = pytest.mark.slow


Position = tuple[int, int]  # an input's (partition, offset)


def kafka_ml_client(servers: str, input_topic: str, output_topic: str, x: np.ndarray, timeout: float
                    ) -> tuple[list[Position], dict[Position, dict[str, Any]]]:
    """What a Kafka-ML inference client does: send each sample's raw bytes, read JSON answers back. Returns the
    inputs' positions and the answers by input position."""
    from kafka import KafkaConsumer, KafkaProducer

    producer = KafkaProducer(bootstrap_servers=servers, enable_idempotence=False, acks="all")
    futures = [producer.send(input_topic, value=sample.tobytes()) for sample in x]
    producer.flush()
    offsets = [(m.partition, m.offset) for m in (f.get(timeout=30) for f in futures)]
    producer.close()
    # kafka-python's default 10 s session timeout would make the group join take 5 s on Tansu.
    consumer = KafkaConsumer(output_topic, bootstrap_servers=servers, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=f"kafka-ml-client-{uuid.uuid4().hex[:6]}",
                             session_timeout_ms=2000, heartbeat_interval_ms=500)
    answers: dict[Position, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(answers) < len(offsets) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                for record in records:
                    answer = orjson.loads(record.value)
                    answers[(answer["origin"]["partition"], answer["origin"]["offset"])] = answer
    finally:
        consumer.close()
    return offsets, answers


async def tier_workloads(env: Env, inference_id: int) -> list[str]:
    return sorted(w.name for w in await env.launcher.list("inference")
                  if w.name.startswith(f"tierflow-infer-{inference_id}-") and not w.finished)


async def test_a_trained_chain_serves_a_kafka_ml_client_through_launched_tiers(trained: dict[str, Any],
                                                                               env: Env) -> None:
    c = env.client
    by_model = {r["model_id"]: r for r in trained["results"]}
    edge = by_model[env.models["edge"]]
    tag = uuid.uuid4().hex[:6]
    r = await c.post("/inferences", json={"result_id": edge["id"], "input_topic": f"in-{tag}",
                                          "output_topic": f"out-{tag}", "limit": 0.9})
    assert r.status == 201, await r.text()
    inference = await r.json()
    assert [t["model_name"] for t in inference["tiers"]] == ["edge", "fog", "cloud"]
    # The datasource's input_config was float32 28x28: Kafka-ML's client sends x_test[i].tobytes().
    await wait_until(lambda: _count(tier_workloads(env, inference["id"]), 3), timeout=60,
                     what="three tier workloads launched")
    # Forked from the tier zygote, as the embedded stack's tiers are.
    for name in await tier_workloads(env, inference["id"]):
        assert orjson.loads((env.launcher.workload_dir(name) / "spec.json").read_bytes())["forked"] is True

    n = 400
    x, y = trained["x"][:n], trained["y"][:n]
    offsets, answers = await asyncio.to_thread(kafka_ml_client, env.settings.kafka.bootstrap_servers,
                                               f"in-{tag}", f"out-{tag}", x, 180.0)
    assert set(answers) == set(offsets), f"{len(set(offsets) - set(answers))} of {n} inputs unanswered"
    assert len({p for p, _ in offsets}) == 4  # the orchestrator created the input topic with 4 partitions
    classes = np.array([answers[o]["class"] for o in offsets])
    assert all(np.argmax(answers[o]["values"]) == answers[o]["class"] for o in offsets)
    accuracy = float((classes == y).mean())
    tiers = np.array([answers[o]["tier"] for o in offsets])
    shares = [float((tiers == k).mean()) for k in range(3)]
    print(f"\ncascade accuracy {accuracy:.3f} on {n} inputs, answered per tier {shares}")
    assert accuracy >= 0.8
    assert all(answers[o]["confidence"] >= 0.9 for o in offsets if answers[o]["tier"] < 2)

    predictions = await (await c.get(f"/inferences/{inference['id']}/predictions?limit=50")).json()
    assert len(predictions["items"]) == 50
    assert {p["tier"] for p in predictions["items"]} <= {0, 1, 2}
    stats = await (await c.get(f"/inferences/{inference['id']}/stats")).json()
    assert stats["window"] == n
    assert [t["answered"] for t in stats["tiers"]] == [int((tiers == k).sum()) for k in range(3)]
    assert stats["latency_ms"]["p50"] is not None and stats["unreachable"] == []

    async def drained() -> bool:  # every tier committed what it consumed: no backlog left
        body = await (await c.get(f"/inferences/{inference['id']}/stats")).json()
        return [t["lag"] for t in body["tiers"]] == [0, 0, 0]

    await wait_until(drained, timeout=30, what="every tier's lag back to 0")

    r = await c.post(f"/inferences/{inference['id']}/stop")
    assert r.status == 200, await r.text()
    await wait_until(lambda: _count(tier_workloads(env, inference["id"]), 0), timeout=60,
                     what="the stopped inference's workloads removed")
    r = await c.delete(f"/inferences/{inference['id']}")
    assert r.status in (200, 204), await r.text()
    assert (await c.get(f"/inferences/{inference['id']}")).status == 404


async def test_a_single_model_is_served_by_one_tier_and_delete_removes_it(trained: dict[str, Any],
                                                                         env: Env) -> None:
    c = env.client
    single = next(r for r in trained["results"] if r["model_id"] == env.models["single"])
    tag = uuid.uuid4().hex[:6]
    r = await c.post("/inferences", json={"result_id": single["id"], "input_topic": f"in-{tag}",
                                          "output_topic": f"out-{tag}"})
    assert r.status == 201, await r.text()
    inference = await r.json()
    assert len(inference["tiers"]) == 1 and inference["tiers"][0]["upper_topic"] in (None, "")
    offsets, answers = await asyncio.to_thread(kafka_ml_client, env.settings.kafka.bootstrap_servers,
                                               f"in-{tag}", f"out-{tag}", trained["x"][:50], 180.0)
    assert set(answers) == set(offsets) and {a["tier"] for a in answers.values()} == {0}
    await wait_until(lambda: _count(tier_workloads(env, inference["id"]), 1), what="the tier workload running")
    r = await c.delete(f"/inferences/{inference['id']}")  # deleting a running inference stops it too
    assert r.status in (200, 204), await r.text()
    await wait_until(lambda: _count(tier_workloads(env, inference["id"]), 0), timeout=60,
                     what="the deleted inference's workload removed")


async def _count(names: Any, expected: int) -> bool:
    return len(await names) == expected
