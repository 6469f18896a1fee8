"""The decider's pure core: `decide(state, command) -> event`, dispatching each command to its aggregate's rules.

Called by the decider agent (streams/decider.py), which feeds it commands in log order and folds each event
it returns with `streams.domain.state.apply`, and by unit tests, which call both without Kafka. The rules
live one module per aggregate (models, configurations, deployments and their results, datasources,
inferences), each rejection naming the culprit; request fields are parsed by the catalogue
(streams/catalogue.py), which the API calls too.
"""

from __future__ import annotations

from tierflow.streams.catalogue import CODE_COMMANDS, COMMAND_EVENTS, Invalid, event_version
from tierflow.streams.domain import configurations, datasources, deployments, inferences, models
from tierflow.streams.domain.decision import Decision, Handler, Pending
from tierflow.streams.domain.state import State
from tierflow.streams.envelope import Command, Event, Position, event_id_for

_HANDLERS: dict[str, Handler] = {
    **models.HANDLERS,
    **configurations.HANDLERS,
    **deployments.HANDLERS,
    **datasources.HANDLERS,
    **inferences.HANDLERS,
}


def decide(state: State, cmd: Command, *, occurred_at: str, position: Position | None) -> Event | None:
    """The one event the command produces, or None if it was decided before or awaits validation.

    Never raises on bad input: anything wrong becomes a CommandRejected event naming the culprit.
    """
    if cmd.command_id in state.decided:
        return None
    try:
        event_type, aggregate, agg_version, payload = _decide(state, cmd, occurred_at)
    except Pending:
        return None
    except Invalid as exc:
        event_type, aggregate, agg_version = "CommandRejected", f"command:{cmd.command_id}", 1
        payload = {"command_id": cmd.command_id, "command_type": cmd.type, "reason": exc.to_json()}
    return Event(
        id=event_id_for(cmd.command_id),
        seq=state.seq + 1,
        type=event_type,
        version=event_version(event_type),
        aggregate=aggregate,
        aggregate_version=agg_version,
        command_id=cmd.command_id,
        occurred_at=occurred_at,
        payload=payload,
        position=position,
    )


def _decide(state: State, cmd: Command, at: str) -> Decision:
    handler = _HANDLERS.get(cmd.type)
    if handler is None:
        known = ", ".join(sorted(COMMAND_EVENTS))
        raise Invalid(f"unknown command type {cmd.type!r} (known: {known})", "type")
    return handler(state, cmd, at)


def needs_validation(cmd: Command) -> bool:
    """Whether the validator agent must build this command's code (the model rules wait for its verdict).

    Called by the validator agent (streams/validator.py) on every command it reads.
    """
    if cmd.type not in CODE_COMMANDS or cmd.validation is not None:
        return False
    code = cmd.payload.get("code")
    return isinstance(code, str) and bool(code.strip())
