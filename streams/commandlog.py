"""Identity of the commands log, so positions recorded in one incarnation are never used in another.

The embedded broker loses its log on restart: after `tierflow down/up` the commands topic is new and its
offsets start again at 0. `ensure_topics` writes a `CommandLogStarted{log_id}` marker as the first record
of a new commands topic; the decider and the validator read it and store positions as (log_id, offset).
A position from another log is ignored and the agent reads the new log from its start (commands are
decided once anyway, by command_id).
"""

from __future__ import annotations

import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tierflow.streams.envelope import CommandLogMarker, EnvelopeError, decode_command
from tierflow.streams.positioned import first_record

UNMARKED = "unmarked"


async def write_marker(p: AIOKafkaProducer, topic: str) -> str:
    log_id = str(uuid.uuid4())
    await p.send_and_wait(topic, CommandLogMarker(log_id).encode(), key=b"log")
    return log_id


async def read_log_id(c: AIOKafkaConsumer, tp: TopicPartition) -> str:
    """The log id in the first record of the (assigned) commands partition; UNMARKED when there is none.

    Leaves the consumer positioned at the start of the log. The `LogIdFn` of the decider's and the
    validator's `PositionedReader`.
    """
    record = await first_record(c, tp)
    if record is None:
        return UNMARKED
    try:
        first = decode_command(record.value)
    except EnvelopeError:
        return UNMARKED
    return first.log_id if isinstance(first, CommandLogMarker) else UNMARKED
