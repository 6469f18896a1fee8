"""The orchestrator does little while nothing it serves changes: it plans over the open results only, and the
projector wakes it only for batches of events that can change its plan (not for models, configurations or each
epoch's progress report)."""

from __future__ import annotations

from dataclasses import replace

import asyncpg

from tests.conftest import start_plane, stop_plane, wait_until
from tierflow.projections import queries
from tierflow.projections.schema import NOTIFY_CHANNEL, concerns_workloads
from tierflow.streams.client import CommandClient
from tierflow.streams.launcher import WorkloadSpec, WorkloadStatus
from tierflow.streams.orchestrator import Orchestrator, groups_from_rows, plan_training
from tierflow.streams.settings import Settings


async def fake_validate(code: str, imports: str) -> dict[str, object]:
    return {"ok": True, "summary": {"input_shape": [None, 4], "output_shapes": [[None, 3]], "params": 15}}


class NoWorkloads:
    """A launcher with nothing running that launches nothing (the orchestrator's passes are what is counted)."""

    async def launch(self, spec: WorkloadSpec) -> None:
        return None

    async def stop(self, name: str) -> None:
        return None

    async def list(self, kind: str | None = None) -> list[WorkloadStatus]:
        return []

    async def stop_all(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_training_rows_are_the_open_results_and_their_chains(plane: Settings) -> None:
    conn = await asyncpg.connect(plane.database.url)
    try:
        rows = [(1, 1, "finished", [1, 2, 3]), (2, 1, "finished", [1, 2, 3]), (3, 1, "failed", [1, 2, 3]),
                (4, 2, "finished", [4, 5]), (5, 2, "training", [4, 5]), (6, 3, "stopped", []), (7, 4, "created", []),
                (8, 5, "created", [])]
        await conn.executemany(
            "INSERT INTO proj.results (id, deployment_id, model_id, model_version, status, chain, created_at, "
            "updated_at) VALUES ($1, $2, 1, 1, $3, $4, now(), now())", rows)
        await conn.execute(
            "INSERT INTO proj.datasources (id, deployment_id, ranges, announced_ranges, input_format, input_config, "
            "description, validation_rate, test_rate, created_at) "
            "VALUES (1, 5, '[]', '[]', 'RAW', '{}', '', 0.1, 0.1, now())")
        found = await queries.training_rows(conn)
        # The chain of an open result comes whole (its workload is named after the bottom, finished or not);
        # ended chains and ended single results are history the orchestrator no longer reads, and so is a
        # result still waiting for its data (7: nothing is launched before the datasource is announced).
        assert [r["id"] for r in found] == [4, 5, 8]
        groups = groups_from_rows(found)
        assert [g.result_ids for g in groups] == [(4, 5), (8,)]
        assert [g.has_data for g in groups] == [False, True]
        # The workload of an ended chain, no longer among the rows, is still removed (as unwanted).
        ended = WorkloadStatus("tierflow-train-1-1", "training", {}, "succeeded", exit_code=0)
        assert plan_training(groups, [ended], 2).remove == ["tierflow-train-1-1"]
    finally:
        await conn.close()


async def test_the_orchestrator_plans_again_only_for_events_that_can_change_its_plan(plane: Settings) -> None:
    settings = replace(plane, workloads=replace(plane.workloads, reconcile_s=60.0, reconcile_min_s=0.0))
    payloads: list[str] = []
    listen = await asyncpg.connect(settings.database.url)
    await listen.add_listener(NOTIFY_CHANNEL, lambda *args: payloads.append(args[-1]))
    running = await start_plane(settings, fake_validate, NoWorkloads())
    orchestrator = running.worker.orchestrator  # type: ignore[attr-defined]
    assert isinstance(orchestrator, Orchestrator)
    client = CommandClient(settings.kafka)
    await client.start()
    try:
        await wait_until(lambda: orchestrator.reconciled >= 1, what="the first pass")

        async def outcome(command_type: str, payload: dict[str, object]) -> str:
            command_id = await client.send(command_type, payload)

            async def decided() -> str | None:
                found = await queries.get_outcomes(listen, [command_id])
                return found[0]["aggregate"] if found else None

            await wait_until(decided, what=f"{command_type} projected")
            aggregate = await decided()
            assert aggregate is not None
            return aggregate

        passes = orchestrator.reconciled
        model = await outcome("RegisterModel", {"name": "m", "code": "x"})
        configuration = await outcome("CreateConfiguration", {"name": "c", "model_ids": [int(model.split(":")[1])]})
        await outcome("RequestDeployment", {"configuration_id": int(configuration.split(":")[1]), "batch": 10})
        await wait_until(lambda: orchestrator.reconciled > passes, what="a pass for the new deployment's results")
        # One pass for the deployment; none for the model and the configuration projected before it.
        assert orchestrator.reconciled == passes + 1
        flagged = [p for p in payloads if concerns_workloads(p)]
        assert len(flagged) == 1 and len(payloads) >= 3, payloads
    finally:
        await client.stop()
        await stop_plane(running)
        await listen.close()
