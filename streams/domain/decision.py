"""What every aggregate's rules share: the shape of a decision, `Pending`, and the lookups they all make.

Imported by the per-aggregate rule modules (streams/domain/models.py, configurations.py, deployments.py,
datasources.py, inferences.py) and by the dispatcher (streams/domain/__init__.py), which turns a
`Decision` into the event envelope.
"""

from __future__ import annotations

from collections.abc import Callable

from tierflow.streams.catalogue import Invalid, expected_version
from tierflow.streams.domain.state import ModelState, State
from tierflow.streams.envelope import JSON, Command
from tierflow.streams.errors import TierflowError

#: (event type, aggregate, aggregate version, payload) of the one event a command produces
Decision = tuple[str, str, int, JSON]

#: A rule: the decision for one command type, raising `Invalid` (rejected) or `Pending` (not yet decidable).
Handler = Callable[[State, Command, str], Decision]


class Pending(TierflowError):
    """The command needs its model code validated first; the validator agent will re-send it (not a failure:
    `decide` answers no event yet)."""


def model_of(state: State, model_id: int, field_name: str = "id") -> ModelState:
    m = state.models.get(model_id)
    if m is None:
        # An unknown id in the path is a 404; an unknown id named by a body field is a 422 on that field.
        raise Invalid(f"model {model_id} does not exist", field_name, "not_found" if field_name == "id" else "invalid")
    return m


def check_version(current: int, cmd_payload: JSON, what: str) -> None:
    wanted = expected_version(cmd_payload)
    if wanted is not None and wanted != current:
        raise Invalid(f"{what} is at version {current}, not the expected version {wanted}; reload and retry",
                      "expected_version", "conflict")
