"""The training job's I/O: the ports `run_training` needs, and their real adapters.

`tierflow.tiers.train_job.run_training` reads the deployment, its results, model versions and datasources
and uploads artefacts through a `TrainingApi`, loads the announced records through a `DataLoader` and
sends its reports through a `Reporter`. The job's CLI wires the real adapters below (`HttpTrainingApi` over
the tierflow API, which is also the job's `Reporter`: only a report the API vouches for is accepted, see
streams/proofs.py; `KafkaDataLoader` over the broker); the tests wire fakes. An API answer becomes
streams.errors' pair: a 404 is `ApiNotFound` (permanent), other 4xx answers are permanent, 5xx answers and
an unreachable API temporary.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import aiohttp
import numpy as np
import numpy.typing as npt
import orjson

from tierflow.streams.errors import PermanentError, TemporaryError
from tierflow.streams.settings import KafkaSettings

JSON = dict[str, Any]
Arrays = tuple[npt.NDArray[Any], npt.NDArray[Any]]

log = logging.getLogger(__name__)


class ApiNotFound(PermanentError):
    """The API answered 404: the deployment, result or model version does not exist (any more)."""


# -- the ports: the I/O run_training needs ------------------------------------------------------------------


class TrainingApi(Protocol):
    """The tierflow API as the training job sees it."""

    async def deployment(self, deployment_id: int) -> JSON: ...

    async def result(self, result_id: int) -> JSON: ...

    async def model_version(self, model_id: int, version: int) -> JSON: ...

    async def datasources(self, deployment_id: int) -> list[JSON]:
        """The deployment's announced datasources (any order)."""
        ...

    async def put_artefact(self, data: bytes, sha256: str) -> JSON:
        """Store `data`; answers `{"sha256", "size"}` once the API verified the hash."""
        ...

    async def command_outcome(self, command_id: str) -> JSON | None:
        """The command's outcome (`{"status": "accepted" | "rejected", "reason"?}`), None while pending."""
        ...


class DataLoader(Protocol):
    async def load(self, datasource: JSON) -> Arrays:
        """(x, y) of every record the datasource announces, samples first."""
        ...


class Reporter(Protocol):
    """Sends one training report (`HttpTrainingApi` through the API); answers its command_id."""

    async def send(self, command_type: str, payload: JSON) -> str: ...


# -- the adapters -------------------------------------------------------------------------------------------


class HttpTrainingApi:
    """`TrainingApi` over HTTP (aiohttp). GETs are retried briefly on connection errors and 5xx answers."""

    def __init__(self, base_url: str, token: str = "", *, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpTrainingApi:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(self, method: str, path: str, *, data: bytes | None = None,
                       headers: Mapping[str, str] | None = None, idempotent: bool = False) -> tuple[int, Any]:
        if self._session is None:
            raise RuntimeError("use `async with HttpTrainingApi(...)`")
        sent = {"Accept": "application/json", **(headers or {})}
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        attempts = self.retries if method == "GET" or idempotent else 1
        for attempt in range(1, attempts + 1):
            try:
                async with self._session.request(method, self.base_url + path, data=data, headers=sent) as resp:
                    body = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"cannot reach the tierflow API at {self.base_url}: {type(exc).__name__}: {exc}"
                if attempt == attempts:
                    raise TemporaryError(f"{problem} (set --api or TIERFLOW_API_URL)") from exc
            else:
                if status < 500 or attempt == attempts:
                    break
                problem = f"{method} {path} answered HTTP {status}"
            log.warning("%s; retrying (%d/%d)", problem, attempt, attempts)
            await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
        try:
            parsed: Any = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            parsed = None
        if status >= 400:
            err = parsed.get("error") if isinstance(parsed, dict) else None
            message = err.get("message") if isinstance(err, dict) else None
            text = f"{method} {path} answered HTTP {status}" + (f": {message}" if message else "")
            if status == 404:
                raise ApiNotFound(text)
            raise (TemporaryError if status >= 500 else PermanentError)(text)
        if not isinstance(parsed, dict):
            raise TemporaryError(f"{method} {path} answered HTTP {status} without a JSON object; "
                                 f"is {self.base_url} a tierflow API?")
        return status, parsed

    async def _get(self, path: str) -> JSON:
        _, body = await self._request("GET", path)
        result: JSON = body
        return result

    async def deployment(self, deployment_id: int) -> JSON:
        return await self._get(f"/deployments/{deployment_id}")

    async def result(self, result_id: int) -> JSON:
        return await self._get(f"/results/{result_id}")

    async def model_version(self, model_id: int, version: int) -> JSON:
        return await self._get(f"/models/{model_id}/versions/{version}")

    async def datasources(self, deployment_id: int) -> list[JSON]:
        page = await self._get(f"/datasources?deployment_id={deployment_id}&limit=1000")
        items = list(page.get("items") or [])
        total = int(page.get("total") or len(items))
        if total > len(items):  # the latest lies beyond the first page
            last = await self._get(f"/datasources?deployment_id={deployment_id}&limit=1&offset={total - 1}")
            items.extend(last.get("items") or [])
        return items

    async def put_artefact(self, data: bytes, sha256: str) -> JSON:
        _, body = await self._request("PUT", "/artefacts", data=data,
                                      headers={"X-Sha256": sha256, "Content-Type": "application/octet-stream"})
        if body.get("sha256") != sha256:
            raise TemporaryError(f"the API stored the artefact as {body.get('sha256')}, not {sha256}")
        stored: JSON = body
        return stored

    async def send(self, command_type: str, payload: JSON) -> str:
        """`Reporter`: the report goes to `POST /reports`, where the API vouches for it (the decider accepts no
        training report straight from the commands topic)."""
        command_id = str(uuid.uuid4())  # made here, so a report sent again after a lost answer counts once
        body = orjson.dumps({"type": command_type, "payload": payload, "command_id": command_id})
        await self._request("POST", "/reports", data=body, headers={"Content-Type": "application/json"},
                            idempotent=True)
        return command_id

    async def command_outcome(self, command_id: str) -> JSON | None:
        status, body = await self._request("GET", f"/commands/{command_id}")
        if status == 202 or body.get("status") not in ("accepted", "rejected"):
            return None
        outcome: JSON = body
        return outcome


class KafkaDataLoader:
    """`DataLoader` over the broker: `tierflow.tiers.reader.read_datasource` reads exactly the announced ranges."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka

    async def load(self, datasource: JSON) -> Arrays:
        from tierflow.tiers.reader import read_datasource  # the reader pulls in aiokafka/fastavro decoders

        read: Callable[..., Any] = read_datasource
        if inspect.iscoroutinefunction(read):
            loaded = await read(self.kafka, datasource)
        else:
            loaded = await asyncio.to_thread(read, self.kafka, datasource)
        x, y = loaded
        return np.asarray(x), np.asarray(y)
