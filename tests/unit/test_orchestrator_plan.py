"""The orchestrator's pure planner: which training workloads to launch, fail, remove or queue."""

from __future__ import annotations

from tierflow.streams.launcher import WorkloadStatus
from tierflow.streams.orchestrator import Group, groups_from_rows, plan_inference, plan_training, tier_spec


def row(rid: int, status: str, chain: list[int], dep: int = 1, data: bool = True) -> dict[str, object]:
    return {"id": rid, "deployment_id": dep, "status": status, "chain": chain, "workload": None, "has_data": data}


def running(name: str) -> WorkloadStatus:
    return WorkloadStatus(name=name, kind="training", labels={}, phase="running")


def ended(name: str, phase: str, code: int, reason: str = "") -> WorkloadStatus:
    return WorkloadStatus(name=name, kind="training", labels={}, phase=phase, exit_code=code, reason=reason or None)


def test_results_are_grouped_by_chain_bottom_first() -> None:
    groups = groups_from_rows([row(1, "created", [1, 2, 3]), row(2, "created", [1, 2, 3]),
                               row(3, "created", [1, 2, 3]), row(4, "created", [4])])
    assert [g.result_ids for g in groups] == [(1, 2, 3), (4,)]
    assert [g.name for g in groups] == ["tierflow-train-1-1", "tierflow-train-1-4"]


def test_nothing_starts_before_the_datasource_is_announced() -> None:
    plan = plan_training(groups_from_rows([row(1, "created", [1], data=False)]), [], 2)
    assert plan.launch == [] and plan.queued == []


def test_the_cap_queues_the_rest_visibly_in_order() -> None:
    groups = groups_from_rows([row(i, "created", [i], dep=i) for i in range(1, 5)])
    plan = plan_training(groups, [running("tierflow-train-9-9")], 2)
    assert [g.result_ids for g in plan.launch] == [(1,)]
    assert [(g.result_ids, pos) for g, pos, _ in plan.queued] == [((2,), 1), ((3,), 2), ((4,), 3)]
    assert "limit 2" in plan.queued[0][2]
    # The stray workload (no results call for it) is removed.
    assert plan.remove == ["tierflow-train-9-9"]


def test_a_finished_result_is_never_retrained_even_when_its_workload_is_gone() -> None:
    groups = groups_from_rows([row(1, "finished", [1, 2]), row(2, "finished", [1, 2])])
    plan = plan_training(groups, [], 2)
    assert plan.launch == [] and plan.relaunch == [] and plan.fail == []


def test_a_workload_that_ended_without_reporting_fails_its_open_results() -> None:
    groups = groups_from_rows([row(1, "finished", [1, 2]), row(2, "training", [1, 2])])
    plan = plan_training(groups, [ended("tierflow-train-1-1", "failed", 137, "killed by SIGKILL\nlast lines")], 2)
    assert len(plan.fail) == 1
    group, reason = plan.fail[0]
    assert group.open_ids == [2]
    assert "killed by SIGKILL" in reason and "[2]" in reason


def test_ended_results_get_their_workload_removed_and_running_ones_are_left_alone() -> None:
    groups = groups_from_rows([row(1, "stopped", [1]), row(2, "training", [2])])
    plan = plan_training(groups, [running("tierflow-train-1-1"), running("tierflow-train-1-2")], 1)
    assert plan.remove == ["tierflow-train-1-1"]
    assert plan.launch == [] and plan.fail == []


def test_an_open_launched_result_whose_workload_vanished_is_launched_again() -> None:
    plan = plan_training(groups_from_rows([row(5, "deployed", [5])]), [], 1)
    assert [g.result_ids for g in plan.relaunch] == [(5,)]
    assert plan.launch == []


def test_group_properties() -> None:
    g = Group(deployment_id=3, result_ids=(7, 8), statuses=("finished", "training"), has_data=True)
    assert g.open and g.launched and g.open_ids == [8] and g.name == "tierflow-train-3-7"


def inference(ident: int, status: str, tiers: int) -> dict[str, object]:
    return {"id": ident, "status": status, "output_topic": "out",
            "tiers": [{"index": k, "result_id": 10 + k, "model_name": f"m{k}", "input_topic": f"in{k}",
                       "replicas": 1, "bootstrap_servers": None} for k in range(tiers)]}


def tier_workload(name: str, phase: str = "running") -> WorkloadStatus:
    return WorkloadStatus(name=name, kind="inference", labels={}, phase=phase)


def test_a_running_inference_gets_one_workload_per_tier() -> None:
    plan = plan_inference([inference(1, "running", 3)], [tier_workload("tierflow-infer-1-tier1")])
    assert [(inf["id"], tier["index"]) for inf, tier in plan.launch] == [(1, 0), (1, 2)]
    assert plan.remove == []


