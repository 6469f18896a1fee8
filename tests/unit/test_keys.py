"""Keys derived from the stack's secret (pure)."""

from __future__ import annotations

import pytest

from tierflow.streams.keys import MissingSecret, derive_key, sign, verify
from tierflow.streams.settings import Settings

SECRET = "s" * 64


def test_each_purpose_gets_its_own_key() -> None:
    assert derive_key(SECRET, "workload-token") != derive_key(SECRET, "proof:validator")
    assert derive_key(SECRET, "a") == derive_key(SECRET, "a")


def test_a_signature_verifies_only_for_its_key_and_message() -> None:
    key = derive_key(SECRET, "proof:validator")
    signature = sign(key, b"message")
    assert verify(key, b"message", signature)
    assert not verify(key, b"other", signature)
    assert not verify(derive_key(SECRET, "proof:api"), b"message", signature)


def test_a_short_secret_is_refused_with_how_to_set_one() -> None:
    with pytest.raises(MissingSecret, match="TIERFLOW_SECRET_KEY"):
        derive_key("short", "x")


def test_workloads_never_get_the_secret() -> None:
    settings = Settings.from_env({"TIERFLOW_SECRET_KEY": SECRET})
    assert settings.to_env()["TIERFLOW_SECRET_KEY"] == SECRET
    assert "TIERFLOW_SECRET_KEY" not in settings.workload_env()
