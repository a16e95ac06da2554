"""Find WHERE two implementations diverge at inference, and why.

Each stage (stem, the 16 ResidualUnits, pooled features, logits, output) is run twice in the compared
implementation: on its own previous output (the cumulative error a user sees) and on the reference's input to
that stage (the local error, which is non-zero only where the stage itself differs). Every difference is judged
against its noise floor (``noise_floor``): each side is also run as its floor twin, and a stage diverges only when
its error is beyond a multiple of (floor_keras + floor_torch) AND beyond the absolute bound. The first stage whose
local error diverges is where the bug lives; ``diagnosis`` names it where its signature stands out of the floor.
A training-mode forward then checks that BatchNorm moving statistics update alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import torch
from torch import nn

from conversion.arrays import TOLERANCE, cosine_similarity, max_abs_err, max_rel_err, nhwc_to_nchw
from conversion.verify.causes import Cause
from conversion.verify.diagnosis import DiagnosisContext, diagnose
from conversion.verify.noise_floor import (
    Evidence,
    Judgement,
    explains,
    floor_images,
    floor_multiple,
    judge,
    keras_floor_twin,
    release_clone,
    scale_of,
    scaled_distance,
    torch_floor_twin,
)
from conversion.verify.report import BatchNormCheck, Diagnosis, SourceCheck, StageComparison, StageRow, VerifyReport
from conversion.verify.stages import (
    StageFunction,
    batchnorm_pairs,
    keras_stages,
    model_dtype,
    restored_batchnorm_statistics,
    restored_torch_state,
    torch_stages,
)


@dataclass
class _Sides:
    """The two implementations and their floor twins, as stage functions."""

    keras: dict[str, StageFunction]
    torch: dict[str, StageFunction]
    keras_floor: dict[str, StageFunction]
    torch_floor: dict[str, StageFunction]


def _comparison(
    actual: np.ndarray,
    reference: np.ndarray,
    noise_floor: float,
    local: tuple[float | None, Judgement | None],
    bound: float,
    multiple: float,
) -> StageComparison:
    verdict = judge(max_rel_err(actual, reference), noise_floor, bound, multiple)
    local_err, local_verdict = local
    return StageComparison(
        max_abs=max_abs_err(actual, reference),
        max_rel=verdict.error,
        cosine=cosine_similarity(actual, reference),
        noise_floor=verdict.noise_floor,
        floor_ratio=verdict.floor_ratio,
        ill_conditioned=verdict.ill_conditioned,
        local_max_rel=local_err,
        local_noise_floor=None if local_verdict is None else local_verdict.noise_floor,
        local_floor_ratio=None if local_verdict is None else local_verdict.floor_ratio,
        ok=verdict.ok,
    )


def _local(
    name: str, sides: _Sides, reference_in: np.ndarray, reference_out: np.ndarray, context: DiagnosisContext
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


# --- training-mode check ----------------------------------------------------------------------------


def _statistics(pairs: list[tuple[str, object, nn.BatchNorm2d]], side: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """path -> (moving mean, moving variance) of one side's paired BatchNorms."""
    if side == "keras":
        return {
            path: (keras.ops.convert_to_numpy(k.moving_mean), keras.ops.convert_to_numpy(k.moving_variance))
            for path, k, _ in pairs
        }
    return {path: (t.running_mean.numpy().copy(), t.running_var.numpy().copy()) for path, _, t in pairs}


