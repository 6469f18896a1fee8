"""The statuses of results and inferences: one name for each, used by the domain, projections, API and CLI.

They are `StrEnum`s, so a status compares equal to the string stored in events, tables and JSON (`"finished"`)
and stored values never change.
"""

from __future__ import annotations

from enum import StrEnum


class ResultStatus(StrEnum):
    """A training result: `created -> deployed -> training -> finished | failed | stopped`."""

    CREATED = "created"
    DEPLOYED = "deployed"
    TRAINING = "training"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"


#: A result in one of these statuses never changes status again.
FINAL_STATUSES: frozenset[ResultStatus] = frozenset({ResultStatus.FINISHED, ResultStatus.FAILED,
                                                     ResultStatus.STOPPED})


class InferenceStatus(StrEnum):
    """An inference: `running -> stopped` (a deleted inference leaves the projections)."""

    RUNNING = "running"
    STOPPED = "stopped"
