"""Full ResNet-34: the Keras model and its converted torch twin give the same logits.

The twins come from tests/conftest.py (session fixtures): hostile seeded weights, a logits head (softmax
saturates and hides differences, docs/pitfalls.md), input shape (None, None, 3) so one model serves every size.

Errors are relative to the logits' scale, max |torch - keras| / max |keras| (conversion.arrays.max_rel_err).
Measured here (seed 0 weights, the seeded standard-normal images below, logits of scale 6.7-68):

    case                             float32    float64
    batch 2, 224x224                 5.1e-07    1.0e-15
    batch 1, 225x225 (odd)           1.7e-07    9.6e-16
    batch 3, 97x131 (non-square)     4.3e-07    1.1e-15
    batch 4, 32x32                   8.3e-07    1.5e-15
    batch 2, 33x47                   7.2e-07    1.9e-15
    batch 1, 7x5                     2.5e-07    8.0e-16
    batch 5, 1x1                     3.5e-07    1.0e-15

float64 agreement to ~1e-15 shows the two compute the same function (a float64 result near 1e-7 would mean
weights passed through float32; the porting bugs planted in tests/test_mutations.py all give more than
1e-3). float32 differs only by summation order over 36 layers; its bound, conversion.arrays.TOLERANCE
["float32"] = 1e-5, is ~12x the worst case measured. float64's bound is 1e-10 (~5e4x the worst case).

Top-1 agreement is asserted on every sample; it is not luck: the smallest gap between the top two logits
of any sample here is 0.099 of the logits' scale, ~1e5 times the float32 error.
"""

from __future__ import annotations

import keras_impl  # first: TensorFlow then loads locally and quietly (docs/pitfalls.md)

# isort: split
import keras
import numpy as np
import pytest
import torch

import conversion
import torch_impl
from conversion.arrays import TOLERANCE, max_rel_err, nhwc_to_nchw, seeded_images

# (batch, height, width): the book's size, odd (symmetric TF padding everywhere), non-square with mixed
# parity, small (7x7 and 1x1 feature maps reach the last stage as 1x1), and a 1x1 image.
CASES = [(2, 224, 224), (1, 225, 225), (3, 97, 131), (4, 32, 32), (2, 33, 47), (1, 7, 5), (5, 1, 1)]
CASE_IDS = [
    "batch2-224x224",
    "batch1-odd-225x225",
    "batch3-non-square-97x131",
    "batch4-small-32x32",
    "batch2-odd-non-square-33x47",
    "batch1-tiny-7x5",
    "batch5-1x1",
]


@pytest.fixture(scope="module")
def twins(twins_f32, twins_f64):
    return {"float32": twins_f32, "float64": twins_f64}


def _logits(keras_model, torch_model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    expected = keras.ops.convert_to_numpy(keras_model(images, training=False))
    with torch.no_grad():
        actual = torch_model(torch.from_numpy(nhwc_to_nchw(images))).numpy()
    return actual, expected


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("batch", "height", "width"), CASES, ids=CASE_IDS)
def test_logits_parity(twins, batch, height, width, dtype):
    keras_model, torch_model = twins[dtype]
    images = seeded_images(batch, height, width, seed=height * 1000 + width, dtype=dtype)
    actual, expected = _logits(keras_model, torch_model, images)
    assert actual.dtype == expected.dtype == np.dtype(dtype)
    assert actual.shape == expected.shape == (batch, 10)
    assert np.abs(expected).max() > 1.0  # live logits, not a collapsed output
    assert max_rel_err(actual, expected) <= TOLERANCE[dtype]
    np.testing.assert_array_equal(actual.argmax(axis=1), expected.argmax(axis=1))  # top-1, every sample


def test_the_fixture_weights_are_hostile(twins_f32):
    # Fresh BatchNorm statistics (mean 0, variance 1) hide an epsilon or a mean/variance mix-up; these do not.
    keras_model, _ = twins_f32
    bns = [layer for layer in keras_model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 36
    variances = np.concatenate([keras.ops.convert_to_numpy(bn.moving_variance) for bn in bns])
    means = np.concatenate([keras.ops.convert_to_numpy(bn.moving_mean) for bn in bns])
    assert variances.min() < 2e-3 and variances.max() > 5.0
    assert np.abs(means).min() >= 0.5


def test_float64_model_gives_float64_outputs(twins_f64):
    keras_model, torch_model = twins_f64
    assert {keras.backend.standardize_dtype(w.dtype) for w in keras_model.weights} == {"float64"}
    assert {t.dtype for t in torch_model.state_dict().values() if t.is_floating_point()} == {torch.float64}
    actual, expected = _logits(keras_model, torch_model, seeded_images(1, 16, 16, dtype="float64"))
    assert expected.dtype == actual.dtype == np.float64


def test_none_spatial_dims_take_any_size(twins_f32):
    keras_model, _ = twins_f32
    assert keras_model.input_shape == (None, None, None, 3)
    for height, width in [(40, 40), (17, 90)]:
        logits = keras_model(seeded_images(1, height, width), training=False)
        assert tuple(logits.shape) == (1, 10)


def test_torch_double_runs_in_float64_and_matches_keras(twins_f64):
    # `.double()` must reach every tensor (BatchNorm buffers, the -inf padding) of a fresh float32 twin.
    keras_model, _ = twins_f64
    torch_model = torch_impl.ResNet34(num_classes=10, classifier_activation=None).double().eval()
    conversion.copy_keras_to_torch(keras_model, torch_model)
    assert {t.dtype for t in torch_model.state_dict().values() if t.is_floating_point()} == {torch.float64}
    images = seeded_images(2, 40, 33, seed=9, dtype="float64")
    actual, expected = _logits(keras_model, torch_model, images)
    assert actual.dtype == np.float64
    assert max_rel_err(actual, expected) <= TOLERANCE["float64"]


def test_keras_parameter_count_is_the_books(twins_f32):
    model = keras_impl.build_resnet34(10, (224, 224, 3))
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    assert model.count_params() == 21_306_826
    assert (trainable, non_trainable) == (21_289_802, 17_024)  # 17,024 = 2 x 8,512 BatchNorm channels
    # None spatial dims do not change the count (no parameter depends on the image size)
    assert twins_f32[0].count_params() == 21_306_826


def test_torch_parameter_count_is_the_books():
    model = torch_impl.ResNet34(num_classes=10)
    parameters = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for name, b in model.named_buffers() if not name.endswith("num_batches_tracked"))
    assert (parameters, buffers) == (21_289_802, 17_024)
    assert parameters + buffers == 21_306_826
