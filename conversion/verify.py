"""Find WHERE two implementations diverge, and why.

Each stage (stem, the 16 ResidualUnits, pooled features, logits, output) is run twice in the compared
implementation: on its own previous output (the cumulative error a user sees) and on the reference's
input to that stage (the local error, which is non-zero only where the stage itself differs). The first
stage with a local error over the tolerance is where the bug lives. Inside it the layers are compared
one by one, and the first divergent layer is tested against the classic porting bugs: each hypothesis is
recomputed from the reference's weights, and the one that reproduces the divergent output is the cause.

Every difference is judged against its noise floor (``conversion.noise_floor``): each side is run again as
its floor twin (float64 for a float32 model, one ulp apart for a float64 one), and a stage diverges only when
its error is beyond a multiple of (floor_keras + floor_torch) AND beyond the absolute bound. A cause is
named only where its signature stands out of the floor.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import keras_impl
from conversion.arrays import (
    TOLERANCE,
    check_images,
    cosine_similarity,
    max_abs_err,
    max_rel_err,
    nchw_to_nhwc,
    nhwc_to_nchw,
    seeded_images,
)
from conversion.cli import DEFAULT_BATCH, DEFAULT_SIZE
from conversion.errors import InputError
from conversion.files import load_keras, load_torch
from conversion.hostile import randomize_weights
from conversion.noise_floor import (
    Evidence,
    Judgement,
    explains,
    floor_images,
    floor_multiple,
    judge,
    keras_clone,
    keras_floor_twin,
    scale_of,
    scaled_distance,
    torch_floor_twin,
)
from conversion.structure import UNIT_COUNT
from conversion.weights import check_same_architecture, keras_to_torch, torch_to_keras
from torch_impl.padding import pad_same, same_padding

# Stage names, in order; "output" exists only when the head has an activation.
STEM_LAYERS = ("stem_conv", "stem_bn", "stem_activation", "stem_pool")
POOL_LAYERS = ("avg_pool", "flatten")
UNKNOWN_CAUSE = "beyond the noise floor, cause unknown"


@dataclass
class Comparison:
    """One implementation against the reference at one stage."""

    max_abs: float
    max_rel: float
    cosine: float
    tolerance_to_pass: float  # the smallest relative tolerance under which this stage would pass
    noise_floor: float  # floor_keras + floor_torch: what rounding alone gives here
    floor_ratio: float  # max_rel / noise_floor
    ill_conditioned: bool  # the floor itself exceeds the absolute bound
    local_max_rel: float | None  # the stage run on the reference's input; None where not computable
    local_noise_floor: float | None  # measured only where the local error exceeds the absolute bound
    local_floor_ratio: float | None
    ok: bool


@dataclass
class StageRow:
    stage: str
    shape: list[int]
    comparisons: dict[str, Comparison] = field(default_factory=dict)


@dataclass
class Diagnosis:
    stage: str
    layer: str | None
    cause: str
    evidence: str


# --- running the stages ---------------------------------------------------------------------------

Stage = tuple[str, Callable[[np.ndarray], np.ndarray]]


def _keras_stages(model: keras.Model) -> list[Stage]:
    """(name, function NHWC numpy -> numpy) for each stage of a Keras ResNet-34."""
    layer = model.get_layer

    def chain(*layers: keras.layers.Layer) -> Callable[[np.ndarray], np.ndarray]:
        def run(x: np.ndarray) -> np.ndarray:
            for each in layers:
                x = each(x)
            return keras.ops.convert_to_numpy(x)

        return run

    head = layer("classifier")
    stages = [("stem", chain(*(layer(name) for name in STEM_LAYERS)))]
    stages += [(f"unit_{i}", chain(layer(f"unit_{i}"))) for i in range(UNIT_COUNT)]
    stages.append(("pooled", chain(*(layer(name) for name in POOL_LAYERS))))
    stages.append(("logits", lambda x: keras.ops.convert_to_numpy(keras.ops.matmul(x, head.kernel) + head.bias)))
    if keras.activations.serialize(head.activation) != "linear":
        stages.append(("output", lambda x: keras.ops.convert_to_numpy(head.activation(keras.ops.convert_to_tensor(x)))))
    return stages


def _torch_stages(model: nn.Module, stage_names: Sequence[str]) -> list[Stage]:
    """The same stages for a torch ResNet34 (NHWC in and out, so the two line up)."""
    children = dict(model.named_children())

    def run_modules(*modules: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
        def run(x: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(nhwc_to_nchw(x) if x.ndim == 4 else np.ascontiguousarray(x))
            with torch.no_grad():
                for module in modules:
                    t = module(t)
            out = t.numpy()
            return nchw_to_nhwc(out) if out.ndim == 4 else out

        return run

    head = children["classifier"]
    linear = nn.Linear.forward.__get__(head)  # the Dense head without its activation
    stages = {"stem": run_modules(*(children[name] for name in STEM_LAYERS))}
    stages.update({f"unit_{i}": run_modules(children[f"unit_{i}"]) for i in range(UNIT_COUNT)})
    stages["pooled"] = run_modules(*(children[name] for name in POOL_LAYERS))
    stages["logits"] = run_modules(linear)
    stages["output"] = run_modules(head.activation)
    return [(name, stages[name]) for name in stage_names]


@dataclass
class _Sides:
    """The two implementations and their floor twins, as stage functions."""

    keras: dict[str, Callable[[np.ndarray], np.ndarray]]
    torch: dict[str, Callable[[np.ndarray], np.ndarray]]
    keras_floor: dict[str, Callable[[np.ndarray], np.ndarray]]
    torch_floor: dict[str, Callable[[np.ndarray], np.ndarray]]


def _comparison(
    actual: np.ndarray,
    reference: np.ndarray,
    noise_floor: float,
    local: tuple[float, Judgement | None] | None,
    bound: float,
    multiple: float,
) -> Comparison:
    verdict = judge(max_rel_err(actual, reference), noise_floor, bound, multiple)
    local_err, local_verdict = local if local is not None else (None, None)
    return Comparison(
        max_abs=max_abs_err(actual, reference),
        max_rel=verdict.error,
        cosine=cosine_similarity(actual, reference),
        tolerance_to_pass=verdict.error,
        noise_floor=verdict.noise_floor,
        floor_ratio=verdict.floor_ratio,
        ill_conditioned=verdict.ill_conditioned,
        local_max_rel=local_err,
        local_noise_floor=None if local_verdict is None else local_verdict.noise_floor,
        local_floor_ratio=None if local_verdict is None else local_verdict.floor_ratio,
        ok=verdict.ok,
    )


def _local(
    name: str, sides: _Sides, reference_in: np.ndarray, reference_out: np.ndarray, context: _DiagnosisContext
) -> tuple[float, Judgement | None, np.ndarray]:
    """The stage alone: torch run on Keras's own input. Its floor is measured only where the bound is exceeded."""
    local_out = sides.torch[name](reference_in)
    error = max_rel_err(local_out, reference_out)
    if error <= context.bound:
        return error, None, local_out
    floor_in = floor_images(reference_in, context.seed)
    scale = scale_of(reference_out)
    noise_floor = scaled_distance(reference_out, sides.keras_floor[name](floor_in), scale) + scaled_distance(
        local_out, sides.torch_floor[name](floor_in), scale
    )
    return error, judge(error, noise_floor, context.bound, context.multiple), local_out


