"""Every exception class of the core, the agents, the projections and the API derives from `TierflowError`,
so a caller can tell tierflow's own failures from a library's; bad input is a `PermanentError`."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from tierflow.streams.catalogue import Invalid
from tierflow.streams.control import ControlMessageError
from tierflow.streams.envelope import EnvelopeError
from tierflow.streams.errors import PermanentError, TierflowError
from tierflow.streams.settings import SettingsError

PACKAGES = ("tierflow.streams", "tierflow.projections", "tierflow.api")


def exception_classes() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for name in PACKAGES:
        package = importlib.import_module(name)
        modules = [package, *(importlib.import_module(m.name)
                              for m in pkgutil.walk_packages(package.__path__, f"{name}."))]
        for module in modules:
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, BaseException) and cls.__module__.startswith(PACKAGES):
                    found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return list(found.values())


def test_every_exception_class_has_the_one_root() -> None:
    classes = exception_classes()
    assert len(classes) >= 8, classes
    strays = sorted(f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, TierflowError))
    assert not strays, f"exception classes outside the TierflowError tree: {strays}"


@pytest.mark.parametrize("error", [Invalid, EnvelopeError, ControlMessageError, SettingsError])
def test_bad_input_is_permanent_and_still_a_value_error(error: type[Exception]) -> None:
    # Retrying bad input cannot help; callers that catch ValueError (parsers wrapping int()) still do.
    assert issubclass(error, PermanentError) and issubclass(error, ValueError)
