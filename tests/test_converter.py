"""The weight converter (conversion/weights.py): bit-exact round trips and errors that say what is wrong.

A round trip through the converter must reproduce every weight BIT FOR BIT (it copies, never casts), in
float32 and float64, in both directions. Every refusal names the layer (torch state_dict path) and both
values; nothing is written into the target before the whole plan has been checked.
"""

from __future__ import annotations

import keras_impl  # first: TensorFlow then loads locally and quietly (docs/pitfalls.md)

# isort: split
import copy
import re
from collections.abc import Callable

import keras
import numpy as np
import pytest
import torch
from torch import nn

import conversion
import torch_impl
from conversion.arrays import TOLERANCE, hwio_to_oihw, max_rel_err, nhwc_to_nchw, oihw_to_hwio, seeded_images
from conversion.errors import ConversionError, UserInputError, WeightFileError
from conversion.hostile import randomize_weights
from conversion.state_dicts import twin_from_state_dict as state_dict_to_torch
from conversion.weights import paired_tensors
from torch_impl.layers import batch_norm


def _bits(array) -> tuple[str, tuple, bytes]:
    """Everything that makes two arrays bitwise identical: dtype, shape and raw bytes."""
    array = np.ascontiguousarray(array)
    return array.dtype.str, array.shape, array.tobytes()


def _keras_bits(model) -> list[tuple]:
    # In order: Keras names unnamed layers by a global counter (the book's unit has conv2d_70), so paths can
    # differ between two equal models while the order of model.weights does not.
    return [(v.name, *_bits(keras.ops.convert_to_numpy(v))) for v in model.weights]


def _torch_bits(module: nn.Module) -> dict[str, tuple]:
    return {
        k: _bits(v.detach().numpy()) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")
    }


def _torch_first_model(dtype: str, seed: int = 1) -> torch_impl.ResNet34:
    """A torch ResNet34 that never saw Keras: torch's own init, then hostile BatchNorm statistics."""
    generator = torch.Generator().manual_seed(seed)
    model = torch_impl.ResNet34(num_classes=10, classifier_activation=None).to(getattr(torch, dtype)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_var.copy_(torch.exp(torch.empty(n).uniform_(-7, 3, generator=generator)))
                module.running_mean.copy_(torch.randn(n, generator=generator))
                module.weight.copy_(torch.empty(n).uniform_(0.3, 1.2, generator=generator) * module.running_var.sqrt())
                module.bias.copy_(0.5 * torch.randn(n, generator=generator))
    return model


# --- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_keras_to_torch_to_keras_is_bit_exact(dtype, twins_f32, twins_f64):
    keras_model, torch_model = {"float32": twins_f32, "float64": twins_f64}[dtype]
    back = conversion.torch_to_keras(torch_model, input_shape=(None, None, 3))
    assert _keras_bits(back) == _keras_bits(keras_model)
    assert {keras.backend.standardize_dtype(v.dtype) for v in back.weights} == {dtype}


# float32 here; float64 goes torch -> Keras -> torch through files in tests/test_files.py (each direction
# builds a Keras model, ~1.5 s, so it is not done twice).
@pytest.mark.parametrize("dtype", ["float32"])
def test_torch_to_keras_to_torch_is_bit_exact_and_computes_the_same(dtype):
    torch_model = _torch_first_model(dtype)
    keras_model = conversion.torch_to_keras(torch_model, input_shape=(None, None, 3))
    back = conversion.keras_to_torch(keras_model)
    assert _torch_bits(back) == _torch_bits(torch_model)
    # and the Keras model built from torch computes the torch model's function (tolerance: see
    # test_model_parity.py; torch-init weights give errors of the same order, ~5e-7 / ~1e-15)
    images = seeded_images(2, 32, 24, seed=4, dtype=dtype)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(nhwc_to_nchw(images))).numpy()
    actual = keras.ops.convert_to_numpy(keras_model(images, training=False))
    assert max_rel_err(actual, expected) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_residual_unit_round_trip_is_bit_exact(dtype, unit_twins):
    keras_unit, torch_unit = unit_twins(64, 128, 2, dtype)
    back = conversion.torch_to_keras(torch_unit)
    assert isinstance(back, keras_impl.ResidualUnit)
    assert (back.filters, back.strides, back.activation_name) == (128, 2, "relu")
    assert _keras_bits(back) == _keras_bits(keras_unit)
    again = conversion.keras_to_torch(back)
    assert _torch_bits(again) == _torch_bits(torch_unit)


# --- errors: a fresh torch twin, changed in one way, must be refused --------------------------------


def _fresh(**kwargs) -> torch_impl.ResNet34:
    return torch_impl.ResNet34(**{"num_classes": 10, "classifier_activation": None, **kwargs})


