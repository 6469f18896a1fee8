"""Hostile artefacts: a trained model file is data, never code, on every tier host that serves it.

tf-keras loads HDF5 (`.h5`) models without `safe_mode`: a Lambda layer's marshalled bytecode runs when the
model is loaded. An attacker who can upload an artefact (or replay a report naming one) would run code on
every tier that serves it. Tiers load only `.keras` (with `safe_mode=True`, which refuses Lambda bytecode)
or `.tflite`; these tests build the hostile files and hand them to the tier's loading paths.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tierflow.tiers.engines import EngineError, KerasEngine, load_engine
from tierflow.tiers.tier_cli import TierSetupError, fetch_model

pytestmark = pytest.mark.slow


def lambda_model(marker: Path) -> object:
    """A tf-keras model whose Lambda layer writes `marker` whenever it is called (a load that runs it shows)."""
    from tierflow.tiers.keras_code import load_keras

    _, keras = load_keras()
    payload = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).write_text('ran'), x)[1]")
    inputs = keras.Input(shape=(4,))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Lambda(payload)(inputs))
    return keras.Model(inputs, outputs)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / f"lambda-ran-{uuid.uuid4().hex[:8]}"


def saved(model: object, path: Path, fmt: str) -> bytes:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "HDF5 ... is considered legacy": what the attacker wants
        model.save(str(path), save_format=fmt)  # type: ignore[attr-defined]
    return path.read_bytes()


def test_a_tier_refuses_an_h5_artefact_with_a_lambda_layer(tmp_path: Path, marker: Path) -> None:
    data = saved(lambda_model(marker), tmp_path / "model.h5", "h5")
    marker.unlink(missing_ok=True)  # saving traced the layer once
    assert data[:8] == b"\x89HDF\r\n\x1a\n"

    with pytest.raises(EngineError, match=r"\.h5|HDF5"):
        load_engine("keras", data)

    assert not marker.exists(), "the Lambda layer's code ran while the tier loaded the artefact"


def test_a_keras_artefact_with_lambda_bytecode_is_refused_by_safe_mode(tmp_path: Path, marker: Path) -> None:
    data = saved(lambda_model(marker), tmp_path / "model.keras", "keras_v3")
    marker.unlink(missing_ok=True)

    with pytest.raises(EngineError, match="safe_mode"):
        KerasEngine.from_artefact(data)

    assert not marker.exists(), "the Lambda layer's code ran while the tier loaded the artefact"


async def test_the_tier_refuses_to_download_an_h5_model(tmp_path: Path, marker: Path) -> None:
    data = saved(lambda_model(marker), tmp_path / "model.h5", "h5")

    async def model(request: web.Request) -> web.Response:
        return web.Response(body=data, headers={"X-Sha256": hashlib.sha256(data).hexdigest()})

    app = web.Application()
    app.router.add_get("/results/{id}/model", model)
    async with TestServer(app) as server:
        with pytest.raises(TierSetupError, match=r"\.h5|HDF5"):
            await fetch_model(str(server.make_url("")), 3, "keras")
