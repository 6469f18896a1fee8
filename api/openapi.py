"""The OpenAPI 3.1 document served at `/openapi.json`; a test checks it matches the registered routes."""

from __future__ import annotations

from typing import Any

from tierflow.streams.catalogue import SEED_LIMIT
from tierflow.streams.statuses import InferenceStatus, ResultStatus

JSON = dict[str, Any]

_INT = {"type": "integer"}
_STR = {"type": "string"}
_SHAPE = {"type": "array", "items": {"type": ["integer", "null"]}}
_TS = {"type": "string", "format": "date-time"}


def _obj(props: JSON, required: list[str] | None = None) -> JSON:
    out: JSON = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    return out


def _ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


def _list(name: str) -> JSON:
    return _obj({"items": {"type": "array", "items": _ref(name)}, "total": _INT})


_TARGET = {"type": "object", "minProperties": 1, "maxProperties": 1,
           "description": "exactly one of: the largest accuracy drop against the top exit, the least cascade "
                          "accuracy, the largest share of inputs reaching the top tier (90% one-sided bounds)",
           "properties": {"max_accuracy_drop": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                          "min_accuracy": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                          "max_top_share": {"type": "number", "minimum": 0, "maximum": 1}}}

SCHEMAS: JSON = {
    "Error": _obj({"error": _obj({"code": _STR, "message": _STR, "field": {"type": ["string", "null"]}})}),
    "ReportIn": _obj({"type": {"enum": ["ReportTrainingStarted", "ReportTrainingProgress", "ReportTrainingResult",
                                         "ReportTrainingFailure"]},
                      "payload": {"type": "object", "description": "as in docs/commands.md"},
                      "command_id": {"type": "string", "format": "uuid"}}, ["type", "payload"]),
    "Pending": _obj({"command_id": _STR, "status": {"const": "pending"}, "message": _STR}),
    "ModelIn": _obj({"name": {"type": "string", "minLength": 1, "maxLength": 64}, "description": _STR,
                     "imports": _STR, "code": {"type": "string", "description": "Keras snippet or Keras JSON"},
                     "distributed": {"type": "boolean"}, "upper_id": {"type": ["integer", "null"]},
                     "expected_version": _INT}, ["name", "code"]),
    "Model": _obj({"id": _INT, "name": _STR, "description": _STR, "imports": _STR, "code": _STR,
                   "distributed": {"type": "boolean"}, "upper_id": {"type": ["integer", "null"]},
                   "lower_id": {"type": ["integer", "null"]}, "version": _INT, "input_shape": _SHAPE,
                   "output_shapes": {"type": "array", "items": _SHAPE}, "params": _INT, "created_at": _TS,
                   "updated_at": _TS}),
    "ConfigurationIn": _obj({"name": _STR, "description": _STR,
                             "model_ids": {"type": "array", "items": _INT, "minItems": 1},
                             "expected_version": _INT}, ["name", "model_ids"]),
    "Configuration": _obj({"id": _INT, "name": _STR, "description": _STR,
                           "model_ids": {"type": "array", "items": _INT}, "version": _INT, "created_at": _TS,
                           "updated_at": _TS}),
    "DeploymentIn": _obj({"configuration_id": _INT, "batch": {"type": "integer", "minimum": 1},
                          "fit_options": {"type": "object"}, "eval_options": {"type": "object"},
                          "optimizer": _STR, "learning_rate": {"type": "number"}, "loss": _STR,
                          "metrics": {"type": "array", "items": _STR},
                          "loss_weights": {"type": ["array", "object", "null"]},
                          "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": SEED_LIMIT - 1,
                                   "description": "train reproducibly with this seed (default: a drawn one)"}},
                         ["configuration_id", "batch"]),
    "Deployment": _obj({"id": _INT, "configuration_id": _INT, "batch": _INT, "fit_options": {"type": "object"},
                        "eval_options": {"type": "object"}, "optimizer": _STR,
                        "learning_rate": {"type": ["number", "null"]}, "loss": _STR,
                        "metrics": {"type": "array", "items": _STR}, "loss_weights": {},
                        "seed": {"type": ["integer", "null"]}, "model_versions": {"type": "object"},
                        "result_ids": {"type": "array", "items": _INT},
                        "created_at": _TS}),
    "Result": _obj({"id": _INT, "deployment_id": _INT, "model_id": _INT, "model_name": _STR,
                    "model_version": _INT, "status": {"enum": [s.value for s in ResultStatus]},
                    "chain": {"type": "array", "items": _INT}, "workload": {"type": ["string", "null"]},
                    "queued": {"type": ["object", "null"]}, "seed": {"type": ["integer", "null"]},
                    "samples": {}, "history": {"type": "array", "items": {"type": "object"}},
                    "metrics": {"type": ["object", "null"]}, "artefacts": {"type": ["object", "null"]},
                    "error": {"type": ["string", "null"]}, "created_at": _TS, "updated_at": _TS,
                    "started_at": {"type": ["string", "null"]}, "finished_at": {"type": ["string", "null"]}}),
    "Range": _obj({"topic": _STR, "partition": _INT, "start": _INT,
                   "end": {"type": "integer", "description": "exclusive"}}),
    "Datasource": _obj({
        "id": _INT, "deployment_id": _INT,
        "ranges": {"type": "array", "items": _ref("Range"),
                   "description": "the offset ranges training reads (used)"},
        "announced_ranges": {"type": "array", "items": _ref("Range"),
                             "description": "the ranges the sink announced, one per used range at the same index"},
        "range_reasons": {"type": "array", "items": _STR,
                          "description": "why the used ranges differ from the announced ones (empty: they do not)"},
        "warnings": {"type": "array", "items": _STR,
                     "description": "where the broker's data does not match the used ranges"},
        "input_format": {"enum": ["RAW", "AVRO"]}, "input_config": {"type": "object"}, "description": _STR,
        "validation_rate": {"type": "number"}, "test_rate": {"type": "number"},
        "total_msg": {"type": ["integer", "null"]}, "origin": {}, "created_at": _TS}),
    "SendDatasource": _obj({"deployment_id": _INT}, ["deployment_id"]),
    "ModelVersion": _obj({"model_id": _INT, "version": _INT, "name": _STR, "imports": _STR, "code": _STR,
                          "distributed": {"type": "boolean"}, "upper_id": {"type": ["integer", "null"]},
                          "input_shape": _SHAPE, "output_shapes": {"type": "array", "items": _SHAPE},
                          "params": _INT, "created_at": _TS}),
    "Results": _obj({"deployment_id": _INT, "items": {"type": "array", "items": _ref("Result")}, "total": _INT}),
    "InferenceIn": _obj({"result_id": _INT, "input_topic": _STR, "output_topic": _STR,
                         "limit": {"type": "number", "description": "typed limit on the raw max(p) (Kafka-ML)"},
                         "limits": {"type": "object"}, "target": _TARGET,
                         "costs_s": {"type": "object", "description": "with a target: {result_id: seconds per "
                                                                      "sample} overriding the measured costs"},
                         "shadow_fraction": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.02},
                         "replicas": _INT, "bootstrap_servers": _STR, "input_format": {"enum": ["RAW", "AVRO"]},
                         "input_config": {"type": "object"},
                         "tiers": {"type": "array", "items": _obj({"result_id": _INT, "bootstrap_servers": _STR,
                                                                   "replicas": _INT, "limit": {"type": "number"},
                                                                   "upper_topic": _STR,
                                                                   "cost_s": {"type": "number"}}, ["result_id"])}},
                        ["result_id", "input_topic", "output_topic"]),
    "Inference": _obj({"id": _INT, "status": {"enum": [s.value for s in InferenceStatus]}, "result_id": _INT,
                       "deployment_id": _INT, "input_topic": _STR, "output_topic": _STR, "input_format": _STR,
                       "input_config": {"type": "object"},
                       "tiers": {"type": "array", "items": _obj({
                           "index": _INT, "result_id": _INT, "model_id": _INT, "model_name": _STR,
                           "input_topic": _STR, "upper_topic": {"type": ["string", "null"]},
                           "limit": {"type": "number"}, "replicas": _INT,
                           "bootstrap_servers": {"type": ["string", "null"]}, "top": {"type": "boolean"},
                           "compare": {"enum": ["raw", "calibrated"]}, "temperature": {"type": "number"},
                           "eps": {"type": "number"}, "predicted": {"type": ["object", "null"], "properties": {
                               "share": {"type": "number"}, "agreement": {"type": ["number", "null"]},
                               "agreement_lower": {"type": ["number", "null"]}}}})},
                       "shadow_fraction": {"type": "number"}, "target": {"oneOf": [_TARGET, {"type": "null"}]},
                       "predicted": {"type": ["object", "null"],
                                     "description": "the chosen point on the validation split (and `test`)"},
                       "created_at": _TS, "updated_at": _TS}),
    "ResultExits": _obj({"result_id": _INT, "chain": {"type": "array", "items": _INT}, "finished": {"type": "boolean"},
                         "exits": {"type": "array", "items": _obj({
                             "exit": _INT, "result_id": _INT, "model_name": {"type": ["string", "null"]},
                             "temperature": {"type": "number"}, "cost_s": {"type": ["number", "null"]},
                             "calibration": {"type": ["object", "null"], "properties": {
                                 "accuracy": {"type": "number"}, "ece_before": {"type": "number"},
                                 "ece_after": {"type": "number"}, "nll_before": {"type": "number"},
                                 "nll_after": {"type": "number"}, "n_fit": _INT, "n_measured": _INT,
                                 "n_bins": _INT, "measured_on": {"enum": ["test", "validation"]}}}})},
                         "frontier": {"type": ["object", "null"],
                                      "description": "the exit frontier record (docs/commands.md)"},
                         "reason": {"type": ["string", "null"]}}),
    "Predictions": _obj({"inference_id": _INT, "items": {"type": "array", "items": _obj({
        "tier": _INT, "class": _INT, "confidence": {"type": "number"}, "values": {"type": "array"},
        "origin": {}, "latency_ms": {"type": ["number", "null"]}, "timestamp_ms": _INT})}, "total": _INT,
        "unreachable": {"type": "array", "items": _STR}}),
    "InferenceStats": _obj({"inference_id": _INT, "status": _STR, "window": _INT,
                            "tiers": {"type": "array", "items": _obj({
                                "index": _INT, "result_id": _INT, "model_name": _STR, "limit": {"type": "number"},
                                "input_topic": _STR, "answered": _INT, "share": {"type": "number"},
                                "latency_ms": {"type": "object"},
                                "lag": {"type": ["integer", "null"],
                                        "description": "input records the tier has not committed yet"}})},
                            "throughput_per_s": {"type": ["number", "null"]}, "latency_ms": {"type": "object"},
                            "unreachable": {"type": "array", "items": _STR}}),
    "Outcome": _obj({"command_id": _STR, "status": {"enum": ["accepted", "rejected"]}, "event_type": _STR,
                     "aggregate": _STR, "seq": _INT, "reason": {}, "occurred_at": _TS}),
    "Deleted": _obj({"id": _INT, "deleted": {"type": "boolean"}, "command_id": _STR}),
    "TokenIn": _obj({"tier": _INT}),
    "TierToken": _obj({"token": _STR, "scope": {"enum": ["tier"]}, "inference_id": _INT, "tier": _INT,
                       "result_id": _INT}),
}


