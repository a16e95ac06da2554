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
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import keras
import numpy as np
import torch
from torch import nn

import keras_impl
import torch_impl
from conversion.errors import ConversionError, WeightFileError
from conversion.structure import Slot, resnet34_slots, unit_slots
from keras_impl.layers import BATCH_NORM as KERAS_BATCH_NORM
from keras_impl.padding import (
    CONVENTIONS,
    SymmetricPaddingConv2D,
    SymmetricPaddingMaxPool2D,
    needs_explicit_padding,
)
from torch_impl.layers import Dense as TorchDense
from torch_impl.layers import GlobalAvgPool2d
from torch_impl.padding import padding_of
from torch_impl.resnet34 import twin_key_names

KerasObject = keras.Model | keras.layers.Layer
TorchObject = torch_impl.ResNet34 | torch_impl.ResidualUnit

# Layout rules (Keras -> torch, torch -> Keras).
_AS_IS = (lambda a: a, lambda a: a)
_CONV = (lambda a: a.transpose(3, 2, 0, 1), lambda a: a.transpose(2, 3, 1, 0))
_DENSE = (lambda a: a.T, lambda a: a.T)


@dataclass(frozen=True)
class TensorPair:
    """One Keras variable and its torch twin, with the layout change between them."""

    path: str  # the torch state_dict name
    keras_variable: keras.Variable
    torch_tensor: torch.Tensor
    to_torch: Callable[[np.ndarray], np.ndarray]
    to_keras: Callable[[np.ndarray], np.ndarray]


# --- reading a Keras ResNet-34 by structure ----------------------------------------------------------


@dataclass(frozen=True)
class _KerasLeaf:
    where: str  # for messages: "residual_unit_7.main_layers[2]"
    layer: object  # a keras Layer, or an activation function (the book's main_layers[2])


def _is_unit(layer: object) -> bool:
    """A layer of the book's ResidualUnit design: ours, the book's own class, or any with the same parts."""
    return isinstance(layer, keras.layers.Layer) and all(
        hasattr(layer, attr) for attr in ("main_layers", "skip_layers", "activation")
    )


def _unit_leaves(unit: keras.layers.Layer, where: str) -> list[_KerasLeaf]:
    leaves = [_KerasLeaf(f"{where}.main_layers[{i}]", layer) for i, layer in enumerate(unit.main_layers)]
    leaves += [_KerasLeaf(f"{where}.skip_layers[{i}]", layer) for i, layer in enumerate(unit.skip_layers)]
    return [*leaves, _KerasLeaf(f"{where}.activation", unit.activation)]


def _check_chain(model: keras.Model) -> None:
    """A Functional model must be a plain chain: one operation at each depth of its own graph."""
    for depth, nodes in sorted(getattr(model, "_nodes_by_depth", {}).items()):
        if len(nodes) != 1:
            names = sorted(node.operation.name for node in nodes)
            raise ConversionError(
                f"expected a chain of layers (Sequential, or Functional with each layer called once on the previous "
                f"one's output); layers {names} sit side by side (graph depth {depth})"
            )


def _keras_leaves(model: keras.Model) -> list[_KerasLeaf]:
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not isinstance(model, keras.Sequential):
        _check_chain(model)
    leaves = []
    for layer in layers:
        leaves += _unit_leaves(layer, layer.name) if _is_unit(layer) else [_KerasLeaf(layer.name, layer)]
    return leaves


def _activation_name(leaf: object) -> str | None:
    """The Keras name of an activation layer or function ('relu', 'linear', ...), or None if it is not one."""
    if isinstance(leaf, keras.layers.Activation):
        return keras.activations.serialize(leaf.activation)
    if isinstance(leaf, keras.layers.ReLU):
        plain = leaf.max_value is None and not leaf.negative_slope and not leaf.threshold
        return "relu" if plain else None
    if isinstance(leaf, keras.layers.Softmax):
        return "softmax" if leaf.axis in (-1, [-1]) else None
    if callable(leaf) and not isinstance(leaf, keras.layers.Layer):
        try:
            return keras.activations.serialize(leaf)
        except (ValueError, TypeError):
            return None
    return None


