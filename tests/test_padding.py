"""TF "same" padding in torch (torch_impl/padding.py) against the table in docs/pitfalls.md and against Keras itself.

Keras layers are the reference. Convolutions run in float64, so the only error left is summation order
(~1e-16 relative to the output scale); a shifted sampling grid gives errors of order 1. Max-pooling is
exact (it selects, it does not add), so it is compared bit for bit, on all-negative inputs: padding that
counts as 0 instead of -inf would win every window it touches there.
"""

from __future__ import annotations

import keras_impl  # noqa: F401  (first: TensorFlow then loads locally and quietly, see docs/pitfalls.md)

# isort: split
import math

import keras
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conversion.arrays import max_rel_err, nchw_to_nhwc, nhwc_to_nchw
from torch_impl.padding import Conv2dSame, MaxPool2dSame, ceil_mode_padding, max_pool_same, pad_same, same_padding

# float64 convolutions of a few channels: measured <= 7.8e-16 relative to the output scale over every case
# below (summation order only). 1e-12 leaves a wide margin and is ~11 orders of magnitude below the error
# of a grid shifted by one pixel (> 0.1, test_naive_symmetric_conv_padding_is_caught_on_even_sizes).
CONV_F64_TOL = 1e-12

# (height, width): even, odd, and non-square with either parity first.
SIZES = [(8, 8), (9, 9), (8, 11), (13, 6)]
SIZE_IDS = ["even-8x8", "odd-9x9", "non-square-8x11", "non-square-13x6"]

# (kernel, stride): the network's stem, pool, strided 3x3 and projection, plus even kernels and stride 3.
WINDOWS = [(7, 2), (3, 2), (1, 2), (3, 1), (2, 1), (2, 2), (5, 3)]
WINDOW_IDS = [f"{k}x{k}-stride{s}" for k, s in WINDOWS]


# --- same_padding: the formula, against docs/pitfalls.md -------------------------------------------------


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [
        (224, 7, 2, (2, 3)),  # stem conv
        (112, 3, 2, (0, 1)),  # stem max-pool
        (56, 3, 2, (0, 1)),  # first conv of unit_3
        (28, 3, 2, (0, 1)),  # first conv of unit_7
        (14, 3, 2, (0, 1)),  # first conv of unit_13
        (56, 1, 2, (0, 0)),  # projections
        (28, 1, 2, (0, 0)),
        (14, 1, 2, (0, 0)),
        (56, 3, 1, (1, 1)),  # every other 3x3
        (7, 3, 1, (1, 1)),
    ],
    ids=[
        "stem-7x7s2-on-224-is-2-3",
        "pool-3x3s2-on-112-is-0-1",
        "conv-3x3s2-on-56-is-0-1",
        "conv-3x3s2-on-28-is-0-1",
        "conv-3x3s2-on-14-is-0-1",
        "projection-1x1s2-on-56-is-0-0",
        "projection-1x1s2-on-28-is-0-0",
        "projection-1x1s2-on-14-is-0-0",
        "conv-3x3s1-on-56-is-1-1",
        "conv-3x3s1-on-7-is-1-1",
    ],
)
def test_same_padding_matches_the_pitfalls_table(size, kernel, stride, expected):
    assert same_padding(size, kernel, stride) == expected


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [(225, 7, 2, (3, 3)), (113, 3, 2, (1, 1)), (57, 3, 2, (1, 1)), (29, 3, 2, (1, 1)), (15, 3, 2, (1, 1))],
    ids=["stem-on-225", "pool-on-113", "conv-on-57", "conv-on-29", "conv-on-15"],
)
def test_same_padding_is_symmetric_on_odd_sizes(size, kernel, stride, expected):
    # This is why odd sizes hide the bug: there a naive `padding=k // 2` is right by accident.
    assert same_padding(size, kernel, stride) == expected == (kernel // 2, kernel // 2)


def test_same_padding_gives_ceil_output_size_and_puts_the_odd_pixel_last():
    for size in range(1, 40):
        for kernel in range(1, 8):
            for stride in range(1, 4):
                before, after = same_padding(size, kernel, stride)
                out = (size + before + after - kernel) // stride + 1
                assert out == math.ceil(size / stride), (size, kernel, stride)
                assert 0 <= before <= after <= before + 1, (size, kernel, stride)


def test_pad_same_pads_bottom_right_with_the_given_value():
    x = torch.zeros(1, 1, 4, 6)
    padded = pad_same(x, kernel_size=3, stride=2, value=-7.0)  # (0, 1) on both axes
    assert padded.shape == (1, 1, 5, 7)
    assert torch.all(padded[..., :4, :6] == 0)
    assert torch.all(padded[..., 4, :] == -7) and torch.all(padded[..., :, 6] == -7)


@pytest.mark.parametrize(
    ("kernel", "stride", "dynamic"),
    [(3, 1, False), (1, 2, False), (1, 1, False), (7, 2, True), (3, 2, True), (2, 1, True), (2, 2, True)],
    ids=[
        "3x3s1-static",
        "1x1s2-static",
        "1x1s1-static",
        "7x7s2-dynamic",
        "3x3s2-dynamic",
        "2x2s1-dynamic",
        "2x2s2-dynamic",
    ],
)
def test_padding_is_static_only_where_it_does_not_depend_on_the_size(kernel, stride, dynamic):
    # 2x2/s2 is dynamic: TF pads an odd size by (0, 1) there (a static 0 once made it floor the size).
    assert Conv2dSame(1, 1, kernel, stride).dynamic_padding is dynamic
    assert MaxPool2dSame(kernel, stride).dynamic_padding is dynamic


# --- Conv2dSame / MaxPool2dSame against Keras -------------------------------------------------------


def _keras_conv(x_nhwc: np.ndarray, kernel: int, stride: int, filters: int, seed: int):
    layer = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, dtype="float64")
    layer.build(x_nhwc.shape)
    rng = np.random.default_rng(seed)
    layer.kernel.assign(rng.standard_normal(tuple(layer.kernel.shape)))
    return layer, keras.ops.convert_to_numpy(layer(x_nhwc))