# --- diagnosis --------------------------------------------------------------------------------------


def _as_torch(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(nhwc_to_nchw(x_nhwc))


def _conv_hypotheses(layer: keras.layers.Conv2D, x: np.ndarray, first_layer: bool) -> dict[str, np.ndarray]:
    kernel = torch.from_numpy(np.ascontiguousarray(keras.ops.convert_to_numpy(layer.kernel).transpose(3, 2, 0, 1)))
    k, s = layer.kernel_size[0], layer.strides[0]
    xt = _as_torch(x)
    out = {
        f"symmetric padding ({k // 2}, {k // 2}) where TF 'same' pads {same_padding(x.shape[1], k, s)} "
        f"(a {k}x{k}/{s} conv ported with padding=k//2)": F.conv2d(xt, kernel, stride=s, padding=k // 2),
        "conv kernel with H and W swapped (HWIO -> OIHW transposed as (3, 2, 1, 0))": F.conv2d(
            pad_same(xt, k, s), kernel.transpose(2, 3), stride=s
        ),
    }
    if first_layer:  # NHWC memory read as NCHW: the first layer sees scrambled pixels
        misread = torch.from_numpy(np.ascontiguousarray(x)).reshape(x.shape[0], x.shape[3], x.shape[1], x.shape[2])
        out["layout mix-up: NHWC images fed as NCHW (reshaped, not transposed)"] = F.conv2d(
            pad_same(misread, k, s), kernel, stride=s
        )
    return {cause: nchw_to_nhwc(t.numpy()) for cause, t in out.items()}


def _bn_hypotheses(layer: keras.layers.BatchNormalization, x: np.ndarray) -> dict[str, np.ndarray]:
    gamma, beta, mean, var = (
        keras.ops.convert_to_numpy(v) for v in (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)
    )
    with np.errstate(invalid="ignore"):
        return {
            f"BatchNorm epsilon 1e-5 (PyTorch's default) instead of Keras's {layer.epsilon:g}": gamma
            * (x - mean)
            / np.sqrt(var + 1e-5)
            + beta,
            "BatchNorm running mean and variance swapped": gamma * (x - var) / np.sqrt(mean + layer.epsilon) + beta,
        }


def _dense_hypotheses(layer: keras.layers.Dense, x: np.ndarray) -> dict[str, np.ndarray]:
    kernel, bias = keras.ops.convert_to_numpy(layer.kernel), keras.ops.convert_to_numpy(layer.bias)
    if kernel.shape[0] != kernel.shape[1]:
        return {}
    return {"Dense kernel not transposed ((in, out) copied as (out, in))": x @ kernel.T + bias}


def _pool_hypotheses(layer: keras.layers.MaxPooling2D, x: np.ndarray) -> dict[str, np.ndarray]:
    k, s = layer.pool_size[0], layer.strides[0]
    padded = pad_same(_as_torch(x), k, s, value=0.0)
    return {"max-pool padded with zeros instead of -inf": nchw_to_nhwc(F.max_pool2d(padded, k, s).numpy())}


def _pattern(actual: np.ndarray, reference: np.ndarray) -> str:
    """What the error looks like, where no hypothesis reproduced the output (a hint, not a cause)."""
    if not np.all(np.isfinite(actual)):
        return "non-finite values (NaN/Inf) appear here"
    err = np.abs(np.asarray(actual, np.float64) - reference)
    if err.ndim == 4 and min(err.shape[1:3]) > 2:
        border = np.concatenate([err[:, -1].ravel(), err[:, :, -1].ravel()])
        if border.max() > 0 and err[:, :-1, :-1].max() < 0.05 * border.max():
            return "error concentrated on the bottom/right border: a padding difference"
    if err.ndim >= 2:
        per_channel = err.reshape(-1, err.shape[-1]).max(axis=0)
        if (per_channel > 0.01 * per_channel.max()).mean() < 0.5:
            bad = int((per_channel > 0.01 * per_channel.max()).sum())
            return f"error confined to {bad} of {err.shape[-1]} channels: a per-channel scale or statistics error"
    return "no known pattern: compare this layer's weights and code"


def _sublayers(stage: str, keras_model: keras.Model, torch_model: nn.Module) -> list[tuple[str, object, object]]:
    """(path, keras layer, torch module) pairs in forward order inside one stage."""
    if stage == "stem":
        return [(n, keras_model.get_layer(n), getattr(torch_model, n)) for n in STEM_LAYERS]
    if stage.startswith("unit_"):
        k_unit, t_unit = keras_model.get_layer(stage), getattr(torch_model, stage)
        return [
            (f"{branch}.{i}", k_layer, t_layers[i] if i < len(t_layers) else None)
            for branch in ("main_layers", "skip_layers")
            for t_layers in [getattr(t_unit, branch)]
            for i, k_layer in enumerate(getattr(k_unit, branch))
        ]
    return []


def _run_torch_layer(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = module(_as_torch(x) if x.ndim == 4 else torch.from_numpy(x)).numpy()
    return nchw_to_nhwc(out) if out.ndim == 4 else out


@dataclass
class _DiagnosisContext:
    """What a diagnosis needs: both models, their floor twins, the absolute bound and the floor images' seed."""

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
    hypotheses: dict[str, np.ndarray],
    got: np.ndarray,
    expected: np.ndarray,
    floor: float,
    multiple: float,
) -> Diagnosis | None:
    """The first hypothesis whose signature stands out of ``floor`` and reproduces ``got``, as a Diagnosis."""
    error = max_rel_err(got, expected)
    for cause, candidate in hypotheses.items():
        if explains(Evidence(got, expected, candidate, floor, multiple)):
            return Diagnosis(
                stage,
                layer,
                cause,
                f"recomputing with this bug reproduces torch's output (error {error:.3g}, noise floor {floor:.2g})",
            )
    return None


def _diagnose(
    stage: str, x: np.ndarray, context: _DiagnosisContext, reference: np.ndarray, actual: np.ndarray, floor: float
) -> Diagnosis:
    """Why ``stage`` diverges, given its reference input ``x`` (NHWC) and the stage's noise floor."""
    keras_model, torch_model = context.keras_model, context.torch_model
    if stage.startswith("unit_"):
        k_unit, t_unit = keras_model.get_layer(stage), getattr(torch_model, stage)
        for branch in ("main_layers", "skip_layers"):
            k_layers, t_layers = getattr(k_unit, branch), getattr(t_unit, branch)
            if len(k_layers) != len(t_layers):
                names = ", ".join(type(layer).__name__ for layer in k_layers)
                return Diagnosis(
                    stage,
                    branch,
                    f"{branch} has {len(k_layers)} layers in Keras ({names}) but "
                    f"{len(t_layers)} in torch: a layer is missing (e.g. a projection without its "
                    "BatchNorm)",
                    "structure",
                )
    floor_pairs = {
        path: (k_floor, t_floor)
        for path, k_floor, t_floor in _sublayers(stage, context.keras_floor, context.torch_floor)
    }
    inputs: dict[str, np.ndarray] = {}  # the reference's running input per branch ("stem" is one chain)
    for path, k_layer, t_module in _sublayers(stage, keras_model, torch_model):
        branch = path.split(".")[0] if "." in path else "stem"
        layer_in = inputs.setdefault(branch, x)
        expected = keras.ops.convert_to_numpy(k_layer(layer_in))
        got = _run_torch_layer(t_module, layer_in)
        err = max_rel_err(got, expected) if got.shape == expected.shape else math.inf
        if err > context.bound:
            floor_in = floor_images(layer_in, context.seed)
            k_floor, t_floor = floor_pairs[path]
            scale = scale_of(expected)
            layer_floor = scaled_distance(expected, keras.ops.convert_to_numpy(k_floor(floor_in)), scale)
            layer_floor += scaled_distance(got, _run_torch_layer(t_floor, floor_in), scale)
            verdict = judge(err, layer_floor, context.bound, context.multiple)
            if not verdict.ok:
                hypotheses: dict[str, np.ndarray] = {}
                if isinstance(k_layer, keras.layers.Conv2D):
                    hypotheses = _conv_hypotheses(k_layer, layer_in, first_layer=path == "stem_conv")
                elif isinstance(k_layer, keras.layers.BatchNormalization):
                    hypotheses = _bn_hypotheses(k_layer, layer_in)
                elif isinstance(k_layer, keras.layers.MaxPooling2D):
                    hypotheses = _pool_hypotheses(k_layer, layer_in)
                named = _named(stage, path, hypotheses, got, expected, layer_floor, context.multiple)
                if named is not None:
                    return named
                hint = (
                    _pattern(got, expected)
                    if got.shape == expected.shape
                    else (f"output shape {got.shape} instead of {expected.shape}")
                )
                return Diagnosis(
                    stage,
                    path,
                    f"{UNKNOWN_CAUSE} ({hint})",
                    f"first divergent layer ({type(k_layer).__name__}): error {err:.3g}, {verdict.floor_ratio:.3g} x "
                    f"its noise floor {layer_floor:.2g}; no known porting bug reproduces it",
                )
        inputs[branch] = expected
    if stage in ("logits", "output"):
        head = keras_model.get_layer("classifier")
        if stage == "logits":
            named = _named(stage, "classifier", _dense_hypotheses(head, x), actual, reference, floor, context.multiple)
        else:
            activation = keras.activations.serialize(head.activation)
            twice = keras.ops.convert_to_numpy(head.activation(keras.ops.convert_to_tensor(reference)))
            named = _named(
                stage,
                "classifier",
                {
                    f"classifier activation ({activation}) applied twice": twice,
                    f"classifier activation ({activation}) missing": x,
                },
                actual,
                reference,
                floor,
                context.multiple,
            )
        if named is not None:
            return named
    error = max_rel_err(actual, reference)
    return Diagnosis(
        stage,
        None,
        f"{UNKNOWN_CAUSE} ({_pattern(actual, reference)})",
        f"no single layer diverges alone; stage error {error:.3g}, noise floor {floor:.2g}",
    )


# --- training-mode check ----------------------------------------------------------------------------


def _bn_pairs(keras_model: keras.Model, torch_model: nn.Module) -> list[tuple[str, object, nn.BatchNorm2d]]:
    pairs = [("stem_bn", keras_model.get_layer("stem_bn"), torch_model.stem_bn)]
    for i in range(UNIT_COUNT):
        k_unit, t_unit = keras_model.get_layer(f"unit_{i}"), getattr(torch_model, f"unit_{i}")
        for branch in ("main_layers", "skip_layers"):
            for j, (k_layer, t_layer) in enumerate(zip(getattr(k_unit, branch), getattr(t_unit, branch), strict=False)):
                if isinstance(k_layer, keras.layers.BatchNormalization) and isinstance(t_layer, nn.BatchNorm2d):
                    pairs.append((f"unit_{i}.{branch}.{j}", k_layer, t_layer))
    return pairs


@contextlib.contextmanager
def restored_batchnorm_statistics(keras_model: keras.Model) -> Iterator[None]:
    """Put every BatchNorm moving statistic of ``keras_model`` back as it was once the block ends
    (a training-mode call updates them all, paired with torch or not)."""
    layers = [layer for layer in keras_model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [
        (keras.ops.convert_to_numpy(bn.moving_mean), keras.ops.convert_to_numpy(bn.moving_variance)) for bn in layers
    ]
    try:
        yield
    finally:
        for bn, (mean, variance) in zip(layers, saved, strict=True):
            bn.moving_mean.assign(mean)
            bn.moving_variance.assign(variance)


def _model_dtype(keras_model: keras.Model) -> str:
    return keras.backend.standardize_dtype(keras_model.weights[0].dtype)


def _statistics(pairs: list[tuple[str, object, nn.BatchNorm2d]], side: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """path -> (moving mean, moving variance) of one side's paired BatchNorms."""
    if side == "keras":
        return {
            path: (keras.ops.convert_to_numpy(k.moving_mean), keras.ops.convert_to_numpy(k.moving_variance))
            for path, k, _ in pairs
        }
    return {path: (t.running_mean.numpy().copy(), t.running_var.numpy().copy()) for path, _, t in pairs}


def _train_forward(keras_model: keras.Model, torch_model: nn.Module, images: np.ndarray) -> tuple[dict, dict, dict]:
    """One training-mode forward in each (Keras restored, torch on a copy): Keras's statistics, torch's, and
    the number of values each torch BatchNorm averaged (n of Bessel's n / (n - 1))."""
    with restored_batchnorm_statistics(keras_model):
        keras_model(images, training=True)
        keras_stats = _statistics(_bn_pairs(keras_model, torch_model), "keras")
    twin = copy.deepcopy(torch_model).train()
    pairs = _bn_pairs(keras_model, twin)
    values_per_channel: dict[str, int] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda _, args, path=path: values_per_channel.__setitem__(path, args[0].numel() // args[0].shape[1])
        )
        for path, _, module in pairs
    ]
    with torch.no_grad():
        twin(torch.from_numpy(nhwc_to_nchw(images)))
    for hook in hooks:
        hook.remove()
    return keras_stats, _statistics(pairs, "torch"), values_per_channel


def training_check(
    keras_model: keras.Model,
    torch_model: nn.Module,
    images: np.ndarray,
    tolerance: float,
    *,
    keras_floor: keras.Model | None = None,
    torch_floor: nn.Module | None = None,
    seed: int = 0,
) -> dict:
    """One training-mode forward in each: are the BatchNorm moving statistics updated the same way?

    Both the means and the variances are compared, each against its noise floor (the floor twins' own
    training-mode forward on the floor images): the twin's BatchNorm stores the biased batch variance, as
    Keras does; torch's own ``nn.BatchNorm2d`` stores the unbiased one, which is named only where the ratio
    n / (n - 1) shows beyond the floor. Neither model is changed: Keras's statistics are restored and torch
    runs on a copy.
    """
    multiple = floor_multiple(_model_dtype(keras_model))
    keras_floor = keras_floor_twin(keras_model, seed) if keras_floor is None else keras_floor
    torch_floor = torch_floor_twin(torch_model, seed) if torch_floor is None else torch_floor
    pairs = _bn_pairs(keras_model, torch_model)
    old = _statistics(pairs, "keras")
    new, got, values_per_channel = _train_forward(keras_model, torch_model, images)
    new_floor, got_floor, _ = _train_forward(keras_floor, torch_floor, floor_images(images, seed))
    worst = {"max_rel": 0.0, "noise_floor": 0.0, "floor_ratio": 0.0}
    ill_conditioned = []
    for path, k_layer, _ in pairs:
        k = float(k_layer.momentum)
        verdicts, floors = [], []
        for index in (0, 1):  # mean, variance
            scale = scale_of(new[path][index])
            floor = scaled_distance(new[path][index], new_floor[path][index], scale)
            floor += scaled_distance(got[path][index], got_floor[path][index], scale)
            floors.append(floor)
            error = scaled_distance(got[path][index], new[path][index], scale)
            verdicts.append(judge(error, floor, tolerance, multiple))
        if any(v.ill_conditioned for v in verdicts):
            ill_conditioned.append(path)
        worst["max_rel"] = max(worst["max_rel"], *(v.error for v in verdicts))
        verdict = max(verdicts, key=lambda v: (not v.ok, v.floor_ratio))
        if verdict.floor_ratio >= worst["floor_ratio"]:
            worst |= {"noise_floor": verdict.noise_floor, "floor_ratio": verdict.floor_ratio}
        if all(v.ok for v in verdicts):
            continue
        (old_mean, old_var), (new_mean, new_var) = old[path], new[path]
        batch_mean, batch_var = (new_mean - k * old_mean) / (1 - k), (new_var - k * old_var) / (1 - k)
        n = values_per_channel[path]
        causes = {
            "BatchNorm momentum convention inverted (torch momentum must be 1 - Keras momentum)": (
                k * batch_mean + (1 - k) * old_mean,
                k * batch_var + (1 - k) * old_var,
            ),
        }
        if n > 1:
            causes[
                f"running variance updated with the unbiased batch variance (torch's nn.BatchNorm2d, factor n/(n-1) "
                f"= {n}/{n - 1}); Keras stores the biased one"
            ] = (new_mean, k * old_var + (1 - k) * batch_var * n / (n - 1))
        cause = next(
            (
                c
                for c, (m, v) in causes.items()
                if explains(
                    Evidence(got[path][0], new_mean, m, floors[0], multiple),
                    Evidence(got[path][1], new_var, v, floors[1], multiple),
                )
            ),
            f"{UNKNOWN_CAUSE}: moving statistics updated differently (max rel err {verdict.error:.3g}, "
            f"{verdict.floor_ratio:.3g} x the noise floor {verdict.noise_floor:.2g})",
        )
        return {
            "ok": False,
            "skipped": None,
            "first_divergent_layer": path,
            "max_rel": verdict.error,
            "noise_floor": verdict.noise_floor,
            "floor_ratio": verdict.floor_ratio,
            "ill_conditioned": ill_conditioned,
            "cause": cause,
        }
    return {
        "ok": True,
        "skipped": None,
        "first_divergent_layer": None,
        **worst,
        "ill_conditioned": ill_conditioned,
        "cause": None,
    }


# --- the report -------------------------------------------------------------------------------------


def verify_models(
    keras_model: keras.Model,
    torch_model: nn.Module | None,
    images: np.ndarray,
    *,
    onnx_path: str | Path | None = None,
    train_check: bool = True,
    seed: int = 0,
) -> dict:
    """Compare the torch twin (and an ONNX file) with the Keras model stage by stage; returns the report.

    Every stage is judged against its noise floor: ``seed`` draws the one-ulp moves of a float64 floor twin.
    """
    dtype = _model_dtype(keras_model)
    tolerance = TOLERANCE.get(dtype, TOLERANCE["float32"])
    keras_floor = keras_floor_twin(keras_model, seed)
    keras_stages = _keras_stages(keras_model)
    names = [name for name, _ in keras_stages]
    sides = _Sides(dict(keras_stages), {}, dict(_keras_stages(keras_floor)), {})
    torch_floor = None
    if torch_model is not None:
        torch_floor = torch_floor_twin(torch_model, seed)
        sides.torch = dict(_torch_stages(torch_model, names))
        sides.torch_floor = dict(_torch_stages(torch_floor, names))
    multiple = floor_multiple(dtype)
    context = _DiagnosisContext(keras_model, torch_model, keras_floor, torch_floor, tolerance, multiple, seed)
    rows: list[StageRow] = []
    reference_in, torch_in = images, images
    keras_floor_in = torch_floor_in = floor_images(images, seed)
    first_stage = first_cumulative = None
    diagnosis = None
    last_floor = {"keras": 0.0, "torch": 0.0}
    for name in names:
        reference_out = sides.keras[name](reference_in)
        keras_floor_out = sides.keras_floor[name](keras_floor_in)
        scale = scale_of(reference_out)
        last_floor["keras"] = scaled_distance(reference_out, keras_floor_out, scale)
        row = StageRow(name, list(reference_out.shape))
        if torch_model is not None:
            torch_out = sides.torch[name](torch_in)
            torch_floor_out = sides.torch_floor[name](torch_floor_in)
            last_floor["torch"] = scaled_distance(torch_out, torch_floor_out, scale)
            local_err, local_verdict, local_out = _local(name, sides, reference_in, reference_out, context)
            floor = last_floor["keras"] + last_floor["torch"]
            comparison = _comparison(torch_out, reference_out, floor, (local_err, local_verdict), tolerance, multiple)
            row.comparisons["torch"] = comparison
            if first_cumulative is None and not comparison.ok:
                first_cumulative = name
            if first_stage is None and local_verdict is not None and not local_verdict.ok:
                first_stage = name
                diagnosis = _diagnose(name, reference_in, context, reference_out, local_out, local_verdict.noise_floor)
            torch_in, torch_floor_in = torch_out, torch_floor_out
        rows.append(row)
        reference_in, keras_floor_in = reference_out, keras_floor_out
    if onnx_path is not None:
        from conversion.onnx_export import run_onnx

        onnx_out = run_onnx(onnx_path, images)
        # ONNX Runtime computes in float32: judged against this stage's float32 floor (both twins', or
        # twice Keras's where no torch model is compared).
        floor = last_floor["keras"] + (last_floor["torch"] if torch_model is not None else last_floor["keras"])
        rows[-1].comparisons["onnx"] = _comparison(onnx_out, reference_in, floor, None, tolerance, multiple)
    if first_stage is None and first_cumulative is not None:
        first_stage = first_cumulative
        diagnosis = Diagnosis(
            first_cumulative,
            None,
            f"{UNKNOWN_CAUSE}: no stage diverges on its own (accumulated error)",
            "every stage's local error is within its noise floor",
        )
    training = None
    if torch_model is not None and train_check:
        smallest = min(int(np.prod(row.shape[:3])) for row in rows if row.stage.startswith("unit_"))
        if smallest < 2:  # torch refuses batch statistics of a single value per channel
            training = {
                "ok": True,
                "skipped": f"the last units see {smallest} value per channel; use a larger batch or size",
                "first_divergent_layer": None,
                "max_rel": None,
                "noise_floor": None,
                "floor_ratio": None,
                "ill_conditioned": [],
                "cause": None,
            }
        else:
            training = training_check(
                keras_model, torch_model, images, tolerance, keras_floor=keras_floor, torch_floor=torch_floor, seed=seed
            )
    agree = all(c.ok for row in rows for c in row.comparisons.values()) and (training is None or training["ok"])
    if first_stage is None and training and not training["ok"]:
        # The forward pass agrees; only training mode shows it (e.g. an inverted BatchNorm momentum).
        first_stage = training["first_divergent_layer"].split(".")[0]
        layer = training["first_divergent_layer"].partition(".")[2] or None
        diagnosis = Diagnosis(first_stage, layer, training["cause"], "one training-mode forward in each")
    first_unit = int(first_stage.split("_")[1]) if first_stage and first_stage.startswith("unit_") else None
    return {
        "agree": agree,
        "reference": "keras",
        "compared": sorted({key for row in rows for key in row.comparisons}),
        "dtype": dtype,
        "tolerance": tolerance,
        "floor_multiple": multiple,
        "metric": "max |x - keras| / max |keras| per stage",
        "noise_floor_method": (
            "each side against its float64 twin (same weights and images in float64)"
            if dtype == "float32"
            else "each side against its twin with every weight and image element one ulp apart"
        ),
        "batch": int(images.shape[0]),
        "size": [int(images.shape[1]), int(images.shape[2])],
        "first_divergent_stage": first_stage,
        "first_divergent_unit": first_unit,
        "diagnosis": asdict(diagnosis) if diagnosis else None,
        "training_check": training,
        "stages": [
            {"stage": row.stage, "shape": row.shape, **{k: asdict(v) for k, v in row.comparisons.items()}}
            for row in rows
        ],
    }


# --- the command --------------------------------------------------------------------------------------


def _cast_for_comparison(keras_model: keras.Model, torch_model: nn.Module | None, dtype: str | None):
    """The pair in ``dtype`` (weights cast, exactly when widening); the pair itself where it already is."""
    if dtype is None or _model_dtype(keras_model) == dtype:
        return keras_model, torch_model
    if dtype != "float64":
        raise InputError(f"--dtype {dtype}: a file's weights are cast only to float64 (widening is exact)")
    return keras_clone(keras_model, dtype), None if torch_model is None else copy.deepcopy(torch_model).double()


def _load_pair(args: argparse.Namespace) -> tuple[keras.Model, nn.Module | None, keras.Model | None, str | None]:
    """The Keras reference, the torch twin, the user's own Keras model where it is not the reference, and what
    was cast (None when the files are compared in their own dtype)."""
    if args.keras:
        source = load_keras(args.keras, args.classifier_activation)
        # Any Keras ResNet-34 (the book's own included) rebuilt bit for bit in build_resnet34's layout, whose
        # layer names the per-stage report uses; the twin it was rebuilt from is the torch side.
        twin = keras_to_torch(source)
        keras_model = torch_to_keras(twin, tuple(source.input_shape[1:]))
        torch_model = twin
        if args.torch:
            # A .pt does not record its head's activation: the Keras model's is the right default.
            head = keras.activations.serialize(keras_model.get_layer("classifier").activation)
            torch_model = load_torch(args.torch, head)
            check_same_architecture(keras_model, torch_model)  # one-line error naming the layer and both values
        return _with_dtype(keras_model, torch_model, source, args.dtype)
    if args.torch:
        torch_model = load_torch(args.torch, args.classifier_activation)
        keras_model = torch_to_keras(torch_model, (None, None, torch_model.in_channels))
        return _with_dtype(keras_model, torch_model, None, args.dtype)
    if args.onnx:
        raise InputError("--onnx needs --keras or --torch: the weights the ONNX file was exported from")
    keras_model = keras_impl.build_resnet34(10, (None, None, 3), args.classifier_activation, args.dtype or "float32")
    randomize_weights(keras_model, args.seed)
    return keras_model, keras_to_torch(keras_model), None, None


def _with_dtype(keras_model, torch_model, source, dtype: str | None):
    stored = _model_dtype(keras_model)
    if dtype is None or dtype == stored:
        return keras_model, torch_model, source, None
    keras_model, torch_model = _cast_for_comparison(keras_model, torch_model, dtype)
    if source is not None:
        source = keras_clone(source, dtype)
    return keras_model, torch_model, source, f"the files' {stored} weights cast to {dtype} for the comparison"


def source_check(source: keras.Model, reference: keras.Model, images: np.ndarray) -> dict:
    """The user's own Keras model (its own forward, its own code) against the rebuilt reference."""
    tolerance = TOLERANCE.get(_model_dtype(reference), TOLERANCE["float32"])
    err = max_rel_err(keras.ops.convert_to_numpy(source(images)), keras.ops.convert_to_numpy(reference(images)))
    return {"max_rel": err, "tolerance": tolerance, "ok": err <= tolerance}


def _images(args: argparse.Namespace, keras_model: keras.Model) -> np.ndarray:
    dtype = _model_dtype(keras_model)
    _, height, width, channels = keras_model.input_shape
    if args.images:
        try:
            images = np.load(args.images, allow_pickle=False)  # never unpickle
        except (OSError, ValueError) as error:
            raise InputError(f"{args.images}: not a readable .npy array of images ({error})") from None
        images = check_images(images, channels)
        if images.dtype != dtype:
            if images.dtype == np.float64:
                raise InputError(f"expected {dtype} images for a {dtype} model; received {images.dtype}")
            images = images.astype(dtype)  # float32 images for a float64 comparison: widening is exact
    else:
        batch, size = args.batch or DEFAULT_BATCH, args.size or DEFAULT_SIZE
        images = seeded_images(batch, *size, channels, seed=args.seed + 1, dtype=dtype)
    if (height, width) != (None, None) and images.shape[1:3] != (height, width):
        raise InputError(f"the Keras model takes {height}x{width} images; received {images.shape[1]}x{images.shape[2]}")
    return images


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cast = f", {report['cast']}" if report.get("cast") else ""
    table = Table(
        title=f"Per-stage error against Keras ({report['dtype']}{cast}, bound {report['tolerance']:g} or "
        f"{report['floor_multiple']:g} x the noise floor, batch {report['batch']}, "
        f"{report['size'][0]}x{report['size'][1]})"
    )
    for column in ("stage", "vs", "max abs", "max rel", "floor", "ratio", "1 - cos", "local rel", ""):
        table.add_column(column, justify="left" if column in ("stage", "vs") else "right")
    for row in report["stages"]:
        for who in ("torch", "onnx"):
            c = row.get(who)
            if c:
                local = "" if c["local_max_rel"] is None else f"{c['local_max_rel']:.2e}"
                verdict = "ok" if c["ok"] else "[red]DIVERGES[/red]"
                if c["ill_conditioned"]:
                    verdict += " [yellow](ill-conditioned)[/yellow]"
                table.add_row(
                    row["stage"],
                    who,
                    f"{c['max_abs']:.2e}",
                    f"{c['max_rel']:.2e}",
                    f"{c['noise_floor']:.1e}",
                    f"{c['floor_ratio']:.2g}",
                    f"{1 - c['cosine']:.2e}",
                    local,
                    verdict,
                )
    console = Console()
    console.print(table)
    source = report.get("source_check")
    if source:
        verdict = "ok" if source["ok"] else "[red]differs[/red]"
        console.print(f"the file's own model against its rebuilt twin: max rel err {source['max_rel']:.2e} ({verdict})")
    training = report["training_check"]
    if training:
        if training["ok"] and training["skipped"]:
            console.print(f"training-mode BatchNorm update: skipped ({training['skipped']})")
        elif training["ok"]:
            ill = training["ill_conditioned"]
            console.print(
                f"training-mode BatchNorm update: ok (worst max rel err {training['max_rel']:.2e}; worst ratio to "
                f"the noise floor {training['floor_ratio']:.2g}"
                + (f"; ill-conditioned, rounding alone over the bound: {', '.join(ill)}" if ill else "")
                + ")"
            )
        else:
            console.print(
                f"training-mode BatchNorm update: [red]differs[/red] at {training['first_divergent_layer']}: "
                f"{training['cause']}"
            )
    if report["agree"]:
        worst = max(c["max_rel"] for row in report["stages"] for k, c in row.items() if k in ("torch", "onnx"))
        ratio = max(c["floor_ratio"] for row in report["stages"] for k, c in row.items() if k in ("torch", "onnx"))
        console.print(
            f"[green]AGREE[/green]: {', '.join(report['compared'])} match Keras at every stage; "
            f"worst max relative error {worst:.2e} (bound {report['tolerance']:g}), worst ratio to the noise floor "
            f"{ratio:.2g} (limit {report['floor_multiple']:g})"
        )
    else:
        d = report["diagnosis"] or {}
        unit = report["first_divergent_unit"]
        where = report["first_divergent_stage"] or (training or {}).get("first_divergent_layer")
        console.print(
            f"[red]DISAGREE[/red]: first divergent stage {where}"
            + (f" (ResidualUnit {unit})" if unit is not None else "")
            + (f", layer {d['layer']}" if d.get("layer") else "")
            + (f": likely cause: {d['cause']}" if d.get("cause") else "")
        )


def run_verify_command(args: argparse.Namespace) -> int:
    """``resnet34-parity verify``: 0 when all agree, 1 when not (bad input raises UserInputError)."""
    from rich.console import Console

    with Console(stderr=True).status("building and comparing the models...", spinner="dots"):
        keras_model, torch_model, source, cast = _load_pair(args)
        if args.onnx and _model_dtype(keras_model) != "float32":
            raise InputError("--onnx compares a float32 ONNX file; run it with --dtype float32")
        images = _images(args, keras_model)
        report = verify_models(keras_model, torch_model, images, onnx_path=args.onnx, seed=args.seed)
        report["cast"] = cast
        if source is not None:
            report["source_check"] = source_check(source, keras_model, images)
            report["agree"] = report["agree"] and report["source_check"]["ok"]
    if args.json:
        json.dump(report, sys.stdout, indent=2, allow_nan=True)
        print()
    else:
        _print_table(report)
    return 0 if report["agree"] else 1