def _describe_keras(leaf: object) -> str:
    if isinstance(leaf, keras.layers.Conv2D):
        (k, _), (s, _) = leaf.kernel_size, leaf.strides
        return f"{type(leaf).__name__} {k}x{leaf.kernel_size[1]}/{s} with {leaf.filters} filters"
    if isinstance(leaf, keras.layers.MaxPooling2D):
        return f"{type(leaf).__name__} {leaf.pool_size[0]}x{leaf.pool_size[1]}/{leaf.strides[0]}"
    if isinstance(leaf, keras.layers.BatchNormalization):
        return f"BatchNormalization of {leaf.gamma.shape[0] if leaf.built else '?'} features"
    name = _activation_name(leaf)
    return f"activation '{name}'" if name else type(leaf).__name__


def _fits(slot: Slot, leaf: object) -> bool:
    """Whether a Keras layer is the kind of layer ``slot`` needs, with its filters, kernel and strides."""
    square = lambda pair: pair[0] == pair[1]  # noqa: E731
    if slot.kind == "conv":
        return (
            isinstance(leaf, keras.layers.Conv2D)
            and type(leaf) in (keras.layers.Conv2D, SymmetricPaddingConv2D)
            and square(leaf.kernel_size)
            and square(leaf.strides)
            and tuple(leaf.dilation_rate) == (1, 1)
            and leaf.groups == 1
            and (leaf.filters, leaf.kernel_size[0], leaf.strides[0]) == (slot.filters, slot.kernel_size, slot.strides)
        )
    if slot.kind == "max_pool":
        return (
            isinstance(leaf, keras.layers.MaxPooling2D)
            and square(leaf.pool_size)
            and (leaf.pool_size[0], leaf.strides[0]) == (slot.kernel_size, slot.strides)
        )
    if slot.kind == "batch_norm":
        return (
            isinstance(leaf, keras.layers.BatchNormalization)
            and leaf.axis in (-1, 3, [-1], [3])
            and leaf.center
            and leaf.scale
            and not getattr(leaf, "renorm", False)
            and (not leaf.built or leaf.gamma.shape[0] == slot.filters)
        )
    if slot.kind == "activation":
        return _activation_name(leaf) is not None
    if slot.kind == "global_avg_pool":
        return isinstance(leaf, keras.layers.GlobalAveragePooling2D) and not leaf.keepdims
    if slot.kind == "flatten":
        return isinstance(leaf, keras.layers.Flatten)
    if slot.kind == "dense":
        return isinstance(leaf, keras.layers.Dense)
    raise AssertionError(slot.kind)


def _match_slots(slots: list[Slot], leaves: list[_KerasLeaf], what: str) -> tuple[dict[str, _KerasLeaf], str | None]:
    """{slot name: leaf} in forward order, and the head activation given as a trailing layer (if any)."""
    matched: dict[str, _KerasLeaf] = {}
    position = 0
    for slot in slots:
        leaf = leaves[position] if position < len(leaves) else None
        if leaf is not None and _fits(slot, leaf.layer):
            matched[slot.name] = leaf
            position += 1
        elif not slot.optional:
            found = f"'{leaf.where}' ({_describe_keras(leaf.layer)})" if leaf else "the end of the model"
            raise ConversionError(
                f"not a ResNet-34 of the book's design: expected {slot.describe()} (ResNet-34 layer {slot.name}), "
                f"found {found}"
            )
    rest = leaves[position:]
    head_activation = None
    if len(rest) == 1 and _activation_name(rest[0].layer) and "classifier" in matched:
        head_activation = _activation_name(rest[0].layer)  # Dense(...) followed by Activation("softmax")
        if keras.activations.serialize(matched["classifier"].layer.activation) != "linear":
            raise ConversionError(f"'{rest[0].where}': a second head activation after an activated Dense")
    elif rest:
        raise ConversionError(
            f"not a ResNet-34 of the book's design: '{rest[0].where}' ({_describe_keras(rest[0].layer)}) "
            f"follows the last layer of the {what}"
        )
    return matched, head_activation


@dataclass(frozen=True)
class KerasResNet:
    """A Keras ResNet-34 or ResidualUnit read by structure: its layers by slot, and what defines its function."""

    slots: list[Slot]
    layers: dict[str, _KerasLeaf]
    head_activation: str | None  # None for a unit
    activation: str
    convention: str


def _keras_padding(layer: keras.layers.Layer) -> str | int:
    """'same' where Keras pads the TF way and that can be asymmetric, else the symmetric padding."""
    k, s = layer.kernel_size[0] if hasattr(layer, "kernel_size") else layer.pool_size[0], layer.strides[0]
    if isinstance(layer, SymmetricPaddingConv2D | SymmetricPaddingMaxPool2D):
        return layer.explicit_padding
    if layer.padding == "valid":
        return 0
    return "same" if needs_explicit_padding(k, s) else k // 2


