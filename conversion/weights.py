"""Weight conversion between Keras ResNet-34s and the PyTorch twin: the one module that knows both.

Models are paired by structure, not by name: each side is read into the slots of
``conversion.structure.resnet34_slots`` (stem conv, BN, activation, max-pool; 16 units of main path, skip
path and activation; global pooling, optional Flatten, Dense). So any Keras ResNet-34 of the book's design
converts — ``keras_impl.build_resnet34``'s, or the book's own code with auto-named layers and its activation
FUNCTION in ``main_layers``, Sequential or a Functional chain — and so do torchvision's and timm's
checkpoints, through the twin built in their convention. Every tensor gets a layout rule:

    Conv2D kernel (kh, kw, in, out)      <-> Conv2d weight (out, in, kh, kw)   transpose(3, 2, 0, 1)
    Dense kernel (in, out)               <-> Linear weight (out, in)           .T
    BatchNormalization gamma, beta,      <-> BatchNorm2d weight, bias,
        moving_mean, moving_variance         running_mean, running_var        as is

The whole plan is checked before anything is written: every source tensor used once, every target
tensor written once, shapes and dtypes equal after the layout change, and (unless a conversion changes the
convention on purpose) padding, BatchNorm epsilon and momentum equal. Values are copied, never cast, so
float64 stays float64 and a round trip is bit-exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import torch
from torch import nn

import keras_impl
import torch_impl
from conversion.arrays import hwio_to_oihw, oihw_to_hwio, single_dtype
from conversion.errors import ConversionError
from conversion.keras_reader import KerasLeaf, activation_name, describe_keras, keras_padding, read_keras
from conversion.state_dicts import (
    empty_twin,
    target_convention,
    torchvision_state_dict,  # noqa: F401  (importable from here, as before)
    twin_from_torchvision,
)
from conversion.structure import Slot
from keras_impl.layers import random_draws_skipped
from torch_impl.layers import Dense as TorchDense
from torch_impl.layers import GlobalAvgPool2d
from torch_impl.padding import padding_of

KerasObject = keras.Model | keras.layers.Layer

TorchObject = torch_impl.ResNet34 | torch_impl.ResidualUnit

# Layout rules (Keras -> torch, torch -> Keras, and a Keras shape in torch's layout, for the audit without a copy).
_AS_IS = (lambda a: a, lambda a: a, lambda shape: shape)

# transpose(3, 2, 0, 1) and (2, 3, 1, 0), copied tile by tile
_CONV = (hwio_to_oihw, oihw_to_hwio, lambda shape: (shape[3], shape[2], shape[0], shape[1]))

_DENSE = (lambda a: a.T, lambda a: a.T, lambda shape: shape[::-1])


@dataclass(frozen=True)
class TensorPair:
    """One Keras variable and its torch twin, with the layout change between them."""

    path: str  # the torch state_dict name
    keras_variable: keras.Variable
    torch_tensor: torch.Tensor
    to_torch: Callable[[np.ndarray], np.ndarray]
    to_keras: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # what to_torch makes of a Keras shape


def _check(condition: bool, path: str, what: str, keras_value: object, torch_value: object) -> None:
    if not condition:
        raise ConversionError(f"{path}: {what} differs: Keras has {keras_value}, torch has {torch_value}")


def _check_padding(path: str, leaf: KerasLeaf, module: nn.Module) -> None:
    keras_side, torch_side = keras_padding(leaf), padding_of(module)
    _check(keras_side == torch_side, path, "padding", keras_side, torch_side)


def _slot_tensors(slot: Slot, leaf: KerasLeaf, module: nn.Module, same_convention: bool) -> list[TensorPair]:
    """The tensor pairs of one slot, after checking the two layers compute the same function there."""
    path, layer = slot.name, leaf.layer
    kinds = (describe_keras(layer), type(module).__name__)
    if slot.kind == "conv":
        _check(isinstance(module, nn.Conv2d), path, "layer kind", *kinds)
        _check(tuple(layer.strides) == tuple(module.stride), path, "strides", tuple(layer.strides), module.stride)
        if same_convention:
            _check_padding(path, leaf, module)
        _check(layer.use_bias == (module.bias is not None), path, "use_bias", layer.use_bias, module.bias is not None)
        pairs = [TensorPair(f"{path}.weight", layer.kernel, module.weight, *_CONV)]
        return pairs + ([TensorPair(f"{path}.bias", layer.bias, module.bias, *_AS_IS)] if layer.use_bias else [])
    if slot.kind == "batch_norm":
        _check(isinstance(module, nn.BatchNorm2d), path, "layer kind", *kinds)
        if same_convention:  # same weights with another epsilon or momentum is another function
            _check(math.isclose(layer.epsilon, module.eps), path, "epsilon", layer.epsilon, module.eps)
            _check(
                math.isclose(layer.momentum, 1 - module.momentum),
                path,
                "momentum (torch = 1 - keras)",
                layer.momentum,
                module.momentum,
            )
        return [
            TensorPair(f"{path}.weight", layer.gamma, module.weight, *_AS_IS),
            TensorPair(f"{path}.bias", layer.beta, module.bias, *_AS_IS),
            TensorPair(f"{path}.running_mean", layer.moving_mean, module.running_mean, *_AS_IS),
            TensorPair(f"{path}.running_var", layer.moving_variance, module.running_var, *_AS_IS),
        ]
    if slot.kind == "dense":
        _check(isinstance(module, TorchDense), path, "layer kind", *kinds)
        pairs = [TensorPair(f"{path}.weight", layer.kernel, module.weight, *_DENSE)]
        return pairs + ([TensorPair(f"{path}.bias", layer.bias, module.bias, *_AS_IS)] if layer.use_bias else [])
    if slot.kind == "activation":
        name = getattr(module, "keras_name", type(module).__name__)
        _check(activation_name(layer) == name, path, "activation", activation_name(layer), name)
        return []
    if slot.kind == "max_pool":
        _check(isinstance(module, nn.MaxPool2d), path, "layer kind", *kinds)
        _check(
            tuple(layer.pool_size) == (module.kernel_size,) * 2 and tuple(layer.strides) == (module.stride,) * 2,
            path,
            "pool size and strides",
            (layer.pool_size, layer.strides),
            (module.kernel_size, module.stride),
        )
        if same_convention:
            _check_padding(path, leaf, module)
        return []
    expected = {"global_avg_pool": GlobalAvgPool2d, "flatten": nn.Flatten}[slot.kind]
    _check(isinstance(module, expected), path, "layer kind", *kinds)
    return []


def _plan(keras_obj: KerasObject, torch_obj: TorchObject, same_convention: bool = True) -> list[TensorPair]:
    """Every tensor pair of the two objects, audited (structure, shapes, dtypes, each used exactly once)."""
    if not isinstance(torch_obj, torch_impl.ResNet34 | torch_impl.ResidualUnit):
        raise ConversionError(
            f"expected a torch_impl ResNet34 or ResidualUnit to pair with. Received: {type(torch_obj).__name__}"
        )
    keras_resnet = read_keras(keras_obj)
    if isinstance(torch_obj, torch_impl.ResidualUnit) != keras_resnet.is_unit:
        raise ConversionError(
            f"cannot pair a Keras {'ResidualUnit' if keras_resnet.is_unit else 'model'} with a torch "
            f"{type(torch_obj).__name__}"
        )
    if not keras_resnet.is_unit and keras_resnet.num_classes != torch_obj.num_classes:
        raise ConversionError(
            f"classifier: the Keras model has {keras_resnet.num_classes} classes, the torch one "
            f"{torch_obj.num_classes} (0: no head)"
        )
    if keras_resnet.head_activation is not None:
        head = torch_obj.classifier.activation.keras_name
        _check(keras_resnet.head_activation == head, "classifier", "activation", keras_resnet.head_activation, head)
    pairs = []
    for slot in keras_resnet.slots:
        if slot.name not in keras_resnet.layers:  # an optional layer the Keras model leaves out
            continue
        try:
            module = torch_obj.get_submodule(slot.name)
        except AttributeError:
            raise ConversionError(
                f"{slot.name}: absent in torch; Keras has {keras_resnet.layers[slot.name].where}"
            ) from None
        pairs += _slot_tensors(slot, keras_resnet.layers[slot.name], module, same_convention)

    # Audit: every tensor on each side used exactly once, shapes equal after the layout change.
    keras_ids = [id(p.keras_variable) for p in pairs]
    unused = [v.path for v in keras_obj.weights if id(v) not in keras_ids]
    torch_state = {
        k: v for k, v in torch_obj.state_dict(keep_vars=True).items() if not k.endswith("num_batches_tracked")
    }
    planned = [p.path for p in pairs]
    if len(set(keras_ids)) != len(keras_ids) or len(set(planned)) != len(planned):
        raise ConversionError("internal: a tensor would be used twice")
    extra = sorted(set(torch_state) - set(planned))  # in the torch object, with no Keras partner
    missing = sorted(set(planned) - set(torch_state))  # needed by the Keras object, absent in torch
    if unused or missing or extra:
        raise ConversionError(
            f"tensors without a partner: Keras {unused}, torch missing {missing}, torch extra {extra}"
        )
    for p in pairs:
        keras_shape = tuple(p.keras_variable.shape)
        as_torch = tuple(p.torch_shape(keras_shape))
        _check(
            as_torch == tuple(p.torch_tensor.shape),
            p.path,
            "shape (in torch layout)",
            as_torch,
            tuple(p.torch_tensor.shape),
        )
        keras_dtype = keras.backend.standardize_dtype(p.keras_variable.dtype)
        torch_dtype = str(p.torch_tensor.dtype).removeprefix("torch.")
        _check(keras_dtype == torch_dtype, p.path, "dtype", keras_dtype, torch_dtype)
    return pairs


def paired_tensors(keras_obj: KerasObject, torch_obj: TorchObject) -> list[TensorPair]:
    """Every (Keras variable, torch tensor) pair of two twins, audited; the torch tensors are the live ones."""
    return _plan(keras_obj, torch_obj)


def check_same_architecture(keras_obj: KerasObject, torch_obj: TorchObject) -> None:
    """Raise ConversionError unless the two have the same layers, tensor shapes and conventions (nothing copied)."""
    _plan(keras_obj, torch_obj)


def copy_keras_to_torch(keras_obj: KerasObject, torch_obj: TorchObject, *, same_convention: bool = True) -> None:
    """Copy every weight of a Keras model/unit into its existing torch twin (checked first)."""
    pairs = _plan(keras_obj, torch_obj, same_convention)
    with torch.no_grad():
        for p in pairs:
            value = p.to_torch(keras.ops.convert_to_numpy(p.keras_variable))
            p.torch_tensor.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def copy_torch_to_keras(torch_obj: TorchObject, keras_obj: KerasObject, *, same_convention: bool = True) -> None:
    """Copy every weight of a torch model/unit into its existing Keras twin (checked first)."""
    pairs = _plan(keras_obj, torch_obj, same_convention)
    for p in pairs:
        p.keras_variable.assign(p.to_keras(p.torch_tensor.detach().cpu().numpy()))


def keras_to_torch(obj: KerasObject, *, convention: str | None = None) -> TorchObject:
    """The torch twin of a Keras ResNet-34 or ResidualUnit (ours or the book's own), weights copied, in eval mode.

    The twin keeps the source's convention unless ``convention`` ("book" or "torchvision") changes it on
    purpose: the weights are then copied unchanged into a network that pads (and normalises) otherwise.
    """
    source = read_keras(obj)
    target = target_convention(source.convention, convention)
    conv = source.layers[source.slots[0].name].layer
    dtype = single_dtype({keras.backend.standardize_dtype(v.dtype) for v in obj.weights})

    def build() -> TorchObject:
        if source.is_unit:
            return torch_impl.ResidualUnit(
                conv.kernel.shape[2], conv.filters, conv.strides[0], source.activation, target
            )
        return torch_impl.ResNet34(
            num_classes=source.num_classes,
            in_channels=conv.kernel.shape[2],
            classifier_activation=source.head_activation,
            activation=source.activation,
            convention=target,
        )

    twin = empty_twin(build, dtype)
    copy_keras_to_torch(obj, twin, same_convention=target == source.convention)
    return twin.eval()


def torch_to_keras(
    obj: TorchObject | nn.Module, input_shape: tuple = (224, 224, 3), *, convention: str | None = None
) -> KerasObject:
    """The Keras twin of a torch ResNet34 or ResidualUnit (or a torchvision / timm resnet34), weights copied.

    ``input_shape`` is (height, width, channels) for a model; a unit is built for any height and width. The
    result keeps the source's convention unless ``convention`` changes it on purpose.
    """
    if not isinstance(obj, torch_impl.ResidualUnit | torch_impl.ResNet34):
        obj = twin_from_torchvision(obj)
    dtype = single_dtype(
        {str(t.dtype).removeprefix("torch.") for t in obj.state_dict().values() if t.is_floating_point()}
    )
    target = target_convention(obj.convention, convention)
    if isinstance(obj, torch_impl.ResidualUnit):
        twin = keras_impl.ResidualUnit(obj.filters, obj.strides, obj.activation_name, target, dtype=dtype)
        twin.build((None, None, None, obj.in_channels))
    else:
        if input_shape[-1] != obj.in_channels:
            raise ConversionError(
                f"input_shape has {input_shape[-1]} channels but the torch model takes {obj.in_channels}. "
                f"Received: input_shape={input_shape}"
            )
        twin = keras_impl.build_resnet34(
            obj.num_classes,
            input_shape,
            obj.classifier_activation,
            dtype,
            activation=obj.activation_name,
            convention=target,
            initialize_weights=False,  # every weight is copied next
        )
    copy_torch_to_keras(obj, twin, same_convention=target == obj.convention)
    return twin


def torch_to_keras_hub(obj: torch_impl.ResNet34, input_shape: tuple = (224, 224, 3)) -> keras.Model:
    """keras-hub's ResNetImageClassifier holding a torch ResNet34's weights (torchvision convention, ReLU)."""
    from conversion.keras_hub_models import build_keras_hub_resnet34

    if obj.convention != "torchvision" or obj.activation_name != "relu":
        raise ConversionError(
            "keras-hub's ResNet computes the torchvision convention with ReLU units; this model computes the "
            f"{obj.convention} convention with {obj.activation_name!r} units"
        )
    dtype = single_dtype(
        {str(t.dtype).removeprefix("torch.") for t in obj.state_dict().values() if t.is_floating_point()}
    )
    with random_draws_skipped():  # keras-hub draws its kernels as the model is made; every weight is copied next
        twin = build_keras_hub_resnet34(obj.num_classes, input_shape, obj.classifier_activation, dtype)
    copy_torch_to_keras(obj, twin)
    return twin
