"""`tierflow tier run`: serve one tier of an inference (the orchestrator's tier workload, or by hand).

Registered into the front door by deploy/cli.py (`tier_cli.register(subparsers)`); the handler follows the
front door's contract `func(args, settings) -> exit code`. Also runnable as
`python -m tierflow.tiers.tier_cli run ...` (tests, devices without the front door's other dependencies).

Two ways to say what to serve:

* from the API: `--inference N --tier K [--api URL]` reads `GET {api}/inferences/{N}` (`{id, status,
  input_topic, output_topic, input_format, input_config, tiers: [{index, result_id, input_topic,
  upper_topic, limit, bootstrap_servers, ...}]}`) and downloads the tier's trained sub-model once from
  `GET {api}/results/{result_id}/model` (`?format=tflite` for `--engine litert`), checking its `X-Sha256`
  header against the bytes;
* by hand, without the API: `--model PATH --input-topic T --output-topic O [--upper-topic U] [--limit L]
  [--tier-index K] [--top] --bootstrap-servers B [--upper-bootstrap-servers B2] [--input-config JSON]`.

The engine (`--engine`, else TIERFLOW_TIER_ENGINE, "auto" by default): "auto" serves the `.tflite` sub-model
with LiteRT when there is one (trained results export one: see tiers/train_job.py; by hand, a `--model` file
named `*.tflite`), else the Keras one. A LiteRT tier never imports TensorFlow, so it answers a few seconds
after it starts instead of after TensorFlow's import and a graph trace, and its answers hold the same `values`
(LiteRT's outputs agree with Keras's within 1e-4: tests/integration/test_tier_agent.py). The model's
threads: `--threads`, else TIERFLOW_TIER_THREADS (1 by default; tiers/engines.py: `set_threads`).

Exit codes: 0 stopped by SIGTERM/SIGINT after draining; 1 transient (API or broker unreachable, a
download that does not match its checksum, produced records not acknowledged); 2 permanent (bad flags,
an inference that does not exist or is stopped, a model the engine cannot serve).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from tierflow.streams.cli_args import non_negative, port, positive_int, whole_number
from tierflow.streams.errors import TierflowError
from tierflow.streams.settings import Settings, SettingsError
from tierflow.streams.statuses import InferenceStatus
from tierflow.tiers import engines
from tierflow.tiers.data import DataError, InputConfig
from tierflow.tiers.engines import ENGINES
from tierflow.tiers.tier_config import TierConfig, TierConfigError

log = logging.getLogger("tierflow.tier")

JSON = dict[str, Any]
#: The tier's HTTP port when neither --port nor TIERFLOW_TIER_PORT says (WorkloadSettings.tier_port).
DEFAULT_TIER_PORT = 8000


class TierSetupError(TierflowError):
    """The tier cannot start; `exit_code` says whether a retry could help (1) or not (2)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NotFound(TierSetupError):
    """The API answered 404 (no such inference, or no such artefact of the result)."""


#: `--engine` values: an engine, or "auto" (LiteRT when a `.tflite` sub-model is there, else Keras).
AUTO = "auto"
ENGINE_CHOICES = (AUTO, *ENGINES)


def engine_for_file(engine: str, model: Path) -> str:
    """The engine of a sub-model file given by hand: "auto" means LiteRT for a `.tflite` file, else Keras."""
    if engine != AUTO:
        return engine
    return "litert" if model.suffix.lower() == ".tflite" else "keras"


# -- pure: the inference's description -> TierConfig --------------------------------------------------------