def _conventions_of(slot: Slot, leaf: object) -> set[str]:
    """The conventions a conv, max-pool or BatchNorm layer is consistent with (all, for other layers)."""
    if slot.kind in ("conv", "max_pool"):
        padding, k = _keras_padding(leaf), slot.kernel_size
        if padding == "same":
            return {"book"}
        if padding != k // 2:
            return set()
        return {"torchvision"} if needs_explicit_padding(k, slot.strides) else set(CONVENTIONS)
    if slot.kind == "batch_norm":
        return {
            name
            for name, setting in KERAS_BATCH_NORM.items()
            if math.isclose(leaf.epsilon, setting["epsilon"]) and math.isclose(leaf.momentum, setting["momentum"])
        }
    return set(CONVENTIONS)


def _convention(slots: list[Slot], layers: dict[str, _KerasLeaf]) -> str:
    possible = set(CONVENTIONS)
    for slot in slots:
        if slot.name not in layers:
            continue
        leaf = layers[slot.name]
        fits = _conventions_of(slot, leaf.layer)
        if not possible & fits:
            got = (
                f"epsilon {leaf.layer.epsilon:g}, momentum {leaf.layer.momentum:g}"
                if slot.kind == "batch_norm"
                else f"padding {_keras_padding(leaf.layer)!r}"
            )
            expected = "; ".join(
                f"{name}: epsilon {s['epsilon']:g}, momentum {s['momentum']:g}" for name, s in KERAS_BATCH_NORM.items()
            )
            if slot.kind != "batch_norm":
                expected = f"book: TF 'same'; torchvision: symmetric {slot.kernel_size // 2}"
            earlier = f" (earlier layers fit only {sorted(possible)})" if fits else ""
            raise ConversionError(f"'{leaf.where}': {got} fits no convention{earlier}; expected {expected}")
        possible &= fits
    return "book" if "book" in possible else possible.pop()


def read_keras(obj: KerasObject) -> KerasResNet:
    """Read a Keras ResNet-34 model or ResidualUnit by structure; a ConversionError names the first misfit."""
    if _is_unit(obj):
        if not obj.built:
            raise ConversionError("the Keras ResidualUnit is not built: call it on an input (or build it) first")
        conv = obj.main_layers[0] if obj.main_layers else None
        if not isinstance(conv, keras.layers.Conv2D):
            raise ConversionError(f"'{obj.name}.main_layers[0]': expected a conv, found {_describe_keras(conv)}")
        slots = unit_slots("", conv.filters, conv.strides[0])
        layers, _ = _match_slots(slots, _unit_leaves(obj, obj.name), "unit")
        head = None
    elif isinstance(obj, keras.Model):
        slots = resnet34_slots()
        layers, head = _match_slots(slots, _keras_leaves(obj), "model")
        head = head or keras.activations.serialize(layers["classifier"].layer.activation)
    else:
        raise ConversionError(f"expected a Keras ResNet-34 model or ResidualUnit. Received: {type(obj).__name__}")
    names = {_activation_name(layers[s.name].layer) for s in slots if s.kind == "activation"}
    if len(names) != 1:
        raise ConversionError(f"expected one activation throughout (the twin has one); found {sorted(names)}")
    return KerasResNet(slots, layers, head, names.pop(), _convention(slots, layers))


# --- pairing -----------------------------------------------------------------------------------------


def _check(condition: bool, path: str, what: str, keras_value: object, torch_value: object) -> None:
    if not condition:
        raise ConversionError(f"{path}: {what} differs: Keras has {keras_value}, torch has {torch_value}")


def _check_padding(path: str, layer: keras.layers.Layer, module: nn.Module) -> None:
    keras_padding, torch_padding = _keras_padding(layer), padding_of(module)
    _check(keras_padding == torch_padding, path, "padding", keras_padding, torch_padding)


