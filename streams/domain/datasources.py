"""The rules of datasources: an announcement of training data for a deployment, and its re-use for another.

Called through the dispatcher (streams/domain/__init__.py: `decide`). Announcements come from the control
bridge (streams/control.py), which turns Kafka-ML control messages into `AnnounceDatasource` commands
carrying both the announced ranges and the ones it found on the broker (`ranges`, the ones training reads),
with why they differ; the event records both, so a replay gives the same datasource without asking the
broker again. `SendDatasource` re-sends a known announcement, ranges and reasons included, to another
deployment.
"""

from __future__ import annotations

from tierflow.streams.catalogue import Invalid, parse_announcement, req_id
from tierflow.streams.domain.decision import Decision, Handler
from tierflow.streams.domain.state import State
from tierflow.streams.envelope import Command


def _announce_datasource(state: State, cmd: Command, at: str) -> Decision:
    did = req_id(cmd.payload, "deployment_id")
    if did not in state.deployments:
        raise Invalid(f"datasource announced for deployment {did}, which does not exist", "deployment_id")
    fields = parse_announcement(cmd.payload, state.reserved_topics)
    ident = state.next_id("datasource")
    return "DatasourceAnnounced", f"datasource:{ident}", 1, fields | {
        "id": ident, "deployment_id": did, "created_at": at,
    }


def _send_datasource(state: State, cmd: Command, at: str) -> Decision:
    p = cmd.payload
    source_id = req_id(p, "datasource_id")
    record = state.datasource_records.get(source_id)
    if record is None:
        raise Invalid(f"datasource {source_id} does not exist", "datasource_id", "not_found")
    did = req_id(p, "deployment_id")
    if did not in state.deployments:
        raise Invalid(f"deployment {did} does not exist", "deployment_id")
    ident = state.next_id("datasource")
    return "DatasourceAnnounced", f"datasource:{ident}", 1, record | {
        "id": ident, "deployment_id": did, "origin": {"datasource_id": source_id}, "created_at": at,
    }


HANDLERS: dict[str, Handler] = {
    "AnnounceDatasource": _announce_datasource,
    "SendDatasource": _send_datasource,
}
