"""The training workload: `tierflow train --deployment D --results R1,R2,... [--api URL]`.

Started by the orchestrator's launcher (a local subprocess or a Kubernetes Job), one per chain of a
deployment (bottom first) or per non-distributed model. It reads the deployment, its results and the
pinned model code over HTTP from the API, waits for the deployment's datasource, reads the announced
records into memory, has the chain trained jointly by a **sandboxed trainer** (tiers/train_sandbox.py and
tiers/trainer.py: the model code runs there, without the job's token, without network, under the isolation
of TIERFLOW_SANDBOX_ISOLATION, and hands back metrics, artefacts and per-exit probabilities through an
exchange directory), uploads every trained sub-model with `PUT /artefacts` and reports through the API, which
vouches for them (`POST /reports`: ReportTrainingStarted, one ReportTrainingProgress per epoch, one
ReportTrainingResult per result, or ReportTrainingFailure with a reason the user can act on). This process is
the trusted **driver**: it holds the workload's token (TIERFLOW_API_TOKEN, scoped to its deployment and
results: it may report for those only) and never runs model code. It exits 0 only once its final reports have
an outcome (`GET /commands/{id}`), 2 when retrying cannot help (bad data, model code or options), 1 otherwise.

`run_training` is the pure-ish core: what it trains is planned by `tierflow.tiers.train_plan`, and its I/O
goes through the small protocols of `tierflow.tiers.train_io` (`TrainingApi`, `DataLoader`, `Reporter`), so
tests drive it with fakes; `register` adds the CLI to the front door (deploy/cli.py), whose handler wires
the real adapters. TensorFlow runs only in the trainer; the driver reads its progress as it comes and
sends one report per epoch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tierflow.streams.catalogue import SEED_LIMIT
from tierflow.streams.errors import PermanentError, TemporaryError
from tierflow.streams.settings import Settings
from tierflow.tiers import exit_report, training
from tierflow.tiers.data import DataError
from tierflow.tiers.keras_code import ModelCodeError
from tierflow.tiers.train_io import DataLoader, HttpTrainingApi, KafkaDataLoader, Reporter, TrainingApi
from tierflow.tiers.train_plan import (
    TrainingPlan,
    choose_seed,
    describe_progress,
    latest_datasource,
    make_plan,
    progress_payload,
)
from tierflow.tiers.train_sandbox import TrainerOutput, train_in_sandbox
from tierflow.tiers.training import Metrics, TrainingOptions, TrainingSetupError

JSON = dict[str, Any]

log = logging.getLogger(__name__)


# -- errors: what happens next ----------------------------------------------------------------------------
# A job ends with streams.errors' pair: PermanentError (bad data, model code or options: the same job fails
# the same way until the user changes something; exit 2) or TemporaryError (the API, the broker or the
# worker did not answer in time; a later run may succeed; exit 1).

JobError = PermanentError | TemporaryError


def exit_code(error: JobError) -> int:
    """The job's exit code for `error`: 2 when retrying cannot help, 1 when a later run may succeed."""
    return 2 if isinstance(error, PermanentError) else 1


# -- the job ------------------------------------------------------------------------------------------------


def classify(exc: BaseException, phase: str) -> JobError:
    """The job error for an exception raised while `phase` ("reading datasource 3", ...), with a reason."""
    if isinstance(exc, TrainingSetupError | ModelCodeError | DataError):  # permanent, without the phase yet
        text = str(getattr(exc, "message", None) or exc) or type(exc).__name__
        return PermanentError(f"{phase}: {text}")
    if isinstance(exc, PermanentError | TemporaryError):  # the job's own, already phrased
        return exc
    return TemporaryError(f"{phase}: {training.short_message(exc)}")