def _resp(code: str, schema: str | None, description: str) -> JSON:
    body: JSON = {"description": description}
    if schema:
        body["content"] = {"application/json": {"schema": _ref(schema) if not schema.startswith("list:")
                                                else _list(schema[5:])}}
    return {code: body}


def _op(summary: str, ok: tuple[str, str | None], body: str | None = None, write: bool = False,
        params: list[JSON] | None = None) -> JSON:
    responses: JSON = {}
    responses.update(_resp(ok[0], ok[1], "success"))
    if write:
        responses.update(_resp("202", "Pending", "outcome not known within the command timeout"))
        responses.update(_resp("409", "Error", "conflict with the current state"))
        responses.update(_resp("422", "Error", "a field is invalid (the error names it)"))
        responses.update(_resp("415", "Error", "the body is not application/json"))
    responses.update(_resp("401", "Error", "no bearer token, or one this API did not issue"))
    responses.update(_resp("403", "Error", "a foreign Origin or Host, or a workload token outside its scope"))
    responses.update(_resp("404", "Error", "unknown id"))
    op: JSON = {"summary": summary, "responses": responses}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    if params:
        op["parameters"] = params
    return op


def _q(name: str, schema: JSON) -> JSON:
    return {"name": name, "in": "query", "required": False, "schema": schema}