def _torch_conv(layer, in_channels: int, kernel: int, stride: int, filters: int) -> Conv2dSame:
    conv = Conv2dSame(in_channels, filters, kernel, stride).double()
    with torch.no_grad():
        kernel_hwio = keras.ops.convert_to_numpy(layer.kernel)
        conv.weight.copy_(torch.from_numpy(kernel_hwio.transpose(3, 2, 0, 1).copy()))
    return conv


def _images(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, height, width, channels))


@pytest.mark.parametrize(("height", "width"), SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize(("kernel", "stride"), WINDOWS, ids=WINDOW_IDS)
def test_conv2d_same_matches_keras(kernel, stride, height, width):
    x = _images(height, width, 3, seed=kernel * 100 + height)
    layer, expected = _keras_conv(x, kernel, stride, filters=4, seed=1)
    conv = _torch_conv(layer, 3, kernel, stride, filters=4)
    with torch.no_grad():
        actual = nchw_to_nhwc(conv(torch.from_numpy(nhwc_to_nchw(x))).numpy())
    assert actual.shape == expected.shape == (2, math.ceil(height / stride), math.ceil(width / stride), 4)
    assert max_rel_err(actual, expected) <= CONV_F64_TOL


def test_conv2d_same_matches_keras_on_the_stem_at_224():
    x = _images(224, 224, 3, seed=0)
    layer, expected = _keras_conv(x, 7, 2, filters=4, seed=1)
    conv = _torch_conv(layer, 3, 7, 2, filters=4)
    with torch.no_grad():
        actual = nchw_to_nhwc(conv(torch.from_numpy(nhwc_to_nchw(x))).numpy())
    assert actual.shape == (2, 112, 112, 4)
    assert max_rel_err(actual, expected) <= CONV_F64_TOL


@pytest.mark.parametrize(("kernel", "stride"), [(7, 2), (3, 2)], ids=["stem-7x7s2", "conv-3x3s2"])
def test_naive_symmetric_conv_padding_is_caught_on_even_sizes(kernel, stride):
    # The comparison above has teeth: torch's own symmetric padding is off by a whole pixel of shift.
    x = _images(8, 8, 3, seed=2)
    layer, expected = _keras_conv(x, kernel, stride, filters=4, seed=1)
    conv = _torch_conv(layer, 3, kernel, stride, filters=4)
    with torch.no_grad():
        naive = F.conv2d(torch.from_numpy(nhwc_to_nchw(x)), conv.weight, stride=stride, padding=kernel // 2)
    assert max_rel_err(nchw_to_nhwc(naive.numpy()), expected) > 0.1


def _negative_images(height: int, width: int, dtype: str, seed: int) -> np.ndarray:
    # Every value <= -1: a padded cell that counted as 0 would be the maximum of its window.
    x = -1.0 - np.abs(np.random.default_rng(seed).standard_normal((2, height, width, 3)))
    return x.astype(dtype)


def _keras_pool(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    layer = keras.layers.MaxPool2D(pool_size=kernel, strides=stride, padding="same", dtype=str(x.dtype))
    return keras.ops.convert_to_numpy(layer(x))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("height", "width"), [*SIZES, (112, 112)], ids=[*SIZE_IDS, "stem-pool-112x112"])
@pytest.mark.parametrize(("kernel", "stride"), WINDOWS, ids=WINDOW_IDS)
def test_max_pool2d_same_matches_keras_on_negative_inputs(kernel, stride, height, width, dtype):
    x = _negative_images(height, width, dtype, seed=kernel * 100 + height)
    expected = _keras_pool(x, kernel, stride)
    actual = nchw_to_nhwc(MaxPool2dSame(kernel, stride)(torch.from_numpy(nhwc_to_nchw(x))).numpy())
    assert actual.dtype == expected.dtype
    np.testing.assert_array_equal(actual, expected)  # a max selects one input: exact


@pytest.mark.parametrize(
    ("kernel", "stride", "height", "width"),
    [(3, 2, 112, 112), (3, 2, 8, 11), (3, 1, 9, 9), (2, 1, 8, 8)],
    ids=["stem-pool-3x3s2-on-112", "3x3s2-on-8x11", "3x3s1-on-odd-9x9", "2x2s1-on-8x8"],
)
def test_zero_padded_max_pool_is_caught(kernel, stride, height, width):
    # A max-pool that pads with zeros (F.pad's default) must fail the comparison above on these inputs.
    x = _negative_images(height, width, "float32", seed=3)
    expected = _keras_pool(x, kernel, stride)
    padded = pad_same(torch.from_numpy(nhwc_to_nchw(x)), kernel, stride, value=0.0)
    zero_padded = nchw_to_nhwc(F.max_pool2d(padded, kernel, stride).numpy())
    assert zero_padded.shape == expected.shape
    assert not np.array_equal(zero_padded, expected)
    assert zero_padded.max() == 0.0  # the padding won somewhere


# --- copy-free paths: the same numbers as an explicit pad, without the copy ------------------------


def test_ceil_mode_max_pool_equals_explicit_minus_inf_padding():
    # Every size 1..40, kernel 1..7 and stride 1..3: where ceil_mode is used it must select exactly what
    # pooling an explicitly -inf-padded copy selects (and the output size must be TF's ceil(size / stride)).
    for size in range(1, 41):
        x = _negative_images(size, size + 1, "float64", seed=size).transpose(0, 3, 1, 2)
        x = torch.from_numpy(np.ascontiguousarray(x))
        for kernel in range(1, 8):
            for stride in range(1, 4):
                expected = F.max_pool2d(pad_same(x, kernel, stride, value=float("-inf")), kernel, stride)
                actual = max_pool_same(x, kernel, stride)
                assert actual.shape[-2:] == (math.ceil(size / stride), math.ceil((size + 1) / stride))
                assert torch.equal(actual, expected), (size, kernel, stride)


def test_the_networks_max_pool_needs_no_copy_at_any_size():
    # ResNet-34's 3x3/s2 pool takes its TF padding from ceil_mode for every input size; only even
    # kernels at stride 1 (whose extra pixel ceil_mode cannot add) fall back to a padded copy.
    assert all(ceil_mode_padding(size, 3, 2) is not None for size in range(1, 1000))
    assert ceil_mode_padding(112, 3, 2) == 0 and ceil_mode_padding(113, 3, 2) == 1
    assert ceil_mode_padding(8, 2, 1) is None


def test_symmetric_run_time_padding_goes_to_the_convolution(monkeypatch):
    # On odd sizes a strided 3x3 needs (1, 1): no padded copy is made (the Keras comparison above checks
    # the numbers on odd-9x9); on even sizes (0, 1) still needs one.
    calls = []
    real_pad = F.pad
    monkeypatch.setattr(F, "pad", lambda *args, **kwargs: calls.append(args[1]) or real_pad(*args, **kwargs))
    conv = Conv2dSame(2, 2, 3, 2)
    assert conv(torch.zeros(1, 2, 9, 9)).shape == (1, 2, 5, 5) and calls == []
    assert conv(torch.zeros(1, 2, 8, 8)).shape == (1, 2, 4, 4) and calls == [(0, 1, 0, 1)]
