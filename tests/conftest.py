"""Session fixtures: the twins are built, randomised and converted once per test session."""

from __future__ import annotations

import keras_impl  # first: it loads triton before TensorFlow (PITFALLS.md)

# isort: split
import keras
import pytest
import torch

import conversion
from conversion.hostile import randomize_weights

SEED = 0


def make_twins(
    dtype: str,
    seed: int = SEED,
    num_classes: int = 10,
    classifier_activation: str | None = None,
    activation: str = "relu",
) -> tuple[keras.Model, torch.nn.Module]:
    """A Keras ResNet-34 with hostile weights (any input size) and its converted torch twin."""
    model = keras_impl.build_resnet34(num_classes, (None, None, 3), classifier_activation, dtype, activation=activation)
    randomize_weights(model, seed)
    return model, conversion.keras_to_torch(model)


@pytest.fixture(scope="session")
def twins_f32() -> tuple[keras.Model, torch.nn.Module]:
    """float32 twins, logits head, hostile weights."""
    return make_twins("float32")


@pytest.fixture(scope="session")
def twins_f64() -> tuple[keras.Model, torch.nn.Module]:
    """float64 twins, logits head, hostile weights."""
    return make_twins("float64")
