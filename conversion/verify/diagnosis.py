"""Why a stage diverges at inference: the classic porting bugs, each recomputed from Keras's own weights.

Inside the first divergent stage the layers are compared one by one; the first layer beyond its noise floor is
tested against every hypothesis of its kind (padding, kernel layout, BatchNorm epsilon, ...). A hypothesis is
named only where its signature stands out of that layer's floor and it reproduces torch's output
(``noise_floor.explains``); otherwise the diagnosis is ``Cause.UNKNOWN`` with what the error looks like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conversion.arrays import hwio_to_oihw, max_rel_err, nchw_to_nhwc
from conversion.verify.causes import Cause
from conversion.verify.noise_floor import Evidence, explains, floor_images, judge, scale_of, scaled_distance
from conversion.verify.report import Diagnosis
from conversion.verify.stages import as_torch, run_torch, sublayers
from torch_impl.padding import pad_same, same_padding

Hypotheses = dict[Cause, tuple[np.ndarray, str]]  # cause -> (the output it predicts, this instance's detail)


def _conv_hypotheses(layer: keras.layers.Conv2D, x: np.ndarray, first_layer: bool) -> Hypotheses:
    kernel = torch.from_numpy(hwio_to_oihw(keras.ops.convert_to_numpy(layer.kernel)))
    k, s = layer.kernel_size[0], layer.strides[0]
    xt = as_torch(x)
    out = {
        Cause.SYMMETRIC_PADDING: (
            F.conv2d(xt, kernel, stride=s, padding=k // 2),
            f"({k // 2}, {k // 2}) where TF 'same' pads {same_padding(x.shape[1], k, s)}, a {k}x{k}/{s} conv",
        ),
        Cause.KERNEL_HW_SWAPPED: (F.conv2d(pad_same(xt, k, s), kernel.transpose(2, 3), stride=s), ""),
    }
    if first_layer:  # NHWC memory read as NCHW: the first layer sees scrambled pixels
        misread = torch.from_numpy(np.ascontiguousarray(x)).reshape(x.shape[0], x.shape[3], x.shape[1], x.shape[2])
        out[Cause.LAYOUT_MIXUP] = (F.conv2d(pad_same(misread, k, s), kernel, stride=s), "")
    return {cause: (nchw_to_nhwc(t.numpy()), detail) for cause, (t, detail) in out.items()}


def _bn_hypotheses(layer: keras.layers.BatchNormalization, x: np.ndarray) -> Hypotheses:
    gamma, beta, mean, var = (
        keras.ops.convert_to_numpy(v) for v in (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)
    )
    with np.errstate(invalid="ignore"):
        return {
            Cause.BN_EPSILON: (gamma * (x - mean) / np.sqrt(var + 1e-5) + beta, f"Keras's is {layer.epsilon:g}"),
            Cause.BN_MEAN_VARIANCE_SWAPPED: (gamma * (x - var) / np.sqrt(mean + layer.epsilon) + beta, ""),
        }


def _dense_hypotheses(layer: keras.layers.Dense, x: np.ndarray) -> Hypotheses:
    kernel, bias = keras.ops.convert_to_numpy(layer.kernel), keras.ops.convert_to_numpy(layer.bias)
    if kernel.shape[0] != kernel.shape[1]:
        return {}
    return {Cause.DENSE_NOT_TRANSPOSED: (x @ kernel.T + bias, f"a square {kernel.shape[0]} x {kernel.shape[1]} kernel")}


def _pool_hypotheses(layer: keras.layers.MaxPooling2D, x: np.ndarray) -> Hypotheses:
    k, s = layer.pool_size[0], layer.strides[0]
    padded = pad_same(as_torch(x), k, s, value=0.0)
    return {Cause.MAX_POOL_ZERO_PADDING: (nchw_to_nhwc(F.max_pool2d(padded, k, s).numpy()), "")}


def _pattern(actual: np.ndarray, reference: np.ndarray) -> str:
    """What the error looks like, where no hypothesis reproduced the output (a hint, not a cause)."""
    if not np.all(np.isfinite(actual)):
        return "non-finite values (NaN/Inf) appear here"
    err = np.abs(np.asarray(actual, np.float64) - reference)
    if err.ndim == 4 and min(err.shape[1:3]) > 2:
        border = np.concatenate([err[:, -1].ravel(), err[:, :, -1].ravel()])
        if border.max() > 0 and err[:, :-1, :-1].max() < 0.05 * border.max():
            return "error concentrated on the bottom/right border: a padding difference?"
    if err.ndim >= 2:
        per_channel = err.reshape(-1, err.shape[-1]).max(axis=0)
        if (per_channel > 0.01 * per_channel.max()).mean() < 0.5:
            bad = int((per_channel > 0.01 * per_channel.max()).sum())
            return f"error confined to {bad} of {err.shape[-1]} channels: a per-channel scale or statistics error?"
    return "no known pattern: compare this layer's weights and code"


@dataclass
class DiagnosisContext:
    """What a diagnosis needs: both models, their floor twins, the bound, the multiple and the floor seed."""

    keras_model: keras.Model
    torch_model: nn.Module
    keras_floor: keras.Model
    torch_floor: nn.Module
    bound: float
    multiple: float  # FLOOR_MULTIPLE of the compared dtype
    seed: int


def _named(
    stage: str,
    layer: str | None,
    hypotheses: Hypotheses,
    got: np.ndarray,
    expected: np.ndarray,
    floor: float,
    multiple: float,
) -> Diagnosis | None:
    """The first hypothesis whose signature stands out of ``floor`` and that reproduces ``got``."""
    error = max_rel_err(got, expected)
    for cause, (candidate, detail) in hypotheses.items():
        if explains(Evidence(got, expected, candidate, floor, multiple)):
            evidence = (
                f"recomputing with this bug reproduces torch's output (error {error:.3g}, noise floor {floor:.2g})"
            )
            return Diagnosis(cause, detail, evidence, stage, layer)
    return None


def _missing_layer(stage: str, keras_model: keras.Model, torch_model: nn.Module) -> Diagnosis | None:
    k_unit, t_unit = keras_model.get_layer(stage), getattr(torch_model, stage)
    for branch in ("main_layers", "skip_layers"):
        k_layers, t_layers = getattr(k_unit, branch), getattr(t_unit, branch)
        if len(k_layers) != len(t_layers):
            names = ", ".join(type(layer).__name__ for layer in k_layers)
            detail = f"{branch} has {len(k_layers)} layers in Keras ({names}) but {len(t_layers)} in torch"
            return Diagnosis(Cause.LAYER_MISSING, detail, "structure", stage, branch)
    return None


def _first_divergent_layer(stage: str, x: np.ndarray, context: DiagnosisContext) -> Diagnosis | None:
    """Walk the stage's layers on Keras's own input; diagnose the first one beyond its floor and the bound."""
    floor_twins = {path: (k, t) for path, k, t in sublayers(stage, context.keras_floor, context.torch_floor)}
    inputs: dict[str, np.ndarray] = {}  # the reference's running input per branch ("stem" is one chain)
    for path, k_layer, t_module in sublayers(stage, context.keras_model, context.torch_model):
        branch = path.split(".")[0] if "." in path else "stem"
        layer_in = inputs.setdefault(branch, x)
        expected = keras.ops.convert_to_numpy(k_layer(layer_in))
        got = run_torch(t_module, layer_in)
        error = max_rel_err(got, expected) if got.shape == expected.shape else math.inf
        if error > context.bound:
            floor_in = floor_images(layer_in, context.seed)
            k_floor, t_floor = floor_twins[path]
            scale = scale_of(expected)
            floor = scaled_distance(expected, keras.ops.convert_to_numpy(k_floor(floor_in)), scale)
            floor += scaled_distance(got, run_torch(t_floor, floor_in), scale)
            verdict = judge(error, floor, context.bound, context.multiple)
            if not verdict.ok:
                if got.shape != expected.shape:
                    detail = f"{path}: {got.shape} instead of {expected.shape}"
                    return Diagnosis(Cause.SHAPE_DIFFERS, detail, "first divergent layer", stage, path)
                hypotheses: Hypotheses = {}
                if isinstance(k_layer, keras.layers.Conv2D):
                    hypotheses = _conv_hypotheses(k_layer, layer_in, first_layer=path == "stem_conv")
                elif isinstance(k_layer, keras.layers.BatchNormalization):
                    hypotheses = _bn_hypotheses(k_layer, layer_in)
                elif isinstance(k_layer, keras.layers.MaxPooling2D):
                    hypotheses = _pool_hypotheses(k_layer, layer_in)
                named = _named(stage, path, hypotheses, got, expected, floor, context.multiple)
                return named or Diagnosis(
                    Cause.UNKNOWN,
                    _pattern(got, expected),
                    f"first divergent layer ({type(k_layer).__name__}): error {error:.3g}, {verdict.floor_ratio:.3g} x "
                    f"its noise floor {floor:.2g}; no known porting bug reproduces it",
                    stage,
                    path,
                )
        inputs[branch] = expected
    return None


def diagnose(
    stage: str, x: np.ndarray, context: DiagnosisContext, reference: np.ndarray, actual: np.ndarray, floor: float
) -> Diagnosis:
    """Why ``stage`` diverges, given Keras's input to it (NHWC), Keras's and torch's outputs, and its floor."""
    if stage.startswith("unit_"):
        missing = _missing_layer(stage, context.keras_model, context.torch_model)
        if missing is not None:
            return missing
    layer = _first_divergent_layer(stage, x, context)
    if layer is not None:
        return layer
    if stage in ("logits", "output"):
        head = context.keras_model.get_layer("classifier")
        if stage == "logits":
            hypotheses = _dense_hypotheses(head, x)
        else:
            activation = keras.activations.serialize(head.activation)
            twice = keras.ops.convert_to_numpy(head.activation(keras.ops.convert_to_tensor(reference)))
            hypotheses = {Cause.ACTIVATION_TWICE: (twice, activation), Cause.ACTIVATION_MISSING: (x, activation)}
        named = _named(stage, "classifier", hypotheses, actual, reference, floor, context.multiple)
        if named is not None:
            return named
    error = max_rel_err(actual, reference)
    return Diagnosis(
        Cause.UNKNOWN,
        _pattern(actual, reference),
        f"no single layer diverges alone; stage error {error:.3g}, noise floor {floor:.2g}",
        stage,
    )