def _set_eps(model, value):
    model.stem_bn.eps = value
    return model


def _set_momentum(model, value):
    model.unit_7.skip_layers[1].momentum = value
    return model


def _replace(model, name, module):
    setattr(model, name, module)
    return model


def _narrow_bn(model):
    model.unit_3.main_layers[1] = batch_norm(64)
    return model


def _extra_buffer(model):
    model.unit_0.main_layers[1].register_buffer("extra", torch.zeros(3))
    return model


def _drop_running_var(model):
    model.unit_0.main_layers[1].running_var = None
    return model


def _drop_last_unit(model):
    del model._modules["unit_15"]
    return model


MODEL_MISMATCHES: list[tuple[str, Callable[[], nn.Module], str]] = [
    (
        "other-class-count",
        lambda: _fresh(num_classes=5),
        r"classifier: the Keras model has 10 classes, the torch one 5 (0: no head)",
    ),
    (
        "other-input-channels",
        lambda: _fresh(in_channels=1),
        r"stem_conv.weight: shape (in torch layout) differs: Keras has (64, 3, 7, 7), torch has (64, 1, 7, 7)",
    ),
    (
        "wrong-shape-batchnorm-in-unit_3",
        lambda: _narrow_bn(_fresh()),
        r"unit_3.main_layers.1.weight: shape (in torch layout) differs: Keras has (128,), torch has (64,)",
    ),
    (
        "batchnorm-epsilon-of-torch",
        lambda: _set_eps(_fresh(), 1e-5),
        "stem_bn: epsilon differs: Keras has 0.001, torch has 1e-05",
    ),
    (
        "batchnorm-momentum-of-torch",
        lambda: _set_momentum(_fresh(), 0.1),
        "unit_7.skip_layers.1: momentum (torch = 1 - keras) differs: Keras has 0.99, torch has 0.1",
    ),
    (
        "batchnorm-momentum-copied-as-is",
        lambda: _set_momentum(_fresh(), 0.99),
        "unit_7.skip_layers.1: momentum (torch = 1 - keras) differs: Keras has 0.99, torch has 0.99",
    ),
    (
        "softmax-head-against-logits",
        lambda: _fresh(classifier_activation="softmax"),
        "classifier: activation differs: Keras has linear, torch has softmax",
    ),
    (
        "other-body-activation",
        lambda: _fresh(activation="elu"),
        "stem_activation: activation differs: Keras has relu, torch has elu",
    ),
    (
        "float64-target-for-float32-weights",
        lambda: _fresh().double(),
        "stem_conv.weight: dtype differs: Keras has float32, torch has float64",
    ),
    (
        "naive-torch-conv",
        lambda: _replace(_fresh(), "stem_conv", nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)),
        "stem_conv: padding differs: Keras has same, torch has 3",
    ),
    (
        "naive-torch-max-pool",
        lambda: _replace(_fresh(), "stem_pool", nn.MaxPool2d(3, 2, padding=1)),
        "stem_pool: padding differs: Keras has same, torch has 1",
    ),
    (
        "extra-torch-tensor",
        lambda: _extra_buffer(_fresh()),
        "tensors without a partner: Keras [], torch missing [], torch extra ['unit_0.main_layers.1.extra']",
    ),
    (
        "missing-torch-tensor",
        lambda: _drop_running_var(_fresh()),
        "tensors without a partner: Keras [], torch missing ['unit_0.main_layers.1.running_var'], torch extra []",
    ),
    (
        "missing-layer",
        lambda: _drop_last_unit(_fresh()),
        "unit_15.main_layers.0: absent in torch; Keras has unit_15.main_layers[0]",
    ),
]


@pytest.mark.parametrize(
    ("make_target", "message"), [m[1:] for m in MODEL_MISMATCHES], ids=[m[0] for m in MODEL_MISMATCHES]
)
def test_mismatched_torch_model_is_refused_naming_layer_and_values(twins_f32, make_target, message):
    keras_model, _ = twins_f32
    target = make_target()
    before = _torch_bits(target)
    with pytest.raises(ConversionError, match=re.escape(message)):
        conversion.copy_keras_to_torch(keras_model, target)
    assert _torch_bits(target) == before  # the plan is checked before anything is written


def test_mismatched_keras_model_is_refused_and_left_untouched(twins_f32):
    _, torch_model = twins_f32
    keras_model = keras_impl.build_resnet34(7, (None, None, 3), None)
    before = _keras_bits(keras_model)
    message = "classifier: the Keras model has 7 classes, the torch one 10 (0: no head)"
    with pytest.raises(ConversionError, match=re.escape(message)):
        conversion.copy_torch_to_keras(torch_model, keras_model)
    assert _keras_bits(keras_model) == before