def _train_forward(keras_model: keras.Model, torch_model: nn.Module, images: np.ndarray) -> tuple[dict, dict, dict]:
    """One training-mode forward in each (both restored after): Keras's statistics, torch's, and the number of
    values each torch BatchNorm averaged (n of Bessel's n / (n - 1))."""
    with restored_batchnorm_statistics(keras_model):
        keras_model(images, training=True)
        keras_stats = _statistics(batchnorm_pairs(keras_model, torch_model), "keras")
    pairs = batchnorm_pairs(keras_model, torch_model)
    values_per_channel: dict[str, int] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda _, args, path=path: values_per_channel.__setitem__(path, args[0].numel() // args[0].shape[1])
        )
        for path, _, module in pairs
    ]
    try:
        with restored_torch_state(torch_model), torch.no_grad():
            torch_model.train()
            torch_model(torch.from_numpy(nhwc_to_nchw(images)))
            torch_stats = _statistics(pairs, "torch")  # copies, read before the statistics are put back
    finally:
        for hook in hooks:
            hook.remove()
    return keras_stats, torch_stats, values_per_channel


def training_check(
    keras_model: keras.Model,
    torch_model: nn.Module,
    images: np.ndarray,
    tolerance: float,
    *,
    keras_floor: keras.Model | None = None,
    torch_floor: nn.Module | None = None,
    seed: int = 0,
) -> BatchNormCheck:
    """One training-mode forward in each: are the BatchNorm moving statistics updated the same way?

    Both the means and the variances are compared, each against its noise floor (the floor twins' own
    training-mode forward on the floor images): the twin's BatchNorm stores the biased batch variance, as
    Keras does; torch's own ``nn.BatchNorm2d`` stores the unbiased one, which is named only where the ratio
    n / (n - 1) shows beyond the floor. Neither model is changed: both sides' statistics (and torch's modes) are
    put back.
    """
    if keras_floor is None:
        keras_floor = keras_floor_twin(keras_model, seed)
        try:
            return training_check(
                keras_model, torch_model, images, tolerance, keras_floor=keras_floor, torch_floor=torch_floor, seed=seed
            )
        finally:
            release_clone(keras_floor)  # built here, used only here
    multiple = floor_multiple(model_dtype(keras_model))
    torch_floor = torch_floor_twin(torch_model, seed) if torch_floor is None else torch_floor
    pairs = batchnorm_pairs(keras_model, torch_model)
    old = _statistics(pairs, "keras")
    new, got, values_per_channel = _train_forward(keras_model, torch_model, images)
    new_floor, got_floor, _ = _train_forward(keras_floor, torch_floor, floor_images(images, seed))
    worst_error, worst_verdict, ill_conditioned = 0.0, None, []
    for path, k_layer, _ in pairs:
        verdicts, floors = [], []
        for index in (0, 1):  # mean, variance
            scale = scale_of(new[path][index])
            floor = scaled_distance(new[path][index], new_floor[path][index], scale)
            floor += scaled_distance(got[path][index], got_floor[path][index], scale)
            floors.append(floor)
            verdicts.append(
                judge(scaled_distance(got[path][index], new[path][index], scale), floor, tolerance, multiple)
            )
        if any(v.ill_conditioned for v in verdicts):
            ill_conditioned.append(path)
        worst_error = max(worst_error, *(v.error for v in verdicts))
        verdict = max(verdicts, key=lambda v: (not v.ok, v.floor_ratio))
        if worst_verdict is None or (not verdict.ok, verdict.floor_ratio) >= (
            not worst_verdict.ok,
            worst_verdict.floor_ratio,
        ):
            worst_verdict = verdict
        if all(v.ok for v in verdicts):
            continue
        k = float(k_layer.momentum)
        (old_mean, old_var), (new_mean, new_var) = old[path], new[path]
        batch_mean, batch_var = (new_mean - k * old_mean) / (1 - k), (new_var - k * old_var) / (1 - k)
        n = values_per_channel[path]
        hypotheses = {
            Cause.BN_MOMENTUM_UNCONVERTED: (
                (k * batch_mean + (1 - k) * old_mean, k * batch_var + (1 - k) * old_var),
                f"torch weighs the new batch statistic {k:g}, Keras {1 - k:.2g}",
            )
        }
        if n > 1:
            hypotheses[Cause.BN_UNBIASED_VARIANCE] = (
                (new_mean, k * old_var + (1 - k) * batch_var * n / (n - 1)),
                f"factor n/(n-1) = {n}/{n - 1}",
            )
        diagnosis = next(
            (
                Diagnosis(
                    cause,
                    detail,
                    "one training-mode forward in each",
                    path.split(".")[0],
                    path.partition(".")[2] or None,
                )
                for cause, ((m, v), detail) in hypotheses.items()
                if explains(
                    Evidence(got[path][0], new_mean, m, floors[0], multiple),
                    Evidence(got[path][1], new_var, v, floors[1], multiple),
                )
            ),
            Diagnosis(
                Cause.UNKNOWN,
                "moving statistics updated differently",
                f"max rel err {verdict.error:.3g}, {verdict.floor_ratio:.3g} x the noise floor "
                f"{verdict.noise_floor:.2g}",
                path.split(".")[0],
                path.partition(".")[2] or None,
            ),
        )
        return BatchNormCheck(
            False,
            None,
            path,
            verdict.error,
            verdict.noise_floor,
            verdict.floor_ratio,
            tuple(ill_conditioned),
            diagnosis,
        )
    return BatchNormCheck(
        True, None, None, worst_error, worst_verdict.noise_floor, worst_verdict.floor_ratio, tuple(ill_conditioned)
    )