def config_from_inference(inference: Mapping[str, Any], tier: int, *, model: bytes | Path, default_servers: str,
                          engine: str = "keras", max_batch: int = 256, linger_ms: float = 0.0,
                          port: int = DEFAULT_TIER_PORT, commit_interval_ms: float = 100.0,
                          check_crcs: bool = False) -> TierConfig:
    """The config of tier `tier` of `inference` (the body of `GET /inferences/{id}`).

    A tier reads and answers on its own cluster (`bootstrap_servers`, else `default_servers`) and forwards to
    the next tier's cluster; the tier with the highest index is the top; only the lowest one reads the
    inference's input format/config (raw inputs of the datasource), the others read tensors.
    """
    tiers = sorted(inference.get("tiers") or [], key=lambda t: int(t["index"]))
    indices = [int(t["index"]) for t in tiers]
    if tier not in indices:
        raise TierSetupError(f"inference {inference.get('id')} has no tier {tier} (its tiers: "
                             f"{', '.join(map(str, indices)) or 'none'})")
    position = indices.index(tier)
    me = tiers[position]
    upper = tiers[position + 1] if position + 1 < len(tiers) else None
    first = position == 0
    raw_config = inference.get("input_config") if first else None
    try:
        input_config = InputConfig.parse(raw_config) if raw_config else None
    except DataError as exc:
        raise TierSetupError(f"inference {inference.get('id')}: {exc}") from exc
    servers = str(me.get("bootstrap_servers") or default_servers)
    upper_servers = str(upper.get("bootstrap_servers") or default_servers) if upper is not None else ""
    limit = me.get("limit")
    try:
        return TierConfig(
            inference_id=int(inference["id"]), tier_index=tier, top=upper is None,
            input_topic=str(me.get("input_topic") or (inference.get("input_topic") if first else "") or ""),
            output_topic=str(inference.get("output_topic") or ""),
            upper_topic=(str(me.get("upper_topic") or upper.get("input_topic") or "") or None) if upper is not None
            else None,
            limit=0.8 if limit is None else float(limit),
            bootstrap_servers=servers, upper_bootstrap_servers=upper_servers,
            input_format=str((inference.get("input_format") if first else None) or "RAW"),
            input_config=input_config, model=model, engine=engine, max_batch=max_batch, linger_ms=linger_ms,
            port=port, commit_interval_ms=commit_interval_ms, check_crcs=check_crcs,
            # Limits chosen from a target compare the calibrated confidence; an inference that names nothing
            # (typed limits, or one requested before calibration) compares the raw max(p).
            compare=str(me.get("compare") or "raw"), temperature=float(me.get("temperature") or 1.0),
            eps=float(me.get("eps") or 1e-12), shadow_fraction=float(inference.get("shadow_fraction") or 0.0),
            target=inference.get("target"), predicted=me.get("predicted"), predicted_chain=inference.get("predicted"),
        )
    except TierConfigError as exc:
        raise TierSetupError(f"inference {inference.get('id')} tier {tier}: {exc}") from exc


def verify_sha256(data: bytes, expected: str | None, what: str) -> None:
    """TierSetupError (transient: download again) when the bytes do not hash to `expected`."""
    if not expected:
        raise TierSetupError(f"{what}: the API sent no X-Sha256 header to verify the download against", 1)
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.strip().lower():
        raise TierSetupError(f"{what}: downloaded {len(data)} bytes hash to {actual}, the API says {expected}", 1)


# -- the API ------------------------------------------------------------------------------------------------


async def fetch_inference(api: str, inference_id: int, token: str = "") -> JSON:
    body, _ = await _get(api, f"/inferences/{inference_id}", token)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise TierSetupError(f"GET /inferences/{inference_id} did not answer JSON; is {api} a tierflow API?",
                             1) from None
    if not isinstance(doc, dict):
        raise TierSetupError(f"GET /inferences/{inference_id} did not answer a JSON object", 1)
    return doc


#: What each engine's artefact starts with (offset, bytes): a `.keras` zip, a `.tflite` flatbuffer.
_MODEL_MAGIC = {"keras": (0, b"PK\x03\x04"), "litert": (4, b"TFL3")}


def check_model_format(data: bytes, engine: str, what: str) -> None:
    """TierSetupError (permanent) unless `data` is the file `engine` loads: `.keras` or `.tflite`, never `.h5`."""
    from tierflow.tiers.engines import H5_REFUSED, HDF5_MAGIC

    if data[:8] == HDF5_MAGIC:
        raise TierSetupError(f"{what}: {H5_REFUSED}")
    offset, magic = _MODEL_MAGIC.get(engine, (0, b""))
    if data[offset:offset + len(magic)] != magic:
        kind = ".tflite" if engine == "litert" else ".keras"
        raise TierSetupError(f"{what} is not a {kind} model (the {engine} engine loads only those)")