def _slot_tensors(slot: Slot, leaf: _KerasLeaf, module: nn.Module, same_convention: bool) -> list[TensorPair]:
    """The tensor pairs of one slot, after checking the two layers compute the same function there."""
    path, layer = slot.name, leaf.layer
    kinds = (_describe_keras(layer), type(module).__name__)
    if slot.kind == "conv":
        _check(isinstance(module, nn.Conv2d), path, "layer kind", *kinds)
        _check(tuple(layer.strides) == tuple(module.stride), path, "strides", tuple(layer.strides), module.stride)
        if same_convention:
            _check_padding(path, layer, module)
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
        _check(_activation_name(layer) == name, path, "activation", _activation_name(layer), name)
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
            _check_padding(path, layer, module)
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
    if isinstance(torch_obj, torch_impl.ResidualUnit) != (keras_resnet.head_activation is None):
        raise ConversionError(
            f"cannot pair a Keras {'ResidualUnit' if keras_resnet.head_activation is None else 'model'} with a torch "
            f"{type(torch_obj).__name__}"
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
        as_torch = p.to_torch(np.empty(keras_shape, dtype=np.uint8)).shape
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


# --- building the twin --------------------------------------------------------------------------------


def _one_dtype(dtypes: set[str]) -> str:
    if len(dtypes) != 1:
        raise ConversionError(f"expected weights of one dtype. Received: {sorted(dtypes)}")
    return dtypes.pop()


def _target_convention(source: str, convention: str | None) -> str:
    if convention is None:
        return source
    if convention not in CONVENTIONS:
        raise ConversionError(f"unknown convention; expected one of {CONVENTIONS}. Received: convention={convention!r}")
    return convention


def keras_to_torch(obj: KerasObject, *, convention: str | None = None) -> TorchObject:
    """The torch twin of a Keras ResNet-34 or ResidualUnit (ours or the book's own), weights copied, in eval mode.

    The twin keeps the source's convention unless ``convention`` ("book" or "torchvision") changes it on
    purpose: the weights are then copied unchanged into a network that pads (and normalises) otherwise.
    """
    source = read_keras(obj)
    target = _target_convention(source.convention, convention)
    conv = source.layers[source.slots[0].name].layer
    if source.head_activation is None:
        twin = torch_impl.ResidualUnit(conv.kernel.shape[2], conv.filters, conv.strides[0], source.activation, target)
    else:
        twin = torch_impl.ResNet34(
            num_classes=source.layers["classifier"].layer.units,
            in_channels=conv.kernel.shape[2],
            classifier_activation=source.head_activation,
            activation=source.activation,
            convention=target,
        )
    dtype = _one_dtype({keras.backend.standardize_dtype(v.dtype) for v in obj.weights})
    twin = twin.to(getattr(torch, dtype))  # before copying, so float64 never passes through float32
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
    dtype = _one_dtype(
        {str(t.dtype).removeprefix("torch.") for t in obj.state_dict().values() if t.is_floating_point()}
    )
    target = _target_convention(obj.convention, convention)
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
        )
    copy_torch_to_keras(obj, twin, same_convention=target == obj.convention)
    return twin


# --- torch state dicts: the twin's names or torchvision's / timm's -----------------------------------


def state_dict_convention(state: Mapping[str, torch.Tensor]) -> str | None:
    """'book' for the twin's key names, 'torchvision' for torchvision's / timm's, None for neither."""
    if "stem_conv.weight" in state:
        return "book"
    if "conv1.weight" in state and "fc.weight" in state:
        return "torchvision"
    return None


