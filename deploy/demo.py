"""`tierflow demo`: the whole lifecycle of Kafka-ML's user manual, on the embedded stack, in one command.

Registers an edge -> fog -> cloud chain (each sub-model with its own early exit) and one ordinary model, groups
them in a configuration, deploys it for training, sends the training data through Kafka with a Kafka-ML style
sink, shows training progress live per epoch and exit, serves the trained chain tier by tier, streams a held-out
test split through the tiers as a Kafka-ML inference client would (one raw sample per record), and prints what
happened: accuracy per exit and of the cascade, the share of inputs each tier answered, latency and throughput.

The stack is started (detached) when none is running for TIERFLOW_HOME and stopped at the end unless `--keep`;
a stack that was already running is left running (the demo only stops its own inference). With both
TIERFLOW_API_URL and KAFKA_BOOTSTRAP_SERVERS set, the demo runs against that deployment (a cluster) instead.
Everything goes through the public API and Kafka, as a user's own scripts would: the demo process never imports
TensorFlow.
`--json PATH` writes the summary for scripts and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from tierflow.api.outputs import percentile
from tierflow.deploy.client import ApiClient, ApiClientError
from tierflow.streams.cli_args import non_negative, positive_int
from tierflow.streams.settings import KafkaSettings, Settings
from tierflow.streams.stack_state import read_stack_state, resolve_home

JSON = dict[str, Any]

#: The demo's models, in the form Kafka-ML users write them (`tf` and `keras` are in scope). The edge runs a
#: small convolution on the device and exits early; the fog and the cloud refine its features.
EDGE_CODE = """\
inputs = keras.Input(shape=(28, 28, 1), name='edge_in')
x = keras.layers.Conv2D(16, kernel_size=(3, 3), activation='relu', name='edge_conv')(inputs)
x = keras.layers.MaxPooling2D(pool_size=(2, 2), name='edge_pool')(x)
x = keras.layers.Flatten(name='edge_flat')(x)
to_fog = keras.layers.Dense(64, activation='relu', name='edge_to_fog')(x)
edge_exit = keras.layers.Dense(10, activation='softmax', name='edge_exit')(to_fog)
edge_model = keras.Model(inputs=[inputs], outputs=[to_fog, edge_exit], name='demo_edge')
"""
FOG_CODE = """\
inputs = keras.Input(shape=(64,), name='fog_in')
to_cloud = keras.layers.Dense(64, activation='relu', name='fog_to_cloud')(inputs)
fog_exit = keras.layers.Dense(10, activation='softmax', name='fog_exit')(to_cloud)
fog_model = keras.Model(inputs=[inputs], outputs=[to_cloud, fog_exit], name='demo_fog')
"""
CLOUD_CODE = """\
inputs = keras.Input(shape=(64,), name='cloud_in')
x = keras.layers.Dense(128, activation='relu', name='cloud_hidden')(inputs)
x = keras.layers.Dropout(0.2, name='cloud_dropout')(x)
cloud_exit = keras.layers.Dense(10, activation='softmax', name='cloud_exit')(x)
cloud_model = keras.Model(inputs=[inputs], outputs=[cloud_exit], name='demo_cloud')
"""
SINGLE_CODE = """\
model = keras.Sequential([
    keras.Input(shape=(28, 28)),
    keras.layers.Flatten(),
    keras.layers.Dense(128, activation='relu'),
    keras.layers.Dense(10, activation='softmax'),
])
"""
CHAIN = ("edge", "fog", "cloud")


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


@dataclass(frozen=True)
class DemoOptions:
    dataset: str = "auto"
    epochs: int = 5
    batch: int = 64
    limit: float = 0.8
    train_samples: int = 20000
    test_samples: int = 2000
    holdout: float = 0.2
    rate: float = 500.0
    engine: str = "keras"
    timeout_s: float = 600.0
    seed: int = 1


# -- the data ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoData:
    name: str
    description: str
    x_train: np.ndarray[Any, Any]
    y_train: np.ndarray[Any, Any]
    x_test: np.ndarray[Any, Any]
    y_test: np.ndarray[Any, Any]


def choose_dataset(name: str, fashion_available: bool) -> str:
    """`auto` is Fashion-MNIST when its Debian package is installed, else the scikit-learn digits."""
    if name != "auto":
        return name
    return "fashion-mnist" if fashion_available else "digits"


def split_holdout(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], *, holdout: float, train_cap: int,
                  test_cap: int, seed: int) -> tuple[np.ndarray[Any, Any], ...]:
    """Shuffle, keep `holdout` of the samples (at most `test_cap`) for inference and the rest (at most
    `train_cap`) for training; images become float32 in [0, 1] (the models' input)."""
    if not 0 < holdout < 1:
        raise DemoError(f"--holdout {holdout} must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = min(test_cap, max(1, round(len(x) * holdout)))
    test, train = order[:n_test], order[n_test:][:train_cap]
    if len(train) < 10:
        raise DemoError(f"{len(x)} samples leave {len(train)} for training: not enough")
    xf = x.astype(np.float32)
    if xf.max() > 1.0:  # 0..255 (Fashion-MNIST) or other unscaled pixels
        xf /= 255.0 if xf.max() > 16 else float(xf.max())
    return xf[train], y[train].astype(np.uint8), xf[test], y[test].astype(np.int64)


def load_data(options: DemoOptions) -> DemoData:
    from tierflow.tiers import datasets

    name = choose_dataset(options.dataset, datasets.FASHION_MNIST_DIR.exists())
    try:
        data = datasets.load(name)
    except datasets.DatasetError as exc:
        raise DemoError(str(exc)) from None
    if data.x.shape[1:] != (28, 28):
        raise DemoError(f"the demo's models take 28x28 images; {data.name} has samples of shape {data.x.shape[1:]}")
    x_train, y_train, x_test, y_test = split_holdout(data.x, data.y, holdout=options.holdout,
                                                     train_cap=options.train_samples, test_cap=options.test_samples,
                                                     seed=options.seed)
    return DemoData(data.name, data.description, x_train, y_train, x_test, y_test)


# -- the summary (pure) --------------------------------------------------------------------------------------


@dataclass
class Answered:
    """The first answer per input (by its input position: partition and offset), and how many more arrived
    (at-least-once duplicates)."""

    #: (partition, offset) of the input -> (tier, class, latency ms)
    by_offset: dict[tuple[int, int], tuple[int, int, float]] = field(default_factory=dict)
    duplicates: int = 0
    first_at: float | None = None
    last_at: float | None = None

    def add(self, offset: tuple[int, int], tier: int, cls: int, latency_ms: float, now: float) -> None:
        if offset in self.by_offset:
            self.duplicates += 1
            return
        self.by_offset[offset] = (tier, cls, latency_ms)
        self.first_at = now if self.first_at is None else self.first_at
        self.last_at = now


def summarize(*, exits: Sequence[tuple[str, float | None]], single: tuple[str, float | None] | None,
              offsets: Sequence[tuple[int, int]], labels: Sequence[int], answered: Answered, started_at: float,
              tiers: int) -> JSON:
    """The demo's numbers: test accuracy per exit (from training), and of the cascade, share and accuracy
    per answering tier, latency percentiles and throughput of the inference run."""
    per_tier: list[dict[str, Any]] = [{"tier": t, "answered": 0, "correct": 0} for t in range(tiers)]
    latencies: list[float] = []
    correct = 0
    for offset, label in zip(offsets, labels, strict=True):
        got = answered.by_offset.get(offset)
        if got is None:
            continue
        tier, cls, latency = got
        latencies.append(latency)
        per_tier[tier]["answered"] += 1
        if cls == label:
            correct += 1
            per_tier[tier]["correct"] += 1
    n_answered = sum(t["answered"] for t in per_tier)
    for t in per_tier:
        t["share"] = t["answered"] / n_answered if n_answered else 0.0
        t["accuracy"] = t.pop("correct") / t["answered"] if t["answered"] else None
    span = (answered.last_at or started_at) - started_at
    return {
        "exits": [{"name": name, "test_accuracy": acc} for name, acc in exits],
        "single": None if single is None else {"name": single[0], "test_accuracy": single[1]},
        "inputs": len(offsets),
        "answered": n_answered,
        "unanswered": len(offsets) - n_answered,
        "duplicates": answered.duplicates,
        "cascade_accuracy": correct / n_answered if n_answered else None,
        "tiers": per_tier,
        "latency_ms": {"p50": percentile(sorted(latencies), 0.5), "p99": percentile(sorted(latencies), 0.99),
                       "max": max(latencies) if latencies else None},
        "throughput_per_s": n_answered / span if span > 0 else None,
    }


def _num(value: float | None, fmt: str = ".3f", none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def format_summary(summary: JSON) -> str:
    lines = ["accuracy on the training's test split, per exit:"]
    for e in summary["exits"]:
        lines.append(f"  {e['name']:<8} {_num(e['test_accuracy'])}")
    if summary.get("single"):
        lines.append(f"  {summary['single']['name']:<8} {_num(summary['single']['test_accuracy'])}  "
                     "(the non-distributed model)")
    lines.append(f"inference on {summary['inputs']:,} held-out inputs: {summary['answered']:,} answered, "
                 f"{summary['unanswered']} unanswered, {summary['duplicates']} duplicates")
    lines.append(f"  cascade accuracy {_num(summary['cascade_accuracy'])}")
    for t in summary["tiers"]:
        name = summary["exits"][t["tier"]]["name"] if t["tier"] < len(summary["exits"]) else f"tier {t['tier']}"
        label = f"tier {t['tier']} ({name})"
        lines.append(f"  {label:<16} answered {t['share']:6.1%}  accuracy {_num(t['accuracy'])}")
    lat = summary["latency_ms"]
    lines.append(f"  latency p50 {_num(lat['p50'], '.1f')} ms, p99 {_num(lat['p99'], '.1f')} ms; "
                 f"throughput {_num(summary['throughput_per_s'], ',.0f')} answers/s")
    return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------------------------


def _say(out: TextIO, text: str) -> None:
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

    def step(self, n: int, text: str) -> None:
        _say(self.out, f"\n[{n}/6] {text}")

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
                       input_topic=inference["input_topic"], output_topic=inference["output_topic"],
                       limit=self.options.limit, seconds=round(self.clock() - started, 1))
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
            _say(self.out, f"  model {model['id']:>3}  {body['name']:<18} (built and checked in the sandbox{link})")
        return ids

    def deploy(self, models: dict[str, int]) -> JSON:
        _, conf = self.api.post("/configurations", {"name": f"demo-{self.tag}",
                                                    "model_ids": [models["cloud"], models["single"]]})
        _say(self.out, f"  configuration {conf['id']}: the chain (by its top model) and the single model")
        self.step(2, f"deploying configuration {conf['id']} for training "
                     f"({self.options.epochs} epochs, batch {self.options.batch})")
        _, dep = self.api.post("/deployments", {"configuration_id": conf["id"], "batch": self.options.batch,
                                                 "fit_options": {"epochs": self.options.epochs}})
        _say(self.out, f"  deployment {dep['id']}: its results wait for a datasource")
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
        _say(self.out, f"  announced {announcement['topic']} to deployment {deployment['id']} "
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
                    if r["status"] not in ("created", "deployed"):
                        _say(self.out, f"  {name:<6} {r['status']}")
                for h in (r.get("history") or [])[seen_epochs.get(r["id"], 0):]:
                    _say(self.out, f"  {name:<6} epoch {h.get('epoch', '?')}/{self.options.epochs}  "
                                   f"loss {_num(h.get('loss'))}  accuracy {_num(h.get('accuracy'))}  "
                                   f"val_loss {_num(h.get('val_loss'))}  val_accuracy {_num(h.get('val_accuracy'))}")
                seen_epochs[r["id"]] = len(r.get("history") or [])
            statuses = {r["status"] for r in results.values()}
            if results and statuses <= {"finished", "failed", "stopped"}:
                break
            if self.clock() > deadline:
                raise DemoError(f"training did not finish within {self.options.timeout_s:.0f} s "
                                f"(statuses: {', '.join(sorted(statuses))})")
            self.sleep(0.5)
        failed = [f"{names.get(m, m)}: {r.get('error') or r['status']}" for m, r in results.items()
                  if r["status"] != "finished"]
        if failed:
            raise DemoError("training did not finish: " + "; ".join(failed))
        return results

    # 4. inference
    def serve(self, entry: JSON) -> JSON:
        self.step(5, f"serving the trained chain tier by tier (limit {self.options.limit}: a tier answers when "
                     "its highest probability reaches it, otherwise it forwards the tensor up)")
        body: JSON = {"result_id": entry["id"], "input_topic": f"tierflow.demo-{self.tag}.in",
                      "output_topic": f"tierflow.demo-{self.tag}.out", "limit": self.options.limit}
        _, inference = self.api.post("/inferences", body)
        self.inference_id = int(inference["id"])
        for t in inference["tiers"]:
            routes = f"answers -> {inference['output_topic']}"
            if t.get("upper_topic"):
                routes += f", forwards -> {t['upper_topic']}"
            _say(self.out, f"  tier {t['index']} {t['model_name']:<18} reads {t['input_topic']}; {routes}")
        return dict(inference)

    def infer(self, data: DemoData, inference: JSON, results: dict[int, JSON], models: dict[str, int]) -> JSON:
        self.step(6, f"streaming {len(data.x_test):,} held-out inputs as a Kafka-ML client would "
                     f"(one raw float32 sample per record, {self.options.rate:g}/s) and reading the answers")
        offsets, answered, started = asyncio.run(self._stream(data.x_test, inference))
        exits = [(name, _test_accuracy(results[models[name]])) for name in CHAIN]
        summary = summarize(exits=exits, single=("single", _test_accuracy(results[models["single"]])),
                            offsets=offsets, labels=data.y_test.tolist(), answered=answered, started_at=started,
                            tiers=len(inference["tiers"]))
        return summary

    async def _stream(self, x: np.ndarray[Any, Any], inference: JSON
                      ) -> tuple[list[tuple[int, int]], Answered, float]:
        from aiokafka import TopicPartition

        from tierflow.streams import kafka as kio
        from tierflow.tiers import wire
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
        from tierflow.tiers import wire

        started = self.clock()
        probes: dict[str, int] = {}
        for t in inference["tiers"]:
            if t["index"] == 0:
                value, headers = np.ascontiguousarray(sample).tobytes(), None
            else:
                value, headers = wire.encode_tensor(np.zeros((1, 64), dtype=np.float32))
            await producer.send_and_wait(t["input_topic"], value, headers=headers)
            probes[t["input_topic"]] = t["index"]
        _say(self.out, f"  waiting for the {len(probes)} tiers to load their models (one probe each) ...")
        deadline = started + self.options.timeout_s
        while probes:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batch.values():
                for record in records:
                    with contextlib.suppress(wire.WireError):
                        for a in wire.read_answers(record.value):
                            if a.origin[0] in probes:
                                index = probes.pop(a.origin[0])
                                _say(self.out, f"  tier {index} answers ({self.clock() - started:.1f} s)")
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


# -- the command ----------------------------------------------------------------------------------------------


def where_next(api_url: str, summary: JSON) -> str:
    inf = summary["inference_id"]
    return "\n".join([
        "where to look next:",
        f"  web UI            {api_url}/ui/",
        f"  API               {api_url}/openapi.json",
        f"  inputs / answers  {summary['input_topic']} -> {summary['output_topic']}",
        f"  CLI               tierflow deployments results {summary['deployment_id']}",
        f"                    tierflow inferences stats {inf}",
        f"                    tierflow inferences predictions {inf}",
        f"                    tierflow inferences stop {inf}",
    ])


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tierflow.deploy import stack
    from tierflow.deploy.stack_processes import healthy

    logging.getLogger("tierflow.sinks").setLevel(logging.WARNING)  # the demo says what its sink did
    options = DemoOptions(dataset=args.dataset, epochs=args.epochs, limit=args.limit,
                          train_samples=args.train_samples, test_samples=args.test_samples, rate=args.rate,
                          timeout_s=args.timeout)
    out = sys.stdout
    started_stack = False
    if settings.api.url and settings.kafka.bootstrap_servers:
        # A deployed tierflow (a cluster): use it as it is, start and stop nothing.
        api_url = settings.api.url.rstrip("/")
        _say(out, f"using the tierflow at {api_url} (Kafka {settings.kafka.bootstrap_servers})")
        resolved = settings
    else:
        home = resolve_home(settings)
        state = read_stack_state(home)
        if state is None or not state.alive() or not healthy(state.api_url):
            _say(out, f"no running stack for {home}: starting one")
            code = stack.up_detached(settings, timeout_s=options.timeout_s)
            if code != 0:
                return code
            started_stack = True
            state = read_stack_state(home)
            if state is None:
                print("tierflow demo: the stack started but wrote no state file", file=sys.stderr)
                return 1
        else:
            _say(out, f"using the running stack for {home} (API {state.api_url})")
        api_url = state.api_url
        resolved = settings.with_endpoints(
            bootstrap_servers=settings.kafka.bootstrap_servers or state.bootstrap_servers,
            database_url=settings.database.url or state.database_url, api_url=state.api_url)
    api = ApiClient(api_url, settings.api.token)
    demo = Demo(api, resolved, options, out=out)
    code = 0
    try:
        summary = demo.run()
        _say(out, "\n" + format_summary(summary))
        _say(out, f"done in {summary['seconds']:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        if args.keep:
            _say(out, "\n" + where_next(api_url, summary))
        else:
            _say(out, "run `tierflow demo --keep` to look around afterwards: the web UI, the topics, the CLI")
    except (DemoError, ApiClientError) as exc:
        print(f"\ntierflow demo: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("\ntierflow demo: interrupted", file=sys.stderr)
        code = 130
    finally:
        if not args.keep:
            # Stopped before the stack goes down too: the events survive `down`, and a running inference
            # would have its tiers relaunched by the next `up`.
            if demo.inference_id is not None:
                try:
                    api.post(f"/inferences/{demo.inference_id}/stop")
                    _say(out, f"stopped inference {demo.inference_id}: its tiers are removed")
                except ApiClientError as exc:
                    print(f"tierflow demo: could not stop inference {demo.inference_id}: {exc}", file=sys.stderr)
            if started_stack:
                _say(out, "stopping the stack the demo started (pass --keep to leave it running)")
                stack.down(settings)
        elif started_stack:
            _say(out, "the stack keeps running: `tierflow status`, `tierflow down`")
    return code


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser(
        "demo", help="run the whole lifecycle on the embedded stack: register, train, serve, infer",
        description="Register an edge -> fog -> cloud chain and a single model, train them on data sent through "
                    "Kafka, serve the chain tier by tier and stream held-out inputs through it, then print "
                    "accuracy per exit and of the cascade, the share answered per tier, latency and throughput.")
    demo.add_argument("--dataset", default="auto", metavar="NAME",
                      help="fashion-mnist (Debian package dataset-fashion-mnist), digits (scikit-learn), or "
                           "npz:PATH of 28x28 images; default: fashion-mnist when installed, else digits")
    demo.add_argument("--epochs", type=positive_int, default=5, help="training epochs (default 5)")
    demo.add_argument("--limit", type=non_negative, default=0.8,
                      help="a tier answers when its highest probability is >= this (default 0.8)")
    demo.add_argument("--train-samples", type=positive_int, default=20000, metavar="N",
                      help="most samples sent for training (default 20000)")
    demo.add_argument("--test-samples", type=positive_int, default=2000, metavar="N",
                      help="most held-out samples streamed through the tiers (default 2000)")
    demo.add_argument("--rate", type=non_negative, default=500.0, metavar="PER_S",
                      help="inputs per second sent for inference (default 500; 0 = as fast as possible)")
    demo.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                      help="longest wait for any one step (default 600)")
    demo.add_argument("--keep", action="store_true",
                      help="leave the stack (and the inference) running and print where to look")
    demo.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    demo.set_defaults(func=run)
