"""The decider's pure core: `decide(state, command) -> event`, dispatching each command to its aggregate's rules.

Called by the decider agent (streams/decider.py), which feeds it commands in log order and folds each event
it returns with `streams.domain.state.apply`, and by unit tests, which call both without Kafka. The rules
live one module per aggregate (models, configurations, deployments and their results, datasources,
inferences), each rejection naming the culprit; request fields are parsed by the catalogue
(streams/catalogue.py), which the API calls too.
"""

from __future__ import annotations

from tierflow.streams.catalogue import CODE_COMMANDS, COMMAND_EVENTS, Invalid, event_version, parse_model
from tierflow.streams.domain import configurations, datasources, deployments, inferences, models
from tierflow.streams.domain.decision import Decision, Handler, Pending
from tierflow.streams.domain.state import State
from tierflow.streams.envelope import JSON, Command, Event, Position, event_id_for
from tierflow.streams.proofs import ENTITLED, VALIDATOR, Verifier

_HANDLERS: dict[str, Handler] = {
    **models.HANDLERS,
    **configurations.HANDLERS,
    **deployments.HANDLERS,
    **datasources.HANDLERS,
    **inferences.HANDLERS,
}


#: The largest event the decider writes: an accepted event larger than this (a command can carry megabytes
#: of description or input_config) is rejected instead, so no command makes an event the broker refuses
#: (the decider's producer sends up to 8 MiB; a cluster's events topic must allow this much: docs/cluster.md).
EVENT_MAX_BYTES = 4 * 1024 * 1024
#: Longest text a rejection echoes from the command (its type, the message quoting a field's value).
ECHO_MAX = 2000


def decide(state: State, cmd: Command, *, occurred_at: str, position: Position | None) -> Event | None:
    """The one event the command produces, or None if it was decided before or awaits validation.

    Never raises on bad input: anything wrong becomes a CommandRejected event naming the culprit (bounded in
    size: it quotes at most `ECHO_MAX` characters of the command), and so does an accepted event that would
    be larger than `EVENT_MAX_BYTES`.
    """
    if cmd.command_id in state.decided:
        return None
    try:
        event_type, aggregate, agg_version, payload = _decide(state, cmd, occurred_at)
    except Pending:
        return None
    except Invalid as exc:
        return _rejected(state, cmd, exc, occurred_at, position)
    event = _event(state, cmd, event_type, aggregate, agg_version, payload, occurred_at, position)
    size = len(event.encode())
    if size > EVENT_MAX_BYTES:
        return _rejected(state, cmd, Invalid(f"the {event_type} event of this command would be {size} bytes, over "
                                             f"the {EVENT_MAX_BYTES}-byte limit of an event; send less (e.g. a "
                                             "shorter description or input_config)", "payload", "too_large"),
                         occurred_at, position)
    return event


def _clip(text: str) -> str:
    return text if len(text) <= ECHO_MAX else f"{text[:ECHO_MAX]}... ({len(text)} characters)"


def _rejected(state: State, cmd: Command, exc: Invalid, at: str, position: Position | None) -> Event:
    reason = exc.to_json()
    reason["message"] = _clip(str(reason["message"]))
    if isinstance(reason["field"], str):
        reason["field"] = _clip(reason["field"])
    payload = {"command_id": cmd.command_id, "command_type": _clip(cmd.type), "reason": reason}
    return _event(state, cmd, "CommandRejected", f"command:{cmd.command_id}", 1, payload, at, position)


def _event(state: State, cmd: Command, event_type: str, aggregate: str, agg_version: int, payload: JSON, at: str,
           position: Position | None) -> Event:
    return Event(
        id=event_id_for(cmd.command_id),
        seq=state.seq + 1,
        type=event_type,
        version=event_version(event_type),
        aggregate=aggregate,
        aggregate_version=agg_version,
        command_id=cmd.command_id,
        occurred_at=at,
        payload=payload,
        position=position,
    )


def _decide(state: State, cmd: Command, at: str) -> Decision:
    handler = _HANDLERS.get(cmd.type)
    if handler is None:
        known = ", ".join(sorted(COMMAND_EVENTS))
        raise Invalid(f"unknown command type {cmd.type!r} (known: {known})", "type")
    entitled = ENTITLED.get(cmd.type)
    if entitled is not None and not state.proofs.vouched(cmd, entitled):
        who = " or ".join(sorted(entitled))
        raise Invalid(f"{cmd.type} is accepted only from the stack's {who} (with its proof); this one carries no "
                      "valid proof. A training workload reports through the API (POST /reports)", "proof",
                      "forbidden")
    return handler(state, cmd, at)


def needs_validation(cmd: Command, proofs: Verifier) -> bool:
    """Whether the validator agent must build this command's code (the model rules wait for its verdict): model
    code without a verdict, or with one the validator did not vouch for (ignored, as if absent).

    Called by the validator agent (streams/validator.py) on every command it reads, with its own key.
    """
    if cmd.type not in CODE_COMMANDS:
        return False
    if cmd.validation is not None and proofs.vouched(cmd, frozenset({VALIDATOR})):
        return False
    try:
        parse_model(cmd.payload, partial=cmd.type == "UpdateModel")
    except Invalid:
        return False  # the rules reject it without a verdict: never build it (nor copy megabytes back)
    code = cmd.payload.get("code")
    return isinstance(code, str) and bool(code.strip())