# --- the comparison ----------------------------------------------------------------------------------


def verify_models(
    keras_model: keras.Model,
    torch_model: nn.Module | None,
    images: np.ndarray,
    *,
    onnx_path: str | Path | None = None,
    train_check: bool = True,
    seed: int = 0,
    keras_floor: keras.Model | None = None,
) -> VerifyReport:
    """Compare the torch twin (and an ONNX file) with the Keras model stage by stage.

    Args:
        keras_model: the reference, in ``build_resnet34``'s layout.
        torch_model: the torch ResNet34 compared with it (the twin, or a copy with a planted bug); None for ONNX only.
        images: NHWC images in the models' dtype.
        onnx_path: an ONNX file whose final output is compared too.
        train_check: also compare one training-mode forward's BatchNorm statistic updates.
        seed: draws the one-ulp moves of a float64 floor twin.
        keras_floor: ``noise_floor.keras_floor_twin(keras_model, seed)`` where the caller already holds it (it
            depends only on the Keras model).
    """
    if keras_floor is None:
        keras_floor = keras_floor_twin(keras_model, seed)
        try:
            return verify_models(
                keras_model,
                torch_model,
                images,
                onnx_path=onnx_path,
                train_check=train_check,
                seed=seed,
                keras_floor=keras_floor,
            )
        finally:
            release_clone(keras_floor)  # built here, used only here
    dtype = model_dtype(keras_model)
    tolerance = TOLERANCE.get(dtype, TOLERANCE["float32"])
    multiple = floor_multiple(dtype)
    reference_stages = keras_stages(keras_model)
    names = [name for name, _ in reference_stages]
    sides = _Sides(dict(reference_stages), {}, dict(keras_stages(keras_floor)), {})
    torch_floor = None
    if torch_model is not None:
        torch_floor = torch_floor_twin(torch_model, seed)
        sides.torch = dict(torch_stages(torch_model, names))
        sides.torch_floor = dict(torch_stages(torch_floor, names))
    context = DiagnosisContext(keras_model, torch_model, keras_floor, torch_floor, tolerance, multiple, seed)
    rows: list[StageRow] = []
    reference_in, torch_in = images, images
    keras_floor_in = torch_floor_in = floor_images(images, seed)
    first_stage = first_cumulative = None
    diagnosis = None
    floors = {"keras": 0.0, "torch": 0.0}
    for name in names:
        reference_out = sides.keras[name](reference_in)
        keras_floor_out = sides.keras_floor[name](keras_floor_in)
        scale = scale_of(reference_out)
        floors["keras"] = scaled_distance(reference_out, keras_floor_out, scale)
        comparison = None
        if torch_model is not None:
            torch_out = sides.torch[name](torch_in)
            torch_floor_out = sides.torch_floor[name](torch_floor_in)
            floors["torch"] = scaled_distance(torch_out, torch_floor_out, scale)
            local_err, local_verdict, local_out = _local(name, sides, reference_in, reference_out, context)
            floor = floors["keras"] + floors["torch"]
            comparison = _comparison(torch_out, reference_out, floor, (local_err, local_verdict), tolerance, multiple)
            if first_cumulative is None and not comparison.ok:
                first_cumulative = name
            if first_stage is None and local_verdict is not None and not local_verdict.ok:
                first_stage = name
                diagnosis = diagnose(name, reference_in, context, reference_out, local_out, local_verdict.noise_floor)
            torch_in, torch_floor_in = torch_out, torch_floor_out
        rows.append(StageRow(name, tuple(reference_out.shape), torch=comparison))
        reference_in, keras_floor_in = reference_out, keras_floor_out
    if onnx_path is not None:
        from conversion.onnx_export import run_onnx

        onnx_out = run_onnx(onnx_path, images)
        # ONNX Runtime computes in float32: judged against this stage's float32 floor (both twins', or twice
        # Keras's where no torch model is compared).
        floor = floors["keras"] + (floors["torch"] if torch_model is not None else floors["keras"])
        onnx = _comparison(onnx_out, reference_in, floor, (None, None), tolerance, multiple)
        rows[-1] = StageRow(rows[-1].stage, rows[-1].shape, rows[-1].torch, onnx)
    if first_stage is None and first_cumulative is not None:
        first_stage = first_cumulative
        diagnosis = Diagnosis(
            Cause.UNKNOWN,
            "no stage diverges on its own (accumulated error)",
            "every stage's local error is within its noise floor",
            first_cumulative,
        )
    training = None
    if torch_model is not None and train_check:
        smallest = min(int(np.prod(row.shape[:3])) for row in rows if row.stage.startswith("unit_"))
        if smallest < 2:  # torch refuses batch statistics of a single value per channel
            skipped = f"the last units see {smallest} value per channel; use a larger batch or size"
            training = BatchNormCheck(True, skipped)
        else:
            training = training_check(
                keras_model, torch_model, images, tolerance, keras_floor=keras_floor, torch_floor=torch_floor, seed=seed
            )
    agree = all(c.ok for row in rows for c in row.comparisons().values()) and (training is None or training.ok)
    if first_stage is None and training is not None and not training.ok:
        # The forward pass agrees; only training mode shows it (e.g. an inverted BatchNorm momentum).
        first_stage, diagnosis = training.diagnosis.stage, training.diagnosis
    return VerifyReport(
        agree=agree,
        dtype=dtype,
        tolerance=tolerance,
        floor_multiple=multiple,
        batch=int(images.shape[0]),
        size=(int(images.shape[1]), int(images.shape[2])),
        stages=rows,
        first_divergent_stage=first_stage,
        diagnosis=diagnosis,
        training_check=training,
    )


def source_check(source: keras.Model, reference: keras.Model, images: np.ndarray) -> SourceCheck:
    """The user's own Keras model (its own forward, its own code) against the rebuilt reference."""
    tolerance = TOLERANCE.get(model_dtype(reference), TOLERANCE["float32"])
    taken = keras.backend.standardize_dtype(source.inputs[0].dtype) if getattr(source, "inputs", None) else None
    if taken and np.dtype(taken).itemsize < images.dtype.itemsize:
        # keras-hub's Input is float32 whatever the model's dtype: the source computes on rounded images, so the
        # reference is given the same ones.
        images = images.astype(taken).astype(images.dtype)
    err = max_rel_err(keras.ops.convert_to_numpy(source(images)), keras.ops.convert_to_numpy(reference(images)))
    return SourceCheck(err, tolerance, err <= tolerance)