class _ProgressBridge:
    """`training.ProgressReporter` for the TensorFlow thread: the event loop sends each epoch, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, reporter: Reporter, plan: TrainingPlan) -> None:
        self._loop = loop
        self._reporter = reporter
        self._plan = plan
        self._names = [str(v.get("name")) for v in plan.versions]
        self._queue: asyncio.Queue[JSON | None] = asyncio.Queue()
        self._task = loop.create_task(self._send_all())

    def progress(self, epoch: int, epochs: int, metrics: list[Metrics]) -> None:
        log.info("%s", describe_progress(epoch, epochs, self._names, metrics))
        self._loop.call_soon_threadsafe(self._queue.put_nowait, progress_payload(self._plan, epoch, epochs, metrics))

    async def _send_all(self) -> None:
        while (payload := await self._queue.get()) is not None:
            await self._reporter.send("ReportTrainingProgress", payload)

    async def close(self, *, quiet: bool = False) -> None:
        """Wait until every epoch was produced; raises what producing raised unless `quiet`."""
        self._queue.put_nowait(None)
        try:
            await self._task
        except Exception as exc:
            if not quiet:
                raise
            log.warning("a progress report was not produced: %s", training.short_message(exc))


async def fetch_plan(api: TrainingApi, deployment_id: int, result_ids: Sequence[int]) -> TrainingPlan:
    deployment = await api.deployment(deployment_id)
    results = [await api.result(rid) for rid in result_ids]
    pinned = {str(k): int(v) for k, v in (deployment.get("model_versions") or {}).items()}
    versions: dict[int, JSON] = {}
    for res in results:
        mid = int(res["model_id"])
        version = res.get("model_version") or pinned.get(str(mid))
        if version is None:
            raise PermanentError(f"result {res['id']} pins no version of model {mid}")
        versions[mid] = await api.model_version(mid, int(version))
    return make_plan(deployment, results, versions)


async def wait_for_datasource(api: TrainingApi, deployment_id: int, *, timeout_s: float, poll_interval_s: float,
                              clock: Callable[[], float] = time.monotonic) -> JSON:
    deadline = clock() + timeout_s
    waiting_logged = False
    while True:
        found = latest_datasource(await api.datasources(deployment_id))
        if found is not None:
            return found
        if clock() >= deadline:
            raise TemporaryError(
                f"no datasource was announced for deployment {deployment_id} within {timeout_s:g} s; send the "
                f"training data with `tierflow send --deployment {deployment_id} ...` (or a Kafka-ML sink)"
            )
        if not waiting_logged:
            log.info("waiting for a datasource for deployment %d", deployment_id)
            waiting_logged = True
        await asyncio.sleep(poll_interval_s)


async def wait_for_outcomes(api: TrainingApi, command_ids: Sequence[str], *, timeout_s: float,
                            poll_interval_s: float, clock: Callable[[], float] = time.monotonic) -> dict[str, JSON]:
    """Each command's outcome; TemporaryError if one has none by the deadline (is the worker running?)."""
    deadline = clock() + timeout_s
    outcomes: dict[str, JSON] = {}
    while True:
        for cid in command_ids:
            if cid not in outcomes and (outcome := await api.command_outcome(cid)) is not None:
                outcomes[cid] = outcome
        if len(outcomes) == len(command_ids):
            return outcomes
        if clock() >= deadline:
            pending = [cid for cid in command_ids if cid not in outcomes]
            raise TemporaryError(f"no outcome for report(s) {', '.join(pending)} within {timeout_s:g} s; is the "
                                 "tierflow worker running?")
        await asyncio.sleep(poll_interval_s)


def calibrate(output: TrainerOutput, y: np.ndarray[Any, Any], splits: Sequence[Any]) -> list[JSON]:
    """Per result of the chain, the `exits` field of its report (tiers/exit_report.py), from what the sandboxed
    trainer measured: every exit's probabilities on the validation and test splits (`y[splits[1]]`,
    `y[splits[2]]` their labels) and each sub-model's time per sample. Numpy only, in this trusted process.

    Calibration never fails a training that succeeded: an unexpected error is logged and reported as the
    reason the chain has no calibration (its results are served with typed limits, as before)."""
    n_exits = len(output.metrics)
    try:
        fields = exit_report.chain_exits(output.probs["validation"], y[splits[1]], output.probs["test"],
                                         y[splits[2]], output.seconds_per_sample)
    except Exception as exc:  # the models trained: report them, and why their exits are not calibrated
        log.exception("calibrating the exits failed")
        return exit_report.uncalibrated(n_exits, f"calibrating the exits failed: {training.short_message(exc)}")
    for k, f in enumerate(fields):
        cal = f["calibration"]
        if cal is not None:
            log.info("exit %d: T %.3f, accuracy %.4f, ECE %.4f -> %.4f (%s split), %.1f us per sample", k,
                     f["temperature"], cal["accuracy"], cal["ece_before"], cal["ece_after"], cal["measured_on"],
                     1e6 * (f["cost_s"] or 0.0))
    if fields[-1]["frontier"] is None:
        log.info("no exit frontier: %s", fields[-1]["reason"])
    return fields