async def fetch_model(api: str, result_id: int, engine: str, token: str = "") -> bytes:
    path = f"/results/{result_id}/model" + ("?format=tflite" if engine == "litert" else "")
    data, headers = await _get(api, path, token)
    verify_sha256(data, headers.get("X-Sha256"), f"the model of result {result_id}")
    check_model_format(data, engine, f"the model of result {result_id}")
    return data


async def fetch_engine_model(api: str, result_id: int, engine: str, token: str = "") -> tuple[str, bytes]:
    """(engine, sub-model bytes) for `engine`; "auto": the LiteRT model when the result has one, else Keras's."""
    if engine != AUTO:
        return engine, await fetch_model(api, result_id, engine, token)
    try:
        return "litert", await fetch_model(api, result_id, "litert", token)
    except NotFound as exc:
        log.info("result %d has no LiteRT model (%s): serving it with Keras", result_id, exc)
        return "keras", await fetch_model(api, result_id, "keras", token)


async def _get(api: str, path: str, token: str) -> tuple[bytes, Mapping[str, str]]:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = api.rstrip("/") + path
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session, \
                session.get(url, headers=headers) as resp:
            body = await resp.read()
            if resp.status == 404:
                raise NotFound(f"GET {path} answered 404: {_api_message(body)}")
            if resp.status >= 400:
                raise TierSetupError(f"GET {path} answered HTTP {resp.status}: {_api_message(body)}",
                                     1 if resp.status >= 500 else 2)
            return body, dict(resp.headers)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TierSetupError(f"cannot reach the tierflow API at {api}: {type(exc).__name__}: {exc} (set --api or "
                             "TIERFLOW_API_URL)", 1) from exc