def test_stopped_and_deleted_inferences_lose_their_workloads() -> None:
    existing = [tier_workload("tierflow-infer-1-tier0"), tier_workload("tierflow-infer-2-tier0")]
    plan = plan_inference([inference(1, "stopped", 1)], existing)
    assert plan.launch == [] and sorted(plan.remove) == ["tierflow-infer-1-tier0", "tierflow-infer-2-tier0"]


def test_a_crashed_tier_is_removed_so_the_next_pass_launches_it_again() -> None:
    plan = plan_inference([inference(4, "running", 1)], [tier_workload("tierflow-infer-4-tier0", "failed")])
    assert plan.remove == ["tierflow-infer-4-tier0"] and plan.launch == []
    again = plan_inference([inference(4, "running", 1)], [])
    assert [tier["index"] for _, tier in again.launch] == [0]


def test_tier_spec_runs_the_tier_command_with_its_labels_and_replicas() -> None:
    inf = inference(7, "running", 2)
    spec = tier_spec(inf, inf["tiers"][1] | {"replicas": 3}, {"A": "1"})  # type: ignore[index, operator]
    assert spec.args == ["tier", "run", "--inference", "7", "--tier", "1"]
    assert spec.kind == "inference" and spec.replicas == 3
    assert spec.labels["tierflow.io/tier"] == "1" and spec.labels["tierflow.io/inference"] == "7"
    assert spec.env["A"] == "1" and spec.env["TIERFLOW_TIER_PORT"] == "0"  # local: each picks a free port
    pod = tier_spec(inf, inf["tiers"][0], {"TIERFLOW_TIER_PORT": "8000"}, port=9100)  # type: ignore[index]
    assert pod.env["TIERFLOW_TIER_PORT"] == "9100"


def test_tier_pods_are_labelled_by_chain_level_or_its_name() -> None:
    from tierflow.streams.orchestrator import tier_label

    assert tier_label({"index": 0, "level": 1}) == "1"  # a mid-chain entry: the fog model on fog nodes
    assert tier_label({"index": 0, "level": 1}, ("edge", "fog", "cloud")) == "fog"
    assert tier_label({"index": 2}) == "2"  # an inference requested before levels existed
    assert tier_label({"index": 0, "level": 3}, ("edge", "fog")) == "3"  # more levels than names
    inf = inference(7, "running", 2)
    spec = tier_spec(inf, inf["tiers"][1] | {"level": 2}, {}, tier_names=("edge", "fog", "cloud"))  # type: ignore[index, operator]
    assert spec.labels["tierflow.io/tier"] == "cloud"


def test_inference_topics_get_the_partitions_asked_or_one_per_replica() -> None:
    from tierflow.streams.orchestrator import inference_topics

    inf = {"output_topic": "out", "tiers": [
        {"input_topic": "in", "replicas": 1, "bootstrap_servers": "edge:9092"},
        {"input_topic": "t1", "replicas": 6, "bootstrap_servers": None},
        {"input_topic": "t2", "replicas": 1, "bootstrap_servers": None}]}
    by_cluster = inference_topics(inf, "core:9092", partitions=4)
    assert {c: [(t.name, t.partitions) for t in specs] for c, specs in by_cluster.items()} == {
        "edge:9092": [("in", 4), ("out", 4)],
        "core:9092": [("t1", 6), ("out", 4), ("t2", 4)],
    }


def test_only_batches_with_workload_events_wake_the_orchestrator() -> None:
    from tierflow.projections.schema import concerns_workloads, notify_payload
    from tierflow.streams.catalogue import EVENT_TYPES, WORKLOAD_EVENTS
    from tierflow.streams.orchestrator import Orchestrator
    from tierflow.streams.settings import Settings

    assert WORKLOAD_EVENTS <= EVENT_TYPES  # a renamed event would silently stop waking it
    assert {"TrainingProgressed", "ModelCreated", "ConfigurationCreated", "CommandRejected"}.isdisjoint(
        WORKLOAD_EVENTS)
    assert concerns_workloads(notify_payload(41, True)) and not concerns_workloads(notify_payload(41, False))
    orchestrator = Orchestrator(Settings.from_env({}), launcher=None, workload_env={})  # type: ignore[arg-type]
    orchestrator._on_notify(None, 1, "tierflow_projected", notify_payload(7, False))
    assert not orchestrator._wake.is_set()
    orchestrator._on_notify(None, 1, "tierflow_projected", notify_payload(8, True))
    assert orchestrator._wake.is_set()