def twin_from_state_dict(
    state: Mapping[str, torch.Tensor],
    *,
    classifier_activation: str | None = "softmax",
    activation: str = "relu",
    source: str = "state_dict",
) -> torch_impl.ResNet34:
    """A torch_impl.ResNet34 holding ``state`` (the twin's key names, or torchvision's / timm's), checked first.

    torchvision's names give the torchvision convention (its padding, epsilon and momentum), so the twin
    computes exactly what torchvision's resnet34 computes with these weights.
    """
    convention = state_dict_convention(state)
    if convention is None:
        sample = ", ".join(list(state)[:3])
        raise WeightFileError(
            f"{source}: not a ResNet-34 state_dict: expected the twin's keys (stem_conv.weight, ...) or "
            f"torchvision's / timm's (conv1.weight, ..., fc.weight); found {len(state)} tensors: {sample}, ..."
        )
    head, stem = ("classifier", "stem_conv") if convention == "book" else ("fc", "conv1")
    for key in (f"{stem}.weight", f"{head}.weight"):
        if key not in state:
            raise WeightFileError(f"{source}: not a ResNet-34 state_dict: no '{key}'")
    floating = {k: v for k, v in state.items() if v.is_floating_point()}
    try:
        dtype = _one_dtype({str(t.dtype).removeprefix("torch.") for t in floating.values()})
    except ConversionError as error:
        raise WeightFileError(f"{source}: {error}") from None
    model = torch_impl.ResNet34(
        num_classes=state[f"{head}.weight"].shape[0],
        in_channels=state[f"{stem}.weight"].shape[1],
        classifier_activation=classifier_activation,
        activation=activation,
        convention=convention,
    ).to(getattr(torch, dtype))
    if convention == "torchvision":
        names = twin_key_names(model)
        state = {names.get(k, k): v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if convention == "torchvision":  # name them as the file does
        missing = [torch_impl.torchvision_key(k) for k in missing]
    if missing or unexpected:
        raise WeightFileError(
            f"{source}: not a ResNet-34 state_dict: {len(missing)} tensors missing "
            f"({', '.join(missing[:2])}...), {len(unexpected)} unexpected ({', '.join(unexpected[:2])}...)"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise WeightFileError(
                f"{source}: {key} has shape {tuple(tensor.shape)}; ResNet-34 expects {tuple(expected[key].shape)}"
            )
    for key, tensor in floating.items():
        if not torch.isfinite(tensor).all():
            raise WeightFileError(f"{source}: tensor {key} holds NaN or Inf; expected finite weights")
    model.load_state_dict(state, strict=False)  # num_batches_tracked may be absent; all else checked above
    return model.eval()


def twin_from_torchvision(model: nn.Module, classifier_activation: str | None = None) -> torch_impl.ResNet34:
    """The twin of a torchvision or timm resnet34 module: its state_dict in the torchvision convention.

    The module's own padding and BatchNorm epsilon are checked against torchvision's (a ResNet with other
    settings would silently become another function).
    """
    if not isinstance(model, nn.Module) or state_dict_convention(model.state_dict()) != "torchvision":
        raise ConversionError(
            "expected a torch_impl ResNet34 / ResidualUnit or a torchvision / timm resnet34. "
            f"Received: {type(model).__name__}"
        )
    checks = [
        ("conv1.padding", tuple(model.conv1.padding), (3, 3)),
        ("maxpool.padding", _pair(model.maxpool.padding), (1, 1)),
    ]
    checks += [(f"{name}.eps", m.eps, 1e-5) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for what, got, expected in checks:
        if got != expected:
            raise ConversionError(f"{what} is {got}; torchvision's resnet34 has {expected}")
    return twin_from_state_dict(
        model.state_dict(), classifier_activation=classifier_activation, source=type(model).__name__
    )


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return tuple(value) if isinstance(value, tuple | list) else (value, value)


def torchvision_state_dict(model: torch_impl.ResNet34) -> dict[str, torch.Tensor]:
    """The twin's state_dict under torchvision's key names, loadable by ``torchvision.models.resnet34`` strictly."""
    return {torch_impl.torchvision_key(k): v for k, v in model.state_dict().items()}


def with_convention(twin: torch_impl.ResNet34, convention: str | None) -> torch_impl.ResNet34:
    """``twin`` itself, or a copy computing in ``convention`` with the same weights (the twin's names do not
    depend on the convention, so its state_dict carries over unchanged)."""
    target = _target_convention(twin.convention, convention)
    if target == twin.convention:
        return twin
    dtype = next(t.dtype for t in twin.state_dict().values() if t.is_floating_point())
    other = torch_impl.ResNet34(
        twin.num_classes, twin.in_channels, twin.classifier_activation, twin.activation_name, target
    ).to(dtype)
    other.load_state_dict(twin.state_dict())
    return other.eval()


def function_change(
    before: torch_impl.ResNet34, after: torch_impl.ResNet34, size: tuple[int, int], batch: int = 8, seed: int = 0
) -> dict:
    """How much ``after`` computes otherwise than ``before`` on seeded images: max rel err of the logits
    (max |after - before| / max |before|) and the share of images whose top-1 class is unchanged."""
    dtype = next(t.dtype for t in before.state_dict().values() if t.is_floating_point())
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, before.in_channels, *size, generator=generator, dtype=torch.float64).to(dtype)

    def logits(model: torch_impl.ResNet34) -> torch.Tensor:
        with torch.no_grad():
            return nn.Linear.forward(model.classifier, model[:-1].eval()(images))

    a, b = logits(before), logits(after)
    return {
        "convention": [before.convention, after.convention],
        "images": f"{batch} seeded standard-normal images of {size[0]}x{size[1]}",
        "logits_max_rel_err": float((b - a).abs().max() / a.abs().max()),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).double().mean()),
    }