def _api_message(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace")
    err = doc.get("error") if isinstance(doc, dict) else None
    message = err.get("message") if isinstance(err, dict) else err
    return str(message or doc)[:500]


# -- the CLI ------------------------------------------------------------------------------------------------


def _default_servers(settings: Settings) -> str:
    if settings.kafka.bootstrap_servers:
        return settings.kafka.bootstrap_servers
    from tierflow.streams.stack_state import resolve_bootstrap

    try:
        return resolve_bootstrap(settings)
    except RuntimeError as exc:
        raise TierSetupError(str(exc), 1) from exc


def _input_config(text: str | None) -> InputConfig | None:
    if not text:
        return None
    try:
        return InputConfig.parse(text)
    except DataError as exc:
        raise TierSetupError(f"--input-config: {exc}") from exc


def build_config(args: argparse.Namespace, settings: Settings) -> TierConfig:
    """The TierConfig the flags describe (fetching the inference and model from the API when asked)."""
    port = args.port if args.port is not None else settings.workloads.tier_port
    if args.inference is not None:
        if args.tier is None:
            raise TierSetupError("--inference needs --tier K")
        api = str(args.api or settings.api.url)
        if not api:
            raise TierSetupError("no API to read the inference from: pass --api URL or set TIERFLOW_API_URL")
        try:
            default_servers = _default_servers(settings)
        except TierSetupError:
            default_servers = ""  # fine when every tier names its cluster; TierConfig says so otherwise
        from tierflow.streams.stack_state import resolve_api_token

        # --token, else TIERFLOW_API_TOKEN (what the orchestrator gives a tier: its own scoped token, or the one
        # `tierflow inferences token N --tier K` minted for a device), else the stack on this machine's.
        token = resolve_api_token(settings, args.token or "")
        return asyncio.run(config_from_api(api, args.inference, args.tier, default_servers=default_servers,
                                           token=token, engine=args.engine or settings.workloads.tier_engine,
                                           max_batch=args.max_batch,
                                           linger_ms=args.linger_ms, port=port,
                                           commit_interval_ms=args.commit_interval_ms, check_crcs=args.check_crcs))
    missing = [flag for flag, value in (("--model", args.model), ("--input-topic", args.input_topic),
                                        ("--output-topic", args.output_topic)) if not value]
    if missing:
        raise TierSetupError(f"give --inference N --tier K, or {', '.join(missing)} (and --bootstrap-servers)")
    model = Path(args.model)
    if not model.is_file():
        raise TierSetupError(f"--model {model}: no such file")
    try:
        return TierConfig(
            inference_id=args.inference_id, tier_index=args.tier_index, top=args.top or not args.upper_topic,
            input_topic=args.input_topic, output_topic=args.output_topic, upper_topic=args.upper_topic,
            limit=args.limit, bootstrap_servers=args.bootstrap_servers or _default_servers(settings),
            upper_bootstrap_servers=args.upper_bootstrap_servers or "",
            output_bootstrap_servers=args.output_bootstrap_servers or "", input_format=args.input_format,
            input_config=_input_config(args.input_config), model=model,
            engine=engine_for_file(args.engine or settings.workloads.tier_engine, model),
            max_batch=args.max_batch, linger_ms=args.linger_ms, port=port, group_id=args.group or "",
            commit_interval_ms=args.commit_interval_ms, check_crcs=args.check_crcs,
        )
    except TierConfigError as exc:
        raise TierSetupError(str(exc)) from exc


async def config_from_api(api: str, inference_id: int, tier: int, *, default_servers: str, token: str = "",
                          engine: str = "keras", max_batch: int = 256, linger_ms: float = 0.0,
                          port: int = DEFAULT_TIER_PORT, commit_interval_ms: float = 100.0,
                          check_crcs: bool = False) -> TierConfig:
    """Tier `tier` of inference `inference_id` as the API describes it, with its model downloaded and verified
    (`engine` "auto": the LiteRT model when the result has one, else the Keras one)."""
    inference = await fetch_inference(api, inference_id, token)
    status = str(inference.get("status") or "")
    if status == InferenceStatus.STOPPED:  # a deleted inference is a 404 (fetch_inference)
        raise TierSetupError(f"inference {inference_id} is {status}: there is nothing to serve")
    tiers = {int(t["index"]): t for t in inference.get("tiers") or []}
    if tier not in tiers:
        raise TierSetupError(f"inference {inference_id} has no tier {tier} (its tiers: "
                             f"{', '.join(map(str, sorted(tiers))) or 'none'})")
    result_id = int(tiers[tier]["result_id"])
    engine, model = await fetch_engine_model(api, result_id, engine, token)
    log.info("downloaded the %s model of result %d (%d bytes, sha256 verified)", engine, result_id, len(model))
    return config_from_inference(inference, tier, model=model, default_servers=default_servers, engine=engine,
                                 max_batch=max_batch, linger_ms=linger_ms, port=port,
                                 commit_interval_ms=commit_interval_ms, check_crcs=check_crcs)


def run_cli(args: argparse.Namespace, settings: Settings) -> int:
    try:
        config = build_config(args, settings)
    except TierSetupError as exc:
        print(f"tierflow tier run: {exc}", file=sys.stderr)
        return exc.exit_code
    from tierflow.tiers.tier_app import run_worker

    engines.set_threads(args.threads if args.threads is not None else settings.workloads.tier_threads)
    return run_worker(config, settings.kafka, loglevel=settings.log_level)


def _thread_count(text: str) -> int:
    value = whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0 (0: the engine's default, one per core)")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `tier run` to the front door (deploy/cli.py)."""
    tier = subparsers.add_parser("tier", help="serve one tier of an inference (the tier agent)")
    sub = tier.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = sub.add_parser(
        "run", help="serve tier K of inference N (from the API), or a model file on given topics",
        description="Consume the tier's input topic in batches, answer the samples its exit is confident "
                    "about on the output topic and forward the rest to the upper topic.")
    api = run.add_argument_group("from the API")
    api.add_argument("--inference", type=positive_int, metavar="N", help="the inference to serve a tier of")
    api.add_argument("--tier", type=int, metavar="K", help="the tier index (0 = the entry tier)")
    api.add_argument("--api", default="", metavar="URL", help="the tierflow API (default: TIERFLOW_API_URL)")
    api.add_argument("--token", default="", metavar="TOKEN",
                     help="this tier's API token (default: TIERFLOW_API_TOKEN); on a device, mint one with "
                          "`tierflow inferences token N --tier K`")
    hand = run.add_argument_group("by hand (no API)")
    hand.add_argument("--model", metavar="PATH",
                      help="the sub-model file (.keras, or .tflite for litert; .h5 is refused)")
    hand.add_argument("--input-topic", metavar="T")
    hand.add_argument("--output-topic", metavar="O")
    hand.add_argument("--upper-topic", metavar="U", help="where low-confidence samples go (none: the top tier)")
    hand.add_argument("--limit", type=non_negative, default=0.8, metavar="L",
                      help="answer a sample when its highest probability is >= L (default 0.8)")
    hand.add_argument("--tier-index", type=int, default=0, metavar="K", help="this tier's index (default 0)")
    hand.add_argument("--inference-id", type=int, default=0, metavar="N",
                      help="labels the metrics and names the consumer group (default 0)")
    hand.add_argument("--top", action="store_true", help="answer every sample (implied without --upper-topic)")
    hand.add_argument("--bootstrap-servers", metavar="B",
                      help="the tier's cluster (default: KAFKA_BOOTSTRAP_SERVERS or the embedded stack)")
    hand.add_argument("--upper-bootstrap-servers", metavar="B2", help="the upper tier's cluster (default: B)")
    hand.add_argument("--output-bootstrap-servers", metavar="B3", help="the output topic's cluster (default: B)")
    hand.add_argument("--input-format", choices=("RAW", "AVRO"), default="RAW", help="header-less input records")
    hand.add_argument("--input-config", metavar="JSON",
                      help='Kafka-ML input_config of raw inputs, e.g. \'{"data_type": "uint8", "data_reshape": '
                           '"28 28"}\' (default: float32 of the model input)')
    hand.add_argument("--group", metavar="G", help="consumer group (default tierflow-inference-N-tier-K)")
    both = run.add_argument_group("serving")
    both.add_argument("--engine", choices=ENGINE_CHOICES, default=None,
                      help="keras (tf-keras, direct call), litert (the .tflite sub-model; no TensorFlow needed) or "
                           "auto (litert when there is a .tflite sub-model, else keras); default: "
                           "TIERFLOW_TIER_ENGINE, else auto")
    both.add_argument("--threads", type=_thread_count, default=None, metavar="N",
                      help="threads the model may use (default: TIERFLOW_TIER_THREADS, else 1; 0: one per core)")
    both.add_argument("--max-batch", type=positive_int, default=256, metavar="N",
                      help="most records per poll and samples per model call (default 256)")
    both.add_argument("--linger-ms", type=non_negative, default=0.0, metavar="MS",
                      help="wait up to MS for a batch to fill (default 0: take what is there)")
    both.add_argument("--commit-interval-ms", type=non_negative, default=100.0, metavar="MS",
                      help="least time between offset commits (default 100; a crash re-answers at most this much)")
    both.add_argument("--check-crcs", action="store_true",
                      help="verify the CRC of every fetched record batch (off by default, as in librdkafka: it costs "
                           "~2-3 us per float32 28x28 sample; TCP and the broker check data already)")
    both.add_argument("--port", type=port, default=None, metavar="P",
                      help=f"HTTP port of /healthz, /readyz, /metrics (default TIERFLOW_TIER_PORT or "
                           f"{DEFAULT_TIER_PORT}; 0 = a free port)")
    run.set_defaults(func=run_cli)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tierflow.tiers.tier_cli run ...`: the same command without the front door."""
    parser = argparse.ArgumentParser(prog="tierflow")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(["tier", *(argv if argv is not None else sys.argv[1:])])
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"tierflow: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, settings.log_level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code: int = args.func(args, settings)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
