"""What one training job trains, decided before any I/O: the chain's order, its results and model versions.

Pure (no TensorFlow, no HTTP, no broker): called by the training job (`tierflow.tiers.train_job`) with what
it read from the API, and by the unit tests. A set of results that cannot be trained together (another
deployment's result, one that already ended, models that are not one unbroken chain) is a PermanentError
whose message the job reports as the failure's reason. Also formats the job's progress: the payload of
ReportTrainingProgress and the line it logs per epoch, and chooses the seed it trains with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tierflow.streams.errors import PermanentError
from tierflow.streams.statuses import FINAL_STATUSES
from tierflow.tiers.training import Metrics

JSON = dict[str, Any]


def model_label(version: Mapping[str, Any]) -> str:
    """How a reason names a model version: "model 'edge' (id 1, version 2)"."""
    return f"model '{version.get('name')}' (id {version.get('model_id')}, version {version.get('version')})"


def chain_order(versions: Mapping[int, Mapping[str, Any]]) -> list[int]:
    """The model ids of one chain, bottom first, by following `upper_id` among `versions` (model id -> version).

    One model with no upper is a chain of one. Anything but one unbroken chain is a permanent error: a
    job trains exactly the models it was given, and a model whose upper is not among them would leave
    that upper untrained.
    """
    if not versions:
        raise PermanentError("no models to train")
    lowers: dict[int, list[int]] = {}
    for mid, version in versions.items():
        upper = version.get("upper_id")
        if upper is None:
            continue
        if int(upper) not in versions:
            raise PermanentError(
                f"{model_label(version)} forwards to model {upper}, which this training job does not train; a chain "
                "trains jointly: deploy it through its top model"
            )
        lowers.setdefault(int(upper), []).append(mid)
    for upper, below in lowers.items():
        if len(below) > 1:
            names = " and ".join(model_label(versions[m]) for m in sorted(below))
            raise PermanentError(f"{names} both forward to {model_label(versions[upper])}; one job trains one chain")
    bottoms = sorted(mid for mid in versions if mid not in lowers)
    if len(bottoms) != 1:
        listing = ", ".join(model_label(versions[m]) for m in bottoms) or "none (the upper links form a cycle)"
        raise PermanentError(f"the models do not form one chain: its bottom models are {listing}")
    order = [bottoms[0]]
    while (upper := versions[order[-1]].get("upper_id")) is not None:
        if int(upper) in order:
            raise PermanentError(f"the upper links of {model_label(versions[int(upper)])} form a cycle")
        order.append(int(upper))
    if len(order) != len(versions):
        missing = ", ".join(model_label(versions[m]) for m in sorted(set(versions) - set(order)))
        raise PermanentError(f"{missing} not linked to the chain of {model_label(versions[order[0]])}")
    return order


def choose_seed(given: int | None, deployment: Mapping[str, Any], draw: Callable[[], int]) -> tuple[int, bool]:
    """(seed, deterministic): the job's `--seed`, else the deployment's `seed`, else `draw()`.

    A seed someone asked for makes the training reproducible: the same data, models and options give the same
    split, weights and metrics (deterministic TensorFlow kernels included, `TrainingOptions.deterministic`). A
    drawn seed is recorded as before (ReportTrainingStarted) and costs nothing extra."""
    if given is not None:
        return int(given), True
    asked = deployment.get("seed")
    if asked is not None:
        return int(asked), True
    return int(draw()), False


def latest_datasource(items: Sequence[Mapping[str, Any]]) -> JSON | None:
    """The datasource announced last (highest id), or None."""
    return dict(max(items, key=lambda d: int(d["id"]))) if items else None


@dataclass(frozen=True)
class TrainingPlan:
    """What one job trains: the deployment, and per exit (bottom first) its result and model version."""

    deployment: JSON
    results: list[JSON]
    versions: list[JSON]

    @property
    def result_ids(self) -> list[int]:
        return [int(r["id"]) for r in self.results]

    @property
    def model_ids(self) -> list[int]:
        return [int(v["model_id"]) for v in self.versions]


def make_plan(deployment: JSON, results: Sequence[JSON], versions: Mapping[int, JSON]) -> TrainingPlan:
    """Checks the results belong to the deployment and are open, and orders them bottom first."""
    did = int(deployment["id"])
    by_model: dict[int, JSON] = {}
    for res in results:
        if int(res["deployment_id"]) != did:
            raise PermanentError(f"result {res['id']} belongs to deployment {res['deployment_id']}, not {did}")
        if res.get("status") in FINAL_STATUSES:
            raise PermanentError(f"result {res['id']} already ended ({res['status']}); it is never retrained: "
                                 "deploy the configuration again to train anew")
        mid = int(res["model_id"])
        if mid in by_model:
            raise PermanentError(f"results {by_model[mid]['id']} and {res['id']} both train model {mid}")
        by_model[mid] = res
    order = chain_order({mid: versions[mid] for mid in by_model})
    return TrainingPlan(dict(deployment), [by_model[m] for m in order], [versions[m] for m in order])


def progress_payload(plan: TrainingPlan, epoch: int, epochs: int, metrics: Sequence[Metrics]) -> JSON:
    return {"deployment_id": int(plan.deployment["id"]), "result_ids": plan.result_ids, "epoch": epoch,
            "epochs": epochs, "metrics": {str(rid): dict(m) for rid, m in zip(plan.result_ids, metrics, strict=True)}}


def describe_progress(epoch: int, epochs: int, names: Sequence[str], metrics: Sequence[Metrics]) -> str:
    """"epoch 2/5: edge_model loss 0.41 accuracy 0.88 | ..." for the job's log."""
    parts = [f"{name} " + " ".join(f"{k} {v:.4g}" for k, v in m.items()) for name, m in zip(names, metrics,
                                                                                              strict=True)]
    return f"epoch {epoch}/{epochs}: " + " | ".join(parts)