def test_keras_batchnorm_epsilon_mismatch_is_refused(unit_twins):
    _, torch_unit = unit_twins(64, 64, 1, "float32")
    changed = keras_impl.ResidualUnit(64, strides=1)
    changed.build((None, None, None, 64))
    changed.main_layers[4].epsilon = 1e-5
    message = "main_layers[4]': epsilon 1e-05, momentum 0.99 fits no convention; expected book: epsilon 0.001"
    with pytest.raises(ConversionError, match=re.escape(message)):
        conversion.copy_keras_to_torch(changed, copy.deepcopy(torch_unit))


def test_other_unit_is_refused_naming_the_layer(unit_twins):
    keras_unit, _ = unit_twins(64, 128, 2, "float32")
    message = "main_layers.0: strides differs: Keras has (2, 2), torch has (3, 3)"
    with pytest.raises(ConversionError, match=re.escape(message)):
        conversion.copy_keras_to_torch(keras_unit, torch_impl.ResidualUnit(64, 128, strides=3))


class _UnitWithExtraWeight(keras_impl.ResidualUnit):
    def build(self, input_shape):
        super().build(input_shape)
        self.extra = self.add_weight(shape=(3,), name="extra")


def test_keras_weight_without_partner_is_refused():
    unit = _UnitWithExtraWeight(64)
    unit.build((None, None, None, 64))
    with pytest.raises(ConversionError, match=r"tensors without a partner: Keras \['.*extra'\], torch missing \[\]"):
        conversion.keras_to_torch(unit)


def test_unbuilt_unit_is_refused():
    message = "the Keras ResidualUnit is not built: call it on an input (or build it) first"
    with pytest.raises(ConversionError, match=re.escape(message)):
        conversion.keras_to_torch(keras_impl.ResidualUnit(64))
    with pytest.raises(ConversionError, match=re.escape(message)):
        conversion.copy_keras_to_torch(keras_impl.ResidualUnit(64), torch_impl.ResidualUnit(64, 64))


@pytest.fixture(scope="module")
def small_keras_model():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="dense")])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda m: conversion.keras_to_torch(m),
            "not a ResNet-34 of the book's design: expected a 7x7/2 conv with 64 filters (ResNet-34 layer stem_conv), "
            "found 'dense' (Dense)",
        ),
        (lambda m: conversion.keras_to_torch("model.keras"), "Received: str"),
        (lambda m: conversion.keras_to_torch(torch_impl.ResNet34()), "Received: ResNet34"),
        (
            lambda m: conversion.torch_to_keras(m),
            "expected a torch_impl ResNet34 / ResidualUnit or a torchvision / timm resnet34. Received: Sequential",
        ),
        (lambda m: conversion.torch_to_keras(nn.Linear(2, 2)), "Received: Linear"),
        (
            lambda m: conversion.copy_keras_to_torch(m, _fresh()),
            "not a ResNet-34 of the book's design: expected a 7x7/2 conv with 64 filters",
        ),
        (
            lambda m: conversion.copy_keras_to_torch(m, nn.Linear(4, 2)),
            "expected a torch_impl ResNet34 or ResidualUnit to pair with. Received: Linear",
        ),
        (
            lambda m: conversion.copy_keras_to_torch("unit", torch_impl.ResidualUnit(64, 64)),
            "expected a Keras ResNet-34 model or ResidualUnit. Received: str",
        ),
        (
            lambda m: conversion.torch_to_keras(_fresh(), input_shape=(224, 224, 1)),
            "input_shape has 1 channels but the torch model takes 3",
        ),
    ],
    ids=[
        "keras_to_torch-of-a-dense-model",
        "keras_to_torch-of-a-string",
        "keras_to_torch-of-a-torch-model",
        "torch_to_keras-of-a-keras-model",
        "torch_to_keras-of-a-linear",
        "copy-from-a-dense-model",
        "copy-into-a-linear",
        "copy-from-a-string-into-a-unit",
        "torch_to_keras-with-other-channels",
    ],
)
def test_non_resnet_objects_are_refused(small_keras_model, call, message):
    with pytest.raises(ConversionError, match=re.escape(message)):
        call(small_keras_model)


def test_conversion_errors_are_user_input_errors():
    # The CLI prints UserInputErrors as one line without a traceback; everything else is a bug.
    assert issubclass(ConversionError, UserInputError) and issubclass(WeightFileError, UserInputError)


# --- errors: state_dicts (what .pt / .safetensors files hold) --------------------------------------


@pytest.fixture(scope="module")
def state_f32(twins_f32) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in twins_f32[1].state_dict().items()}