#: Path ids are the projections' `integer` ids: anything else is a 404 (api/routes.py: path_id).
_ID = [{"name": "id", "in": "path", "required": True,
        "schema": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}}]
_PAGE = [_q("limit", _INT), _q("offset", _INT)]


def _window(default: int, maximum: int) -> JSON:
    """A window of answers: how many samples, bounded (api/routes.py: MAX_PREDICTIONS, MAX_STATS_WINDOW)."""
    return {"type": "integer", "minimum": 1, "maximum": maximum, "default": default}


def paths() -> JSON:
    return {
        "/models": {
            "get": _op("List models", ("200", "list:Model"),
                       params=[_q("distributed", {"type": "boolean"}), _q("name", _STR), *_PAGE]),
            "post": _op("Register a model (its code is built in the sandbox)", ("201", "Model"), "ModelIn", True),
        },
        "/models/{id}": {
            "get": _op("Get a model", ("200", "Model"), params=_ID),
            "put": _op("Update a model", ("200", "Model"), "ModelIn", True, _ID),
            "delete": _op("Delete a model", ("200", "Deleted"), write=True, params=_ID),
        },
        "/configurations": {
            "get": _op("List configurations", ("200", "list:Configuration"), params=_PAGE),
            "post": _op("Create a configuration (chains expanded)", ("201", "Configuration"), "ConfigurationIn",
                        True),
        },
        "/configurations/{id}": {
            "get": _op("Get a configuration", ("200", "Configuration"), params=_ID),
            "put": _op("Update a configuration", ("200", "Configuration"), "ConfigurationIn", True, _ID),
            "delete": _op("Delete a configuration", ("200", "Deleted"), write=True, params=_ID),
        },
        "/deployments": {
            "get": _op("List deployments", ("200", "list:Deployment"), params=_PAGE),
            "post": _op("Deploy a configuration for training", ("201", "Deployment"), "DeploymentIn", True),
        },
        "/deployments/{id}": {
            "get": _op("Get a deployment", ("200", "Deployment"), params=_ID),
            "delete": _op("Delete a deployment and its results", ("200", "Deleted"), write=True, params=_ID),
        },
        "/deployments/{id}/results": {"get": _op("Results of a deployment", ("200", "list:Result"),
                                                 params=[*_ID, *_PAGE])},
        "/results": {"get": _op("List training results", ("200", "list:Result"), params=_PAGE)},
        "/results/{id}": {
            "get": _op("Get a training result (status, per-epoch history, metrics per split)", ("200", "Result"),
                       params=_ID),
            "delete": _op("Delete a result no inference uses", ("200", "Deleted"), write=True, params=_ID),
        },
        "/results/{id}/exits": {"get": {
            "summary": "The calibration of each exit of the result's chain and the chain's exit frontier",
            "parameters": _ID,
            "responses": {**_resp("200", "ResultExits", "per exit T, accuracy, ECE before/after; the frontier"),
                          **_resp("404", "Error", "no such result"),
                          **_resp("409", "Error", "the chain is still training, or it has no calibration (the "
                                                  "message says why: e.g. validation_rate 0)")}}},
        "/results/{id}/stop": {"post": _op("Stop the training of a result (its whole chain)", ("200", "Results"),
                                           write=True, params=_ID)},
        "/results/{id}/model": {"get": {
            "summary": "Download a trained sub-model (Keras file, or LiteRT with format=tflite)",
            "parameters": [*_ID, _q("format", {"enum": ["keras", "tflite"]})],
            "responses": {"200": {"description": "the artefact; X-Sha256 header carries its hash",
                                  "content": {"application/octet-stream": {}}},
                          **_resp("404", "Error", "no such result or artefact")}}},
        "/reports": {"post": {
            "summary": "A training workload's report (started, progress, result, failure): the API vouches for it "
                       "(docs/commands.md); the outcome is at the Location. A training token reports for its own "
                       "results only",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ReportIn")}}},
            "responses": {**_resp("202", "Pending", "on the commands topic; poll its Location for the outcome"),
                          **_resp("401", "Error", "no bearer token, or one this API did not issue"),
                          **_resp("403", "Error", "a workload token whose claims do not cover the reported results"),
                          **_resp("422", "Error", "not a workload's report (the error names the field)"),
                          **_resp("503", "Error", "the API has no TIERFLOW_SECRET_KEY to vouch with")}}},
        "/artefacts": {"put": {
            "summary": "Upload an artefact (content-addressed); X-Sha256 is verified when sent",
            "requestBody": {"required": True, "content": {"application/octet-stream": {}}},
            "responses": {"201": {"description": "stored", "content": {"application/json": {"schema": _obj(
                {"sha256": _STR, "size": _INT})}}}, **_resp("422", "Error", "hash mismatch"),
                **_resp("401", "Error", "no token"),
                **_resp("403", "Error", "not the token of an open training (or the admin's)"),
                **_resp("413", "Error", "larger than TIERFLOW_MAX_ARTEFACT_BYTES"),
                **_resp("415", "Error", "not application/octet-stream")}}},
        "/artefacts/{sha256}": {"get": {
            "summary": "Download an artefact by its sha256",
            "parameters": [{"name": "sha256", "in": "path", "required": True, "schema": _STR}],
            "responses": {"200": {"description": "the bytes", "content": {"application/octet-stream": {}}},
                          **_resp("404", "Error", "not stored")}}},
        "/models/{id}/versions/{version}": {"get": _op("A model's code at a version (what deployments pin)",
                                                       ("200", "ModelVersion"), params=[*_ID, {
                                                           "name": "version", "in": "path", "required": True,
                                                           "schema": _INT}])},
        "/datasources": {"get": _op("Datasources announced on the control topic", ("200", "list:Datasource"),
                                    params=[_q("deployment_id", _INT), *_PAGE])},
        "/datasources/{id}": {"get": _op("Get a datasource", ("200", "Datasource"), params=_ID)},
        "/datasources/{id}/send": {"post": _op("Send a datasource to another deployment (no re-upload)",
                                               ("201", "Datasource"), "SendDatasource", True, _ID)},
        "/inferences": {
            "get": _op("List inferences", ("200", "list:Inference"), params=_PAGE),
            "post": _op("Serve a trained result (and the chain above it) for inference, with typed limits or "
                        "limits chosen from a target", ("201", "Inference"), "InferenceIn", True),
        },
        "/inferences/{id}": {
            "get": _op("Get an inference", ("200", "Inference"), params=_ID),
            "delete": _op("Delete an inference (its tier workloads are removed)", ("200", "Deleted"), write=True,
                          params=_ID),
        },
        "/inferences/{id}/stop": {"post": _op("Stop an inference's tiers", ("200", "Inference"), write=True,
                                              params=_ID)},
        "/inferences/{id}/token": {"post": _op(
            "Mint the scoped token of one tier, for a tier started by hand on a device (admin token only)",
            ("201", "TierToken"), "TokenIn", False, _ID)},
        "/inferences/{id}/predictions": {"get": _op("The latest answers (tier, class, confidence, origin)",
                                                    ("200", "Predictions"),
                                                    params=[*_ID, _q("limit", _window(50, 1000))])},
        "/inferences/{id}/stats": {"get": _op("Exit distribution per tier, throughput, latency percentiles",
                                              ("200", "InferenceStats"),
                                              params=[*_ID, _q("limit", _window(10_000, 10_000))])},
        "/commands/{command_id}": {"get": _op("Outcome of any command", ("200", "Outcome"), params=[
            {"name": "command_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}])},
        "/healthz": {"get": {"summary": "Liveness (no token)", "security": [],
                             "responses": {"200": {"description": "alive"}}}},
        "/readyz": {"get": {"summary": "Readiness (no token): broker, Postgres, projector, projection lag, each agent "
                                       "of the worker (a failing one named with its error), and the sandbox "
                                       "isolation in force (`sandbox`); `?scope=api`: the API's own Postgres and "
                                       "broker only (the API pods' readiness probe)",
                            "security": [],
                            "parameters": [{"name": "scope", "in": "query", "required": False,
                                            "schema": {"enum": ["all", "api"], "default": "all"}}],
                            "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (a token unless TIERFLOW_METRICS_AUTH=open)",
                             "responses": {"200": {"description": "text"}}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}},
    }


def spec() -> JSON:
    return {
        "openapi": "3.1.0",
        "info": {"title": "tierflow API", "version": "1",
                 "description": "Writes are commands on Kafka; reads are Postgres projections of the events."},
        "paths": paths(),
        # Every route needs `Authorization: Bearer <token>` (the admin's, or a workload's scoped token) but the
        # health probes and the UI's static files; bodies are application/json only.
        "security": [{"bearer": []}],
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