async def run_training(settings: Settings, deployment_id: int, result_ids: Sequence[int], *, api: TrainingApi,
                       reporter: Reporter, data_loader: DataLoader | None = None, seed: int | None = None,
                       datasource_timeout_s: float = 600.0, ack_timeout_s: float = 120.0,
                       poll_interval_s: float = 0.5) -> int:
    """Train the results `result_ids` of deployment `deployment_id`; the process exit code (0, 1 or 2).

    `data_loader` defaults to reading the broker of `settings.kafka`; `seed` (default: the deployment's `seed`,
    else random) decides the split, the initial weights, shuffling and dropout, and is reported with
    TrainingStarted; a seed that was given (not drawn) makes the training reproducible (`choose_seed`).
    """
    loader = data_loader or KafkaDataLoader(settings.kafka)
    loop = asyncio.get_running_loop()
    phase = f"loading deployment {deployment_id}"
    plan: TrainingPlan | None = None
    try:
        plan = await fetch_plan(api, deployment_id, result_ids)
        phase = f"waiting for the datasource of deployment {deployment_id}"
        datasource = await wait_for_datasource(api, deployment_id, timeout_s=datasource_timeout_s,
                                               poll_interval_s=poll_interval_s)
        phase = f"reading datasource {datasource.get('id')}"
        x, y = await loader.load(datasource)
        phase = "planning the training"
        chosen, deterministic = choose_seed(seed, plan.deployment, lambda: secrets.randbelow(SEED_LIMIT))
        options = TrainingOptions.from_deployment(plan.deployment, datasource, exit_keys=plan.model_ids,
                                                  seed=chosen, deterministic=deterministic)
        n_train, n_val, n_test = training.split_sizes(len(x), options.validation_rate, options.test_rate)
        log.info("training results %s on %d samples (train %d, validation %d, test %d), seed %d (%s)",
                 plan.result_ids, len(x), n_train, n_val, n_test, options.seed,
                 "given: reproducible" if deterministic else "drawn")
        # Classes per split, so a user sees that shuffling before the split kept every class everywhere
        # (records keyed by label arrive grouped by partition, i.e. by class).
        splits = training.split(len(x), options.validation_rate, options.test_rate, options.seed)
        classes = {name: len(np.unique(np.asarray(y)[idx]))
                   for name, idx in zip(("train", "validation", "test"), splits, strict=True)}
        await reporter.send("ReportTrainingStarted", {
            "deployment_id": deployment_id, "result_ids": plan.result_ids, "seed": options.seed,
            "samples": {"train": n_train, "validation": n_val, "test": n_test, "classes": classes}})
        phase = "training"
        bridge = _ProgressBridge(loop, reporter, plan)
        try:
            # The model code is built, trained, evaluated and exported by the sandboxed trainer.
            output: TrainerOutput = await train_in_sandbox(
                settings.sandbox, plan.versions, x, y, options, {"validation": n_val, "test": n_test},
                bridge.progress)
        except BaseException:
            await bridge.close(quiet=True)  # the training error is the one to report
            raise
        await bridge.close()
        del x  # the trainer had its copy; the labels stay for what is computed from the splits
        phase = "calibrating the exits"
        exits = calibrate(output, np.asarray(y), splits)
        phase = "uploading the trained models"
        for artefacts in output.artefacts:
            for artefact in artefacts.values():
                await api.put_artefact(artefact.data, artefact.sha256)
        phase = "reporting the results"
        # Bottom first: the top result's report, which carries the chain's frontier, comes last.
        reports = [await reporter.send("ReportTrainingResult", {
            "result_id": rid, "metrics": metrics,
            "artefacts": {kind: a.describe() for kind, a in artefacts.items()}, "exits": exit_fields})
            for rid, metrics, artefacts, exit_fields in zip(plan.result_ids, output.metrics, output.artefacts,
                                                            exits, strict=True)]
    except Exception as exc:  # every failure ends as a report and an exit code, never a silent death
        error = classify(exc, phase)
        log.error("training failed: %s", error, exc_info=not isinstance(error, PermanentError))
        return await _report_failure(api, reporter, deployment_id,
                                     plan.result_ids if plan is not None else list(result_ids), error,
                                     ack_timeout_s=ack_timeout_s, poll_interval_s=poll_interval_s)
    try:
        outcomes = await wait_for_outcomes(api, reports, timeout_s=ack_timeout_s, poll_interval_s=poll_interval_s)
    except Exception as exc:  # the results are reported; a failure report now would contradict them
        log.error("the result reports were produced but their outcome is unknown: %s", classify(exc, phase))
        return 1
    rejected = {cid: o for cid, o in outcomes.items() if o.get("status") != "accepted"}
    for cid, outcome in rejected.items():
        log.error("result report %s was rejected: %s", cid, outcome.get("reason"))
    if rejected:
        return 1
    log.info("results %s finished", plan.result_ids)
    return 0


