"""The demo's lifecycle against a running API and broker: the six steps of Kafka-ML's user manual.

`Demo.run()` is called by the demo's command (deploy/demo.py) once a stack runs. Everything goes through the
public API (deploy/client.py) and Kafka, as a user's own scripts would: register the chain and a single model,
deploy them, send the training data with a Kafka-ML style sink, watch training per epoch and exit, serve the
chain tier by tier, stream the held-out inputs as a Kafka-ML client (one raw sample per record) and read the
answers (streams/wire.py). This process never imports TensorFlow.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import numpy as np

from tierflow.deploy.client import ApiClient, ApiClientError
from tierflow.deploy.demo_data import (
    CHAIN,
    CLOUD_CODE,
    EDGE_CODE,
    FOG_CODE,
    SINGLE_CODE,
    DemoData,
    DemoError,
    DemoOptions,
    load_data,
)
from tierflow.deploy.demo_summary import Answered, best_reachable, number, served, summarize
from tierflow.streams.exits import Target, parse_target
from tierflow.streams.settings import KafkaSettings, Settings
from tierflow.streams.statuses import FINAL_STATUSES, ResultStatus

JSON = dict[str, Any]


def say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


class Demo:
    """The lifecycle against a running API and broker; `run()` returns the summary."""

    def __init__(self, api: ApiClient, settings: Settings, options: DemoOptions, *, out: TextIO = sys.stdout,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.api = api
        self.settings = settings
        self.options = options
        self.out = out
        self.clock = clock
        self.sleep = sleep
        self.tag = uuid.uuid4().hex[:4]
        self.inference_id: int | None = None
        #: The target the user asked for, when the decider refused it and the demo served a relaxed one.
        self.requested_target: JSON | None = None

    def step(self, n: int, text: str) -> None:
        say(self.out, f"\n[{n}/6] {text}")

    def run(self) -> JSON:
        started = self.clock()
        data = load_data(self.options)
        models = self.register()
        deployment = self.deploy(models)
        self.send(data, deployment)
        results = self.train(deployment, models)
        inference = self.serve(results[models["edge"]])
        summary = self.infer(data, inference, results, models)
        summary.update(dataset=data.name, deployment_id=deployment["id"], inference_id=inference["id"],
                       entry_result_id=inference["result_id"], input_topic=inference["input_topic"],
                       output_topic=inference["output_topic"], limit=self.options.limit, seed=self.options.seed,
                       seconds=round(self.clock() - started, 1))
        return summary

    # 1. models and configuration
    def register(self) -> dict[str, int]:
        self.step(1, "registering the edge -> fog -> cloud chain and one non-distributed model")
        ids: dict[str, int] = {}
        for name, code, upper in (("cloud", CLOUD_CODE, None), ("fog", FOG_CODE, "cloud"),
                                  ("edge", EDGE_CODE, "fog"), ("single", SINGLE_CODE, None)):
            body: JSON = {"name": f"demo-{self.tag}-{name}", "code": code, "distributed": name != "single",
                          "description": f"tierflow demo: {name}"}
            if upper:
                body["upper_id"] = ids[upper]
            _, model = self.api.post("/models", body)
            ids[name] = int(model["id"])
            link = f", upper model {ids[upper]}" if upper else ""
            say(self.out, f"  model {model['id']:>3}  {body['name']:<18} (built and checked in the sandbox{link})")
        return ids

    def deploy(self, models: dict[str, int]) -> JSON:
        _, conf = self.api.post("/configurations", {"name": f"demo-{self.tag}",
                                                    "model_ids": [models["cloud"], models["single"]]})
        say(self.out, f"  configuration {conf['id']}: the chain (by its top model) and the single model")
        seeded = "" if self.options.seed is None else f", seed {self.options.seed}: reproducible"
        self.step(2, f"deploying configuration {conf['id']} for training "
                     f"({self.options.epochs} epochs, batch {self.options.batch}{seeded})")
        body: JSON = {"configuration_id": conf["id"], "batch": self.options.batch,
                      "fit_options": {"epochs": self.options.epochs}}
        if self.options.seed is not None:
            body["seed"] = self.options.seed
        _, dep = self.api.post("/deployments", body)
        say(self.out, f"  deployment {dep['id']}: its results wait for a datasource")
        return dep

    # 2. training data
    def send(self, data: DemoData, deployment: JSON) -> None:
        from tierflow.tiers.send_cli import ProgressBar
        from tierflow.tiers.sinks import RawSink

        self.step(3, f"sending {len(data.x_train):,} training samples of {data.name} through Kafka "
                     f"({len(data.x_test):,} held out for inference)")
        topic = f"tierflow.demo-{self.tag}.train"
        sink = RawSink(self.settings.kafka.bootstrap_servers, topic, int(deployment["id"]), data_reshape="28 28",
                       validation_rate=0.1, test_rate=0.1, description=data.description,
                       control_topic=self.settings.kafka.control_topic)
        bar = ProgressBar(len(data.x_train), stream=self.out, label=f"  {topic} ")
        try:
            for start in range(0, len(data.x_train), 1000):
                sink.send_many(data.x_train[start:start + 1000], data.y_train[start:start + 1000])
                bar.update(min(start + 1000, len(data.x_train)))
            bar.finish(len(data.x_train))
            announcement = sink.close()
        except BaseException:
            sink.abort()
            raise
        say(self.out, f"  announced {announcement['topic']} to deployment {deployment['id']} "
                      "(validation 10%, test 10%)")

    # 3. training, watched live
    def train(self, deployment: JSON, models: dict[str, int]) -> dict[int, JSON]:
        self.step(4, "training (progress per epoch and exit, as the workloads report it)")
        names = {v: k for k, v in models.items()}
        seen_epochs: dict[int, int] = {}
        seen_status: dict[int, str] = {}
        deadline = self.clock() + self.options.timeout_s
        while True:
            _, page = self.api.get(f"/deployments/{deployment['id']}/results")
            results = {int(r["model_id"]): r for r in page["items"]}
            for model_id, r in sorted(results.items(), key=lambda kv: list(names).index(kv[0])):
                name = names.get(model_id, str(model_id))
                if seen_status.get(r["id"]) != r["status"]:
                    seen_status[r["id"]] = r["status"]
                    if r["status"] not in (ResultStatus.CREATED, ResultStatus.DEPLOYED):
                        say(self.out, f"  {name:<6} {r['status']}")
                for h in (r.get("history") or [])[seen_epochs.get(r["id"], 0):]:
                    say(self.out, f"  {name:<6} epoch {h.get('epoch', '?')}/{self.options.epochs}  "
                                  f"loss {number(h.get('loss'))}  accuracy {number(h.get('accuracy'))}  "
                                  f"val_loss {number(h.get('val_loss'))}  "
                                  f"val_accuracy {number(h.get('val_accuracy'))}")
                seen_epochs[r["id"]] = len(r.get("history") or [])
            statuses = {r["status"] for r in results.values()}
            if results and statuses <= FINAL_STATUSES:
                break
            if self.clock() > deadline:
                raise DemoError(f"training did not finish within {self.options.timeout_s:.0f} s "
                                f"(statuses: {', '.join(sorted(statuses))})")
            self.sleep(0.5)
        failed = [f"{names.get(m, m)}: {r.get('error') or r['status']}" for m, r in results.items()
                  if r["status"] != ResultStatus.FINISHED]
        if failed:
            raise DemoError("training did not finish: " + "; ".join(failed))
        return results

    # 4. inference
    def serve(self, entry: JSON) -> JSON:
        body: JSON = {"result_id": entry["id"], "input_topic": f"tierflow.demo-{self.tag}.in",
                      "output_topic": f"tierflow.demo-{self.tag}.out"}
        if self.options.limit is not None:
            self.step(5, f"serving the trained chain tier by tier (typed limit {self.options.limit}: a tier "
                         "answers when its highest probability reaches it, otherwise it forwards the tensor up)")
            _, inference = self.api.post("/inferences", {**body, "limit": self.options.limit})
        else:
            kind, value = self.options.target
            self.step(5, f"serving the trained chain tier by tier from the target {kind} {value:g} (tierflow "
                         "chooses each tier's limit on its calibrated confidence from the chain's exit frontier, "
                         "met with 90% confidence over the validation samples)")
            inference = self._serve_target(entry, body, parse_target({kind: value}))
        self.inference_id = int(inference["id"])
        self._say_choice(inference)
        for t in inference["tiers"]:
            routes = f"answers -> {inference['output_topic']}"
            if t.get("upper_topic"):
                routes += f", forwards -> {t['upper_topic']}"
            say(self.out, f"  tier {t['index']} {t['model_name']:<18} reads {t['input_topic']}; {routes}")
        return dict(inference)

    def _serve_target(self, entry: JSON, body: JSON, target: Target) -> JSON:
        """Ask for the target; when the decider refuses it (no limits meet it, or the validation split is too
        small to certify it: the digits give ~140 validation samples), say why and serve the strictest target
        of the same kind it certifies, read from the chain's frontier, rather than stop the demo."""
        try:
            _, inference = self.api.post("/inferences", {**body, "target": target.to_json()})
            return dict(inference)
        except ApiClientError as exc:
            if exc.status != 422 or not (exc.field or "").startswith("target"):
                raise
            refusal = exc.message
        _, exits = self.api.get(f"/results/{entry['id']}/exits")
        record = exits.get("frontier")
        chain = list(exits.get("chain") or [entry["id"]])
        relaxed = None if record is None else best_reachable(record, target, chain.index(entry["id"]))
        if relaxed is None or relaxed == target.value:
            raise DemoError(f"the target {target.kind} {target.value:g} was refused: {refusal}")
        say(self.out, f"  refused: {refusal}")
        say(self.out, f"  serving the strictest target the frontier certifies instead: {target.kind} {relaxed:g}")
        self.requested_target = target.to_json()
        _, inference = self.api.post("/inferences", {**body, "target": {target.kind: relaxed}})
        return dict(inference)

    def _say_choice(self, inference: JSON) -> None:
        p = inference.get("predicted")
        if not p:
            return
        tiers = inference["tiers"]
        limits = ", ".join(f"{t['model_name']} {t['limit']:g}" for t in tiers if not t.get("top"))
        shares = ", ".join(f"{t['model_name']} {share:.1%}" for t, share in zip(tiers, p["shares"], strict=False))
        say(self.out, f"  chosen limits (calibrated confidence): {limits}")
        say(self.out, f"  predicted on {p['n']} validation samples: answered {shares}; cascade accuracy "
                      f"{p['accuracy']:.3f} (>= {p['accuracy_lower']:.3f} with 90% confidence; the top exit alone "
                      f"{p['top_accuracy']:.3f}, drop <= {p['accuracy_drop_upper']:.4f})")

    def infer(self, data: DemoData, inference: JSON, results: dict[int, JSON], models: dict[str, int]) -> JSON:
        self.step(6, f"streaming {len(data.x_test):,} held-out inputs as a Kafka-ML client would "
                     f"(one raw float32 sample per record, {self.options.rate:g}/s) and reading the answers")
        offsets, answered, started = asyncio.run(self._stream(data.x_test, inference))
        exits = [(name, _test_accuracy(results[models[name]])) for name in CHAIN]
        summary = summarize(exits=exits, single=("single", _test_accuracy(results[models["single"]])),
                            offsets=offsets, labels=data.y_test.tolist(), answered=answered, started_at=started,
                            tiers=len(inference["tiers"]), serving=served(inference, self.requested_target))
        return summary

    async def _stream(self, x: np.ndarray[Any, Any], inference: JSON
                      ) -> tuple[list[tuple[int, int]], Answered, float]:
        from aiokafka import TopicPartition

        from tierflow.streams import kafka as kio
        from tierflow.streams import wire
        from tierflow.tiers.send_cli import ProgressBar

        kafka = self.settings.kafka
        producer = kio.producer(kafka)
        consumer = kio.consumer(kafka)
        await producer.start()
        await consumer.start()
        answered = Answered()
        try:
            topics = [inference["output_topic"], *(t["input_topic"] for t in inference["tiers"])]
            counts = await _wait_for_topics(kafka, topics, self.clock, self.options.timeout_s)
            tps = [TopicPartition(inference["output_topic"], p) for p in range(counts[inference["output_topic"]])]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            await self._warm_up(producer, consumer, inference, x[0])
            bar = ProgressBar(len(x), stream=self.out, label="  answered ")
            started = self.clock()
            offsets: list[tuple[int, int]] = []
            interval = 1.0 / self.options.rate if self.options.rate > 0 else 0.0
            pending = []
            for i, sample in enumerate(x):
                pending.append(await producer.send(inference["input_topic"], np.ascontiguousarray(sample).tobytes()))
                due = started + (i + 1) * interval
                if due - self.clock() > 0.005:
                    await self._drain_answers(consumer, answered, wire, inference["input_topic"], timeout_ms=0)
                    await asyncio.sleep(max(0.0, due - self.clock()))  # pacing the client, not synchronising
            offsets = [(m.partition, m.offset) for m in await asyncio.gather(*pending)]
            wanted = set(offsets)
            deadline = self.clock() + self.options.timeout_s
            while not wanted <= answered.by_offset.keys():
                await self._drain_answers(consumer, answered, wire, inference["input_topic"], timeout_ms=200)
                bar.update(len(wanted & answered.by_offset.keys()))
                if self.clock() > deadline:
                    break
            bar.finish(len(wanted & answered.by_offset.keys()))
            return offsets, answered, started
        finally:
            await consumer.stop()
            await producer.stop()

    async def _warm_up(self, producer: Any, consumer: Any, inference: JSON, sample: np.ndarray[Any, Any]) -> None:
        """Wait until every tier has loaded its model and answers, so that latencies measure serving, not start-up:
        one probe per tier, written to that tier's input topic (a raw sample for the first tier, a tensor of the
        demo's 64 features above it), is answered with an origin naming that topic."""
        from tierflow.streams import wire

        started = self.clock()
        probes: dict[str, int] = {}
        for t in inference["tiers"]:
            if t["index"] == 0:
                value, headers = np.ascontiguousarray(sample).tobytes(), None
            else:
                value, headers = wire.encode_tensor(np.zeros((1, 64), dtype=np.float32))
            await producer.send_and_wait(t["input_topic"], value, headers=headers)
            probes[t["input_topic"]] = t["index"]
        say(self.out, f"  waiting for the {len(probes)} tiers to load their models (one probe each) ...")
        deadline = started + self.options.timeout_s
        while probes:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batch.values():
                for record in records:
                    with contextlib.suppress(wire.WireError):
                        for a in wire.read_answers(record.value):
                            if a.origin[0] in probes:
                                index = probes.pop(a.origin[0])
                                say(self.out, f"  tier {index} answers ({self.clock() - started:.1f} s)")
            if self.clock() > deadline:
                raise DemoError(f"tiers {sorted(probes.values())} did not answer within "
                                f"{self.options.timeout_s:.0f} s; see their logs under <TIERFLOW_HOME>/workloads")

    async def _drain_answers(self, consumer: Any, answered: Answered, wire: Any, topic: str, *,
                             timeout_ms: int) -> None:
        batch = await consumer.getmany(timeout_ms=timeout_ms, max_records=5000)
        now = self.clock()
        for records in batch.values():
            for record in records:
                try:
                    answers = wire.read_answers(record.value)
                except wire.WireError:
                    continue
                for a in answers:
                    if a.origin[0] == topic:  # not a warm-up probe
                        answered.add((a.origin[1], a.origin[2]), a.tier, a.cls, a.latency_ms, now)


def _test_accuracy(result: JSON) -> float | None:
    test = (result.get("metrics") or {}).get("test") or {}
    acc = test.get("accuracy")
    return float(acc) if isinstance(acc, int | float) else None


async def _wait_for_topics(kafka: KafkaSettings, topics: Sequence[str], clock: Callable[[], float],
                           timeout_s: float) -> dict[str, int]:
    """The orchestrator creates the inference's topics explicitly; wait until all of them exist before writing
    to or assigning any (the embedded broker auto-creates a topic that is written to or asked about before it
    exists, with its own defaults, racing the orchestrator's creation). Their partition counts, as the broker
    describes them (a consumer's cached metadata may not know a topic that is minutes old)."""
    from tierflow.streams.topics import admin_client, partition_counts

    deadline = clock() + timeout_s
    admin = admin_client(kafka)
    await admin.start()
    try:
        while missing := sorted(set(topics) - set(await admin.list_topics())):
            if clock() > deadline:
                raise DemoError(f"topics {', '.join(missing)} were not created within {timeout_s:.0f} s; is the "
                                "worker's orchestrator running? (`tierflow status`)")
            await asyncio.sleep(0.2)
        return await partition_counts(admin, list(topics))
    finally:
        await admin.close()