def test_state_dict_loads_into_an_equal_model(state_f32):
    model = state_dict_to_torch(state_f32, classifier_activation=None)
    assert _torch_bits(model) == {k: _bits(v.numpy()) for k, v in state_f32.items() if "num_batches" not in k}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s.pop("unit_0.main_layers.1.running_var"),
            "not a ResNet-34 state_dict: ResNet-34's 'unit_0.main_layers.1.running_var' is absent (1 tensors missing, "
            "0 unexpected)",
        ),
        (
            lambda s: s.update({"unit_0.extra": torch.zeros(3)}),
            "not a ResNet-34 state_dict: the first key that is not ResNet-34's is 'unit_0.extra' [3] (0 tensors "
            "missing, 1 unexpected)",
        ),
        (
            lambda s: s.update({"unit_3.main_layers.0.weight": torch.zeros(128, 64, 5, 5)}),
            "unit_3.main_layers.0.weight has shape (128, 64, 5, 5); ResNet-34 expects (128, 64, 3, 3)",
        ),
        (
            lambda s: s.pop("classifier.weight"),
            "not a ResNet-34 state_dict: 'classifier.bias' without 'classifier.weight'",
        ),
        (
            lambda s: s.update({"stem_bn.running_var": torch.full((64,), float("nan"))}),
            "tensor stem_bn.running_var holds NaN or Inf",
        ),
        (
            lambda s: s.update({"stem_bn.running_var": torch.ones(64, dtype=torch.float64)}),
            "expected weights of one dtype. Received: ['float32', 'float64']",
        ),
    ],
    ids=["missing-tensor", "extra-tensor", "wrong-shape", "no-classifier", "nan-variance", "mixed-dtypes"],
)
def test_bad_state_dict_is_refused_naming_the_tensor(state_f32, change, message):
    state = dict(state_f32)
    change(state)
    with pytest.raises(WeightFileError, match=re.escape(message)):
        state_dict_to_torch(state, classifier_activation=None, source="w.pt")


def test_other_class_count_state_dict_gives_that_many_classes(state_f32):
    # A state_dict carries its own class count; loading it builds a matching model, not a 10-class one.
    state = dict(state_f32)
    state["classifier.weight"], state["classifier.bias"] = torch.zeros(3, 512), torch.zeros(3)
    model = state_dict_to_torch(state, classifier_activation=None)
    assert model.num_classes == 3
    with pytest.raises(ConversionError, match=re.escape("the Keras model has 10 classes, the torch one 3")):
        conversion.copy_torch_to_keras(model, keras_impl.build_resnet34(10, (None, None, 3), None))


def test_copy_into_existing_twins_reproduces_randomized_weights(unit_twins):
    # copy_* into an existing twin (not a fresh one) overwrites every tensor
    _, torch_unit = unit_twins(64, 64, 1, "float64")
    other = keras_impl.ResidualUnit(64, strides=1, dtype="float64")
    other.build((None, None, None, 64))
    randomize_weights(other, seed=42)
    target = copy.deepcopy(torch_unit)
    conversion.copy_keras_to_torch(other, target)
    assert _torch_bits(target) == _torch_bits(conversion.keras_to_torch(other))
    assert _torch_bits(target) != _torch_bits(torch_unit)


@pytest.mark.parametrize("shape", [(3, 3, 512, 512), (7, 7, 3, 64), (1, 1, 256, 512), (3, 3, 65, 130), (2, 5, 7, 3)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernel_layout_changes_are_numpys_transposes_bit_for_bit(shape, dtype):
    """The converter's tiled kernel copies (HWIO <-> OIHW) at tile edges and past them, odd and non-square."""
    kernel = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    weight = hwio_to_oihw(kernel)
    assert weight.flags.c_contiguous and np.array_equal(weight, kernel.transpose(3, 2, 0, 1))
    back = oihw_to_hwio(weight)
    assert back.flags.c_contiguous and back.tobytes() == kernel.tobytes()


def test_each_layout_rule_states_the_shape_its_change_makes(twins_f32):
    """The audit checks shapes from each rule's torch_shape, without moving the data: it must be to_torch's."""
    keras_model, torch_model = twins_f32
    pairs = paired_tensors(keras_model, torch_model)
    assert {len(p.keras_variable.shape) for p in pairs} == {1, 2, 4}  # BatchNorm and biases, the head, conv kernels
    for p in pairs:
        keras_shape = tuple(p.keras_variable.shape)
        moved = p.to_torch(np.arange(np.prod(keras_shape)).reshape(keras_shape))
        assert tuple(p.torch_shape(keras_shape)) == moved.shape == tuple(p.torch_tensor.shape), p.path