async def _report_failure(api: TrainingApi, reporter: Reporter, deployment_id: int, result_ids: list[int],
                          error: JobError, *, ack_timeout_s: float, poll_interval_s: float) -> int:
    try:
        cid = await reporter.send("ReportTrainingFailure", {
            "deployment_id": deployment_id, "result_ids": result_ids, "reason": str(error)})
        outcome = (await wait_for_outcomes(api, [cid], timeout_s=ack_timeout_s,
                                           poll_interval_s=poll_interval_s))[cid]
    except Exception as exc:  # nothing left to report to: the exit code and this log are what remains
        log.error("could not report the failure: %s", training.short_message(exc))
        return 1
    if outcome.get("status") != "accepted":
        log.error("the failure report was rejected: %s", outcome.get("reason"))
    return exit_code(error)


# -- the CLI ------------------------------------------------------------------------------------------------


def parse_ids(text: str) -> list[int]:
    """"7,8,9" -> [7, 8, 9] (for --results)."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of result ids") from None
    if not ids or any(i < 1 for i in ids):
        raise argparse.ArgumentTypeError(f"{text!r} must name at least one result id >= 1")
    return ids


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `train` to the front door (deploy/cli.py)."""
    train = subparsers.add_parser(
        "train", help="train a deployment's chain (or single model) and report it (the orchestrator starts this)")
    train.add_argument("--deployment", type=int, required=True, metavar="ID", help="the deployment to train")
    train.add_argument("--results", type=parse_ids, required=True, metavar="R1,R2,...",
                       help="the results trained together (one chain, or one non-distributed model)")
    train.add_argument("--api", default="", metavar="URL", help="the tierflow API (default: TIERFLOW_API_URL)")
    train.add_argument("--seed", type=int, default=None,
                       help="the split and training seed, for a reproducible training (default: the deployment's "
                            "seed, else random)")
    train.add_argument("--datasource-timeout", type=float, default=600.0, metavar="SECONDS",
                       help="how long to wait for the deployment's datasource to be announced")
    train.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_main(args, settings))


async def _main(args: argparse.Namespace, settings: Settings) -> int:
    api_url = str(args.api or settings.api.url)
    if not api_url:
        log.error("no API to read the deployment from: pass --api URL or set TIERFLOW_API_URL")
        return 2
    async with HttpTrainingApi(api_url, settings.api.token) as api:
        # The API is the reporter too: the decider accepts training reports only with the API's proof.
        return await run_training(settings, args.deployment, args.results, api=api, reporter=api,
                                  seed=args.seed, datasource_timeout_s=args.datasource_timeout)
