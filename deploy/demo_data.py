"""The demo's material: its models (in the form Kafka-ML users write them), its options and its data.

Used by the demo's command (deploy/demo.py) and its lifecycle (deploy/demo_lifecycle.py). The data is Fashion-MNIST
when its Debian package is installed, else the scikit-learn digits (tiers/datasets.py), split into a training
part sent through Kafka and a held-out part streamed through the tiers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tierflow.streams.errors import PermanentError

#: The demo's models, in the form Kafka-ML users write them (`tf` and `keras` are in scope). The edge runs a
#: small convolution on the device and exits early; the fog and the cloud refine its features.
EDGE_CODE = """\
inputs = keras.Input(shape=(28, 28, 1), name='edge_in')
x = keras.layers.Conv2D(16, kernel_size=(3, 3), activation='relu', name='edge_conv')(inputs)
x = keras.layers.MaxPooling2D(pool_size=(2, 2), name='edge_pool')(x)
x = keras.layers.Flatten(name='edge_flat')(x)
to_fog = keras.layers.Dense(64, activation='relu', name='edge_to_fog')(x)
edge_exit = keras.layers.Dense(10, activation='softmax', name='edge_exit')(to_fog)
edge_model = keras.Model(inputs=[inputs], outputs=[to_fog, edge_exit], name='demo_edge')
"""
FOG_CODE = """\
inputs = keras.Input(shape=(64,), name='fog_in')
to_cloud = keras.layers.Dense(64, activation='relu', name='fog_to_cloud')(inputs)
fog_exit = keras.layers.Dense(10, activation='softmax', name='fog_exit')(to_cloud)
fog_model = keras.Model(inputs=[inputs], outputs=[to_cloud, fog_exit], name='demo_fog')
"""
CLOUD_CODE = """\
inputs = keras.Input(shape=(64,), name='cloud_in')
x = keras.layers.Dense(128, activation='relu', name='cloud_hidden')(inputs)
x = keras.layers.Dropout(0.2, name='cloud_dropout')(x)
cloud_exit = keras.layers.Dense(10, activation='softmax', name='cloud_exit')(x)
cloud_model = keras.Model(inputs=[inputs], outputs=[cloud_exit], name='demo_cloud')
"""
SINGLE_CODE = """\
model = keras.Sequential([
    keras.Input(shape=(28, 28)),
    keras.layers.Flatten(),
    keras.layers.Dense(128, activation='relu'),
    keras.layers.Dense(10, activation='softmax'),
])
"""
CHAIN = ("edge", "fog", "cloud")


class DemoError(PermanentError):
    """A step of the demo failed; the message says which and why."""


#: The target the demo serves its chain from unless told otherwise: the cheapest limits whose cascade accuracy
#: stays within 1% of the top exit alone.
DEFAULT_TARGET = ("max_accuracy_drop", 0.01)
#: The held-out split's seed when the demo is given none.
HOLDOUT_SEED = 1


@dataclass(frozen=True)
class DemoOptions:
    dataset: str = "auto"
    epochs: int = 5
    batch: int = 64
    #: A typed limit on every tier (the raw max(p), as Kafka-ML) instead of a target; None: serve from `target`.
    limit: float | None = None
    #: (kind, value) of the target the limits are chosen from (streams/exits.py TARGET_KINDS).
    target: tuple[str, float] = DEFAULT_TARGET
    train_samples: int = 20000
    test_samples: int = 2000
    holdout: float = 0.2
    rate: float = 500.0
    engine: str = "keras"
    timeout_s: float = 600.0
    #: `--seed`: the held-out split and the deployment's training seed, for a reproducible demo; None: the
    #: held-out split of `HOLDOUT_SEED` and a training seed the job draws (reported on the results).
    seed: int | None = None

    @property
    def holdout_seed(self) -> int:
        return HOLDOUT_SEED if self.seed is None else self.seed


@dataclass(frozen=True)
class DemoData:
    name: str
    description: str
    x_train: np.ndarray[Any, Any]
    y_train: np.ndarray[Any, Any]
    x_test: np.ndarray[Any, Any]
    y_test: np.ndarray[Any, Any]


def choose_dataset(name: str, fashion_available: bool) -> str:
    """`auto` is Fashion-MNIST when its Debian package is installed, else the scikit-learn digits."""
    if name != "auto":
        return name
    return "fashion-mnist" if fashion_available else "digits"


def split_holdout(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], *, holdout: float, train_cap: int,
                  test_cap: int, seed: int) -> tuple[np.ndarray[Any, Any], ...]:
    """Shuffle, keep `holdout` of the samples (at most `test_cap`) for inference and the rest (at most
    `train_cap`) for training; images become float32 in [0, 1] (the models' input)."""
    if not 0 < holdout < 1:
        raise DemoError(f"--holdout {holdout} must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = min(test_cap, max(1, round(len(x) * holdout)))
    test, train = order[:n_test], order[n_test:][:train_cap]
    if len(train) < 10:
        raise DemoError(f"{len(x)} samples leave {len(train)} for training: not enough")
    xf = x.astype(np.float32)
    if xf.max() > 1.0:  # 0..255 (Fashion-MNIST) or other unscaled pixels
        xf /= 255.0 if xf.max() > 16 else float(xf.max())
    return xf[train], y[train].astype(np.uint8), xf[test], y[test].astype(np.int64)


def load_data(options: DemoOptions) -> DemoData:
    from tierflow.tiers import datasets

    name = choose_dataset(options.dataset, datasets.FASHION_MNIST_DIR.exists())
    try:
        data = datasets.load(name)
    except datasets.DatasetError as exc:
        raise DemoError(str(exc)) from None
    if data.x.shape[1:] != (28, 28):
        raise DemoError(f"the demo's models take 28x28 images; {data.name} has samples of shape {data.x.shape[1:]}")
    x_train, y_train, x_test, y_test = split_holdout(data.x, data.y, holdout=options.holdout,
                                                     train_cap=options.train_samples, test_cap=options.test_samples,
                                                     seed=options.holdout_seed)
    return DemoData(data.name, data.description, x_train, y_train, x_test, y_test)
