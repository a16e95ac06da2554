"""The book's ResidualUnit: Keras (keras_impl) and its converted torch twin compute the same function.

Each unit gets seeded hostile weights (conversion/hostile.py: BatchNorm variances down to 5e-4, where
torch's epsilon instead of Keras's changes the scale by 20-40%) and is compared on even, odd and
non-square inputs, where TF "same" padding of the strided 3x3 conv is asymmetric (even) or not (odd).

Errors are relative to the output's scale, max |torch - keras| / max |keras| (conversion.arrays.max_rel_err).
Measured here with seed 0 and the seeded images below (outputs of scale 5-11), over all sizes:
    identity 64, stride 1:        float32 1.3e-07 .. 5.1e-07   float64 2.4e-16 .. 9.8e-16
    projection 64 -> 128, s 2:    float32 1.6e-07 .. 5.5e-07   float64 3.0e-16 .. 1.2e-15
    projection 128 -> 256, s 2:   float32 1.5e-07 .. 9.8e-07   float64 3.2e-16 .. 1.9e-15
float64 agreement to ~1e-15 is the same function up to summation order.
The bounds are conversion.arrays.TOLERANCE: float32 1e-5 (~10x above the worst unit measured) and float64
1e-10 (~5e4x above; a float64 result of ~1e-7 would mean weights went through float32). The porting bugs
planted in tests/test_mutations.py all give more than 1e-3.
"""

from __future__ import annotations

import keras_impl  # first: TensorFlow then loads locally and quietly (docs/pitfalls.md)

# isort: split
import math

import keras
import numpy as np
import pytest
import torch

import conversion
import torch_impl
from conversion.arrays import TOLERANCE, max_rel_err, nchw_to_nhwc, nhwc_to_nchw, seeded_images
from conversion.hostile import randomize_weights

# (in_channels, filters, strides): the network's identity unit and its two kinds of projection unit.
UNITS = [(64, 64, 1), (64, 128, 2), (128, 256, 2)]
UNIT_IDS = ["identity-64-stride1", "projection-64to128-stride2", "projection-128to256-stride2"]

# (batch, height, width)
INPUTS = [(2, 56, 56), (1, 57, 57), (2, 28, 17), (3, 14, 14), (1, 7, 7), (2, 1, 1)]
INPUT_IDS = [
    "batch2-even-56x56",
    "batch1-odd-57x57",
    "batch2-non-square-28x17",
    "batch3-even-14x14",
    "batch1-small-odd-7x7",
    "batch2-1x1",
]


def _outputs(keras_unit, torch_unit, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    expected = keras.ops.convert_to_numpy(keras_unit(images, training=False))
    with torch.no_grad():
        actual = nchw_to_nhwc(torch_unit(torch.from_numpy(nhwc_to_nchw(images))).numpy())
    return actual, expected


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("batch", "height", "width"), INPUTS, ids=INPUT_IDS)
@pytest.mark.parametrize(("in_channels", "filters", "strides"), UNITS, ids=UNIT_IDS)
def test_residual_unit_parity(unit_twins, in_channels, filters, strides, batch, height, width, dtype):
    keras_unit, torch_unit = unit_twins(in_channels, filters, strides, dtype)
    images = seeded_images(batch, height, width, in_channels, seed=height * 1000 + width, dtype=dtype)
    actual, expected = _outputs(keras_unit, torch_unit, images)
    assert actual.dtype == expected.dtype == np.dtype(dtype)
    assert expected.shape == (batch, math.ceil(height / strides), math.ceil(width / strides), filters)
    assert np.abs(expected).max() > 1.0  # a live output: hostile weights keep the scale O(1-10)
    assert max_rel_err(actual, expected) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_unit_built_by_a_call_and_its_torch_twin_agree(dtype):
    # The book's way to build a layer: call it. The twin must not depend on how the unit got its variables.
    images = seeded_images(2, 12, 10, 32, seed=5, dtype=dtype)
    keras_unit = keras_impl.ResidualUnit(48, strides=2, dtype=dtype)
    keras_unit(images)
    randomize_weights(keras_unit, seed=3)
    torch_unit = conversion.keras_to_torch(keras_unit)
    assert not torch_unit.training
    assert {t.dtype for t in torch_unit.state_dict().values() if t.is_floating_point()} == {getattr(torch, dtype)}
    actual, expected = _outputs(keras_unit, torch_unit, images)
    assert max_rel_err(actual, expected) <= TOLERANCE[dtype]


def test_units_have_a_projection_exactly_when_strided(unit_twins):
    # As in the book (and unlike torchvision, which also projects when only the channels change).
    for in_channels, filters, strides in UNITS:
        keras_unit, torch_unit = unit_twins(in_channels, filters, strides, "float32")
        assert len(keras_unit.skip_layers) == len(torch_unit.skip_layers) == (2 if strides > 1 else 0)
        assert len(keras_unit.main_layers) == len(torch_unit.main_layers) == 5


def test_strides_1_with_other_channel_counts_is_refused_in_keras():
    unit = keras_impl.ResidualUnit(128, strides=1)
    with pytest.raises(ValueError, match=r"strides=1 .* Received: filters=128, input_shape=\(1, 8, 8, 64\)"):
        unit(np.zeros((1, 8, 8, 64), "float32"))


def test_strides_1_with_other_channel_counts_is_refused_in_torch():
    with pytest.raises(ValueError, match=r"strides=1 .* Received: in_channels=64, filters=128"):
        torch_impl.ResidualUnit(64, 128, strides=1)


@pytest.mark.parametrize(
    ("kwargs", "name", "value"),
    [
        ({"filters": 0}, "filters", 0),
        ({"filters": 64, "strides": 0}, "strides", 0),
        ({"filters": 2.5}, "filters", 2.5),
        ({"filters": True}, "filters", True),
    ],
    ids=["zero-filters", "zero-strides", "float-filters", "bool-filters"],
)
def test_invalid_unit_arguments_are_refused_in_both_frameworks(kwargs, name, value):
    message = rf"positive integer {name}\. Received: {name}={value!r}"
    with pytest.raises(ValueError, match=message):
        keras_impl.ResidualUnit(**kwargs)
    with pytest.raises(ValueError, match=message):
        torch_impl.ResidualUnit(64, **kwargs)


def test_get_config_round_trip():
    unit = keras_impl.ResidualUnit(128, strides=2, activation="elu", name="unit_x", dtype="float64")
    config = unit.get_config()
    assert (config["filters"], config["strides"], config["activation"]) == (128, 2, "elu")
    clone = keras_impl.ResidualUnit.from_config(config)
    assert clone.get_config() == config
    assert (clone.filters, clone.strides, clone.activation_name, clone.name) == (128, 2, "elu", "unit_x")
    assert keras.backend.standardize_dtype(clone.dtype_policy.variable_dtype) == "float64"
    # and through Keras's own (de)serialisation, by registered name, without custom_objects
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(unit))
    assert isinstance(revived, keras_impl.ResidualUnit)
    assert revived.get_config() == config
