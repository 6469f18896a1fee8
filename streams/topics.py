"""Topic declarations of the control plane, and their creation/verification.

Called by the stack supervisor before any agent starts (`ensure_topics`) and by the decider at start-up
(`check_single_partition`). Topics are created explicitly: Tansu auto-creates unknown topics with 4
partitions, which would break the total order of commands and events.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from tierflow.streams.errors import PermanentError
from tierflow.streams.kafka import security_options
from tierflow.streams.settings import KafkaSettings

log = logging.getLogger("tierflow.topics")

DAY_MS = 24 * 3600 * 1000
TOPIC_ALREADY_EXISTS = 36


class TopicLayoutError(PermanentError, RuntimeError):
    """A control-plane topic exists with a layout tierflow cannot run on (e.g. several partitions)."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int  # -1: keep forever

    def new_topic(self) -> NewTopic:
        return NewTopic(self.name, self.partitions, 1, topic_configs={"retention.ms": str(self.retention_ms)})


def control_plane_topics(kafka: KafkaSettings) -> list[TopicSpec]:
    return [
        TopicSpec(kafka.commands_topic, 1, 7 * DAY_MS),
        TopicSpec(kafka.events_topic, 1, -1),
        TopicSpec(kafka.deadletter_topic, 1, 30 * DAY_MS),
        TopicSpec(kafka.control_topic, 1, 7 * DAY_MS),
    ]


def admin_client(kafka: KafkaSettings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**security_options(kafka), bootstrap_servers=kafka.bootstrap_servers,
                               request_timeout_ms=10000)


async def partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    described = await admin.describe_topics(names)
    counts: dict[str, int] = {}
    for topic in described:
        if topic["error_code"] == 0:
            counts[topic["topic"]] = len(topic["partitions"])
    return counts


async def ensure_topics(kafka: KafkaSettings, extra: list[TopicSpec] | None = None) -> list[str]:
    """Create the control-plane topics that are missing; return the names created.

    Raises TopicLayoutError when an existing commands/events topic has more than one partition.
    """
    specs = control_plane_topics(kafka) + list(extra or [])
    admin = admin_client(kafka)
    await admin.start()
    try:
        # Create first, describe after: a metadata request for an unknown topic makes Tansu auto-create it
        # with 4 partitions.
        created: list[str] = []
        for spec in specs:
            try:
                response = await admin.create_topics([spec.new_topic()])
            except TopicAlreadyExistsError:
                continue
            errors = {t[0]: t[1] for t in response.topic_errors}
            code = errors.get(spec.name, 0)
            if code == 0:
                created.append(spec.name)
            elif code != TOPIC_ALREADY_EXISTS:
                raise TopicLayoutError(f"could not create topic {spec.name}: broker error code {code}")
        if created:
            log.info("created topics %s", ", ".join(created))
        if kafka.commands_topic in created:
            await _mark_new_command_log(kafka)
        await _check_single_partition(admin, [kafka.commands_topic, kafka.events_topic])
        return created
    finally:
        await admin.close()


async def _mark_new_command_log(kafka: KafkaSettings) -> None:
    from tierflow.streams.commandlog import write_marker
    from tierflow.streams.kafka import producer

    p = producer(kafka)
    await p.start()
    try:
        log_id = await write_marker(p, kafka.commands_topic)
        log.info("commands log %s started", log_id)
    finally:
        await p.stop()


async def _check_single_partition(admin: AIOKafkaAdminClient, names: list[str]) -> None:
    counts = await partition_counts(admin, names)
    for name in names:
        if name not in counts:
            raise TopicLayoutError(f"topic {name} does not exist; run `tierflow up` or create it with 1 partition")
        if counts[name] != 1:
            raise TopicLayoutError(
                f"topic {name} has {counts[name]} partitions; tierflow needs exactly 1 for a total order "
                "(recreate it with one partition)"
            )


async def check_single_partition(kafka: KafkaSettings) -> None:
    admin = admin_client(kafka)
    await admin.start()
    try:
        await _check_single_partition(admin, [kafka.commands_topic, kafka.events_topic])
    finally:
        await admin.close()


async def create_topics(bootstrap_servers: str, specs: list[TopicSpec], kafka: KafkaSettings | None = None
                        ) -> list[str]:
    """Create data-plane topics (inference tiers) on any cluster; existing ones are left as they are. `kafka`:
    the settings whose credentials sign in (the stack's own cluster's)."""
    admin = admin_client(replace(kafka or KafkaSettings(), bootstrap_servers=bootstrap_servers))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        created: list[str] = []
        for spec in specs:
            if spec.name in existing or spec.name in created:
                continue
            try:
                response = await admin.create_topics([spec.new_topic()])
            except TopicAlreadyExistsError:
                continue
            code = {t[0]: t[1] for t in response.topic_errors}.get(spec.name, 0)
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise TopicLayoutError(f"could not create topic {spec.name} on {bootstrap_servers}: error {code}")
            created.append(spec.name)
        return created
    finally:
        await admin.close()
