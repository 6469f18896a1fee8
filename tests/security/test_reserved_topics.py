"""Attack: a user-supplied topic name that is one of tierflow's own topics, the control topic or a Kafka internal one.

An inference whose output topic (or a tier's upper topic) is `tierflow.events` makes its tiers write answers
into the event log: the projector halts on the first record it cannot decode and the decider cannot fold the
log on its next start, so one request stops the control plane for good. The same holds for the commands
topic (answers decided as commands), the dead-letter topic, the Kafka-ML control topic (answers read as
datasource announcements) and Kafka's internal topics (`__consumer_offsets`, `__transaction_state`); an
input topic or a datasource's range naming them makes a tier or a training job read the control plane's
records as samples. An inference's shadow topic (`<prefix>.shadow.<id>`, where its top tier writes the
outcomes of shadow samples) named as another inference's output topic would mix fake outcomes into the live
agreement the API reports, hiding a drifting tier (or flagging a sound one). Defence: the one topic validator
(streams/catalogue.py: `topic_name`) refuses them, in the API (422 naming the field, before anything is
sent) and in the decider (a rejection naming the field, for commands produced straight to Kafka).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import Infra, admin_headers, new_plane, start_plane, stop_plane
from tests.integration.test_replay import shape_validate
from tierflow.api.app import create_app
from tierflow.streams.client import CommandClient
from tierflow.streams.domain import decide
from tierflow.streams.domain.state import State, apply
from tierflow.streams.envelope import JSON, Command, Event
from tierflow.streams.proofs import API, ENTITLED, VALIDATOR, Signer, Verifier
from tierflow.streams.settings import KafkaSettings, Settings

AT = "2026-01-01T00:00:00.000000Z"
KAFKA_INTERNAL = ["__consumer_offsets", "__transaction_state"]
DEFAULT = KafkaSettings()
#: The reserved topics of a stack with the default settings.
DEFAULT_RESERVED = [DEFAULT.events_topic, DEFAULT.commands_topic, DEFAULT.deadletter_topic, DEFAULT.control_topic,
                    *KAFKA_INTERNAL]
TOPIC_FIELDS = ["input_topic", "output_topic", "tiers[0].upper_topic"]
SHA = "a" * 64
SECRET = "reserved-topics-test-secret-" + "0" * 32
PROOFS = Verifier.from_secret(SECRET)


def summary(input_shape: list[int | None], *outputs: list[int | None]) -> JSON:
    return {"ok": True, "summary": {"input_shape": input_shape, "output_shapes": list(outputs), "params": 10}}


class Log:
    """The decider's pure core driven without Kafka: decide, fold, keep the events. It plays the stack's
    components as well: verdicts and training reports carry their proofs."""

    def __init__(self, state: State) -> None:
        self.state = replace(state, proofs=PROOFS)

    def send(self, type_: str, payload: JSON, validation: JSON | None = None) -> Event:
        cmd = Command(command_id=str(uuid.uuid4()), type=type_, payload=payload, validation=validation)
        if validation is not None or type_ in ENTITLED:
            cmd = Signer.from_secret(SECRET, VALIDATOR if validation is not None else API).sign(cmd)
        event = decide(self.state, cmd, occurred_at=AT, position=None)
        assert event is not None
        apply(self.state, event)
        return event


def finished_chain(state: State) -> Log:
    """A two-model chain (edge 1 -> cloud 2), deployed as results 1 and 2, both trained."""
    log = Log(state)
    log.send("RegisterModel", {"name": "cloud", "code": "c", "distributed": True}, summary([None, 64], [None, 10]))
    log.send("RegisterModel", {"name": "edge", "code": "e", "distributed": True, "upper_id": 1},
             summary([None, 28, 28], [None, 64], [None, 10]))
    log.send("CreateConfiguration", {"name": "chain", "model_ids": [1]})
    log.send("RequestDeployment", {"configuration_id": 1})
    for rid in (1, 2):
        done = log.send("ReportTrainingResult", {"result_id": rid, "metrics": {},
                                                 "artefacts": {"keras": {"sha256": SHA}}})
        assert done.type == "TrainingResultReported", done.payload
    return log


def inference(field: str, topic: str) -> JSON:
    body: JSON = {"result_id": 1, "input_topic": "samples", "output_topic": "answers"}
    if field == "tiers[0].upper_topic":
        return body | {"tiers": [{"result_id": 1, "upper_topic": topic}]}
    return body | {field: topic}


def assert_refused(event: Event, field: str, topic: str) -> None:
    assert event.type == "CommandRejected", f"{field}={topic!r} was accepted: {event.type}"
    reason = event.payload["reason"]
    assert (reason["code"], reason["field"]) == ("invalid", field), reason
    assert topic in reason["message"] and "reserved" in reason["message"], reason


# --- the decider's rules (no Kafka) ---------------------------------------------------------------------

@pytest.mark.parametrize("field", TOPIC_FIELDS)
@pytest.mark.parametrize("topic", DEFAULT_RESERVED)
def test_the_decider_refuses_an_inference_naming_a_reserved_topic(topic: str, field: str) -> None:
    log = finished_chain(State())
    assert_refused(log.send("RequestInference", inference(field, topic)), field, topic)
    assert not log.state.inferences


def test_the_reserved_topics_follow_the_settings_and_keep_the_defaults() -> None:
    from tierflow.streams.catalogue import reserved_topics

    kafka = KafkaSettings(topic_prefix="prod", control_topic="ml-control")
    log = finished_chain(State(reserved_topics=reserved_topics(kafka)))
    for topic in ("prod.events", "prod.commands", "prod.deadletter", "ml-control", "tierflow.events", "__anything"):
        assert_refused(log.send("RequestInference", inference("output_topic", topic)), "output_topic", topic)


@pytest.mark.parametrize("field", TOPIC_FIELDS)
@pytest.mark.parametrize("topic", ["tierflow.shadow", "tierflow.shadow.1", "tierflow.shadow.42"])
def test_the_decider_refuses_an_inference_naming_a_shadow_topic(topic: str, field: str) -> None:
    log = finished_chain(State())
    assert_refused(log.send("RequestInference", inference(field, topic)), field, topic)
    assert not log.state.inferences


def test_the_shadow_topics_follow_the_settings_and_keep_the_defaults() -> None:
    from tierflow.streams.catalogue import reserved_topics

    kafka = KafkaSettings(topic_prefix="prod")
    log = finished_chain(State(reserved_topics=reserved_topics(kafka)))
    for topic in (kafka.shadow_topic(3), "prod.shadow", "tierflow.shadow.3"):
        assert_refused(log.send("RequestInference", inference("output_topic", topic)), "output_topic", topic)


@pytest.mark.parametrize("topic", ["tierflow.events.copy", "my-tierflow.events", "tierflow.inference.1.tier1",
                                   "_single_underscore", "answers", "tierflow.shadow.copy", "tierflow.shadow7",
                                   "my.shadow.7"])
def test_names_that_only_look_alike_are_served(topic: str) -> None:
    log = finished_chain(State())
    accepted = log.send("RequestInference", inference("output_topic", topic))
    assert accepted.type == "InferenceRequested", accepted.payload


@pytest.mark.parametrize("topic", DEFAULT_RESERVED)
def test_a_datasource_cannot_name_a_reserved_topic(topic: str) -> None:
    log = finished_chain(State())
    ranges = [{"topic": "mnist", "partition": 0, "start": 0, "end": 10},
              {"topic": topic, "partition": 0, "start": 0, "end": 10}]
    event = log.send("AnnounceDatasource", {"deployment_id": 1, "input_format": "RAW", "ranges": ranges})
    assert_refused(event, "ranges[1].topic", topic)
    assert not log.state.datasources


# --- the running control plane and the API --------------------------------------------------------------

@pytest.fixture(scope="module")
async def plane(infra: Infra) -> AsyncIterator[Settings]:
    settings = await new_plane(infra, "reserved")
    running = await start_plane(settings, shape_validate)
    yield settings
    await stop_plane(running)


async def test_the_running_decider_refuses_its_own_topics(plane: Settings) -> None:
    kafka = plane.kafka  # the tests' own prefix and control topic, not the defaults
    async with CommandClient(kafka) as client:
        async def send(type_: str, payload: JSON) -> Event:
            return await client.wait(await client.send(type_, payload))

        await send("RegisterModel", {"name": "cloud", "code": "# top", "distributed": True})
        await send("RegisterModel", {"name": "edge", "code": "# mid", "distributed": True, "upper_id": 1})
        await send("CreateConfiguration", {"name": "chain", "model_ids": [1]})
        await send("RequestDeployment", {"configuration_id": 1})
        async with CommandClient(kafka, signer=Signer.from_secret(plane.security.secret_key, API)) as api:
            for rid in (1, 2):  # the workload's reports, as the API vouches for them
                done = await api.wait(await api.send("ReportTrainingResult", {
                    "result_id": rid, "metrics": {}, "artefacts": {"keras": {"sha256": SHA}}}))
                assert done.type == "TrainingResultReported", done.payload
        for field, topic in [("output_topic", kafka.events_topic), ("tiers[0].upper_topic", kafka.commands_topic),
                             ("output_topic", kafka.deadletter_topic), ("output_topic", kafka.control_topic),
                             ("input_topic", "__consumer_offsets")]:
            assert_refused(await send("RequestInference", inference(field, topic)), field, topic)
        # The plane still decides: an inference on topics of its own is served.
        assert (await send("RequestInference", inference("output_topic", "answers"))).type == "InferenceRequested"


async def test_the_api_refuses_reserved_topics_before_sending(plane: Settings) -> None:
    async with TestClient(TestServer(create_app(plane)), headers=admin_headers(plane)) as c:
        for field, topic in [("output_topic", plane.kafka.events_topic), ("input_topic", plane.kafka.control_topic),
                             ("output_topic", "__transaction_state")]:
            # Result 999 does not exist: only a refusal by the API itself can name the topic field.
            r = await c.post("/inferences", json=inference(field, topic) | {"result_id": 999})
            data: dict[str, Any] = await r.json()
            assert r.status == 422, data
            assert data["error"]["field"] == field and "reserved" in data["error"]["message"], data
