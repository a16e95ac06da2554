"""Training parity: the same K batches through Keras's own training step and through the torch twin's, compared
tensor by tensor after every step, with the first divergent tensor named and its likely cause.

Per step each side's loss, every gradient, every BatchNorm moving statistic, every optimizer slot and every updated
weight are compared (max |torch - keras| / max |keras| per tensor; the loss |torch - keras| / |keras|), each against
its noise floor: each side also trains its floor twin (``noise_floor``: float64 for a float32 run, one ulp apart for
a float64 one) on the floor images, and a tensor diverges only beyond a multiple of its floor AND the bound. The
first divergent tensor is the first in the step's causal order (BatchNorm statistics, updated by the forward; the
loss; gradients; optimizer slots; weights); ``training_diagnosis`` names its cause.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import keras
import numpy as np
import torch
from torch import nn

from conversion import training
from conversion.arrays import nhwc_to_nchw
from conversion.errors import ConversionError, InputError
from conversion.verify.causes import Cause
from conversion.verify.defaults import DEFAULT_LEARNING_RATE, DEFAULT_WEIGHT_DECAY, TRAIN_OPTIMIZERS
from conversion.verify.noise_floor import (
    Judgement,
    floor_images,
    floor_multiple,
    judge,
    keras_floor_twin,
    moved_one_ulp,
    release_clone,
)
from conversion.verify.report import TENSOR_KINDS, DivergentTensor, Top1, TrainingReport, TrainingStep
from conversion.verify.stages import model_dtype
from conversion.verify.training_diagnosis import TrainingDiagnosisContext, batchnorm_layers, diagnose
from conversion.verify.training_sides import (
    KerasRun,
    KerasStep,
    TorchStep,
    as_numpy,
    distance,
    head_activation,
    keras_steps,
    scale,
    torch_layout,
    torch_slots,
    torch_step,
)
from conversion.weights import TensorPair, keras_to_torch, paired_tensors

# The absolute bound per tensor and step, the second gate: a difference fails only beyond both it and a multiple
# of its noise floor, so these are what stays when rounding is ruled out.
# - float64: 1e-10. The floor is the divergence of each side's own float64 run with every weight and image one ulp
#   apart. The absolute errors grow from ~6e-14 at step 0 to ~1e-10 (Adam with weight decay and
#   PiecewiseConstantDecay, 6 steps at 45x38: up to 1.5e-10): training-mode BatchNorm over few values per channel
#   and optimizers dividing by sqrt(v) amplify each step's rounding, and the floor grows with them.
# - float32: 1e-5, the float32 inference bound. Each side's floor is its own float64 run, so by the triangle
#   inequality a correct pair stays within ~1 x its floor at every step, even where float32 runs separate O(1)
#   after a few steps: every step is judged.
TRAIN_TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


@dataclass
class TrainingOptions:
    """How to train each side. Keras's optimizer and loss default to the model's compiled ones, else Nesterov SGD
    (``default_optimizer``) and sparse categorical crossentropy, the loss made in the model's dtype. The torch side
    defaults to ``conversion.training``'s translation of Keras's (set it to plant a porting bug);
    ``torch_scheduler.step()`` runs after each torch optimizer step."""

    steps: int | None = None  # default: one per batch given
    keras_optimizer: keras.optimizers.Optimizer | None = None
    keras_loss: object | None = None
    torch_optimizer: object | None = None
    torch_loss: Callable | None = None
    torch_scheduler: object | None = None
    tolerance: float | None = None  # the absolute bound; default TRAIN_TOLERANCE of the model's dtype
    seed: int = 0  # draws the one-ulp moves of a float64 floor twin


def _pairs(keras_model: keras.Model, torch_model: nn.Module) -> list[TensorPair]:
    """The audited pairs; for a twin the audit refuses (e.g. a BatchNorm's momentum), pair by name instead."""
    try:
        return paired_tensors(keras_model, torch_model)
    except ConversionError:
        tensors = dict(torch_model.named_parameters()) | dict(torch_model.named_buffers())
        pairs = []
        for p in paired_tensors(keras_model, keras_to_torch(keras_model)):
            if p.path not in tensors:
                raise ConversionError(f"the torch model has no tensor {p.path}; expected the twin's names") from None
            pairs.append(dataclasses.replace(p, torch_tensor=tensors[p.path]))
        return pairs


def _batches(images: np.ndarray, labels: np.ndarray, steps: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """One (images, labels) batch per step: images (K, N, H, W, C) and labels (K, N), or one batch repeated."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 4:
        steps = 1 if steps is None else steps
        return [(images, labels)] * steps
    if images.ndim != 5 or labels.shape[:2] != images.shape[:2]:
        raise InputError(
            f"expected images (K, N, H, W, C) with labels (K, N), or one batch (N, H, W, C) with labels (N,); "
            f"received {images.shape} and {labels.shape}"
        )
    steps = images.shape[0] if steps is None else steps
    if steps > images.shape[0]:
        raise InputError(f"{steps} steps need {steps} batches; received {images.shape[0]}")
    return [(images[i], labels[i]) for i in range(steps)]


def _targets(keras_loss: keras.losses.Loss, labels: np.ndarray, classes: int, dtype: str) -> np.ndarray:
    """Class indices for a sparse loss, one-hot rows (in the model's dtype) for the categorical one."""
    if isinstance(keras_loss, keras.losses.CategoricalCrossentropy) and labels.ndim == 1:
        return np.eye(classes, dtype=dtype)[labels]
    return labels


@dataclass(frozen=True)
class _TensorVerdict:
    """One tensor of one step, judged against its noise floor."""

    kind: str  # one of TENSOR_KINDS
    torch: str  # its torch name ("loss" for the loss, "path [slot]" for a slot)
    keras: str
    judgement: Judgement


@dataclass
class _TorchSide:
    """The torch model as it trains, with its optimizer, scheduler and loss: the compared side or its floor twin."""

    model: nn.Module
    loss: Callable
    optimizer: object
    scheduler: object | None
    params: dict[str, torch.Tensor]  # torch path -> trainable parameter

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters()) | dict(self.model.named_buffers())


def _copy_optimizer(optimizer: torch.optim.Optimizer, memo: dict) -> torch.optim.Optimizer:
    """A deep copy of a torch optimizer with all of its attributes (``copy.deepcopy`` keeps only torch's three:
    defaults, state and param_groups), its parameters mapped through ``memo``."""
    clone = object.__new__(type(optimizer))
    memo[id(optimizer)] = clone
    attributes = dict(optimizer.__dict__)
    wrapped_step = attributes.pop("step", None)  # an lr scheduler's wrapper, bound to the ORIGINAL optimizer
    clone.__dict__.update(copy.deepcopy(attributes, memo))
    if hasattr(wrapped_step, "_wrapped_by_lr_sched"):
        step = type(optimizer).step

        def tracked_step(*args: object, **kwargs: object) -> object:
            clone._opt_called = True  # what the scheduler's own wrapper records
            return step(clone, *args, **kwargs)

        tracked_step._wrapped_by_lr_sched = True
        clone.step = tracked_step
    return clone


def _copy_training_objects(model: nn.Module, optimizer: object, scheduler: object | None) -> tuple:
    """Deep copies of a model, its optimizer (or a wrapper holding one) and scheduler, still wired together."""
    memo: dict = {}
    model = copy.deepcopy(model, memo)
    holders = [optimizer, scheduler, *(vars(optimizer).values() if hasattr(optimizer, "__dict__") else ())]
    for candidate in holders:
        if isinstance(candidate, torch.optim.Optimizer) and id(candidate) not in memo:
            _copy_optimizer(candidate, memo)
    return model, copy.deepcopy(optimizer, memo), copy.deepcopy(scheduler, memo)


def _torch_floor_side(side: _TorchSide, seed: int) -> _TorchSide:
    """The torch side's floor twin: model, optimizer and scheduler copied together (the optimizer keeps pointing
    at the copy's parameters), then made float64 (a float32 side) or moved one ulp (a float64 side)."""
    model, optimizer, scheduler = _copy_training_objects(side.model, side.optimizer, side.scheduler)
    float64 = next(t.dtype for t in model.state_dict().values() if t.is_floating_point()) == torch.float64
    if not float64:
        model.double()  # in place: every Parameter object stays, so the optimizer's references hold
        for state in getattr(optimizer, "state", {}).values():  # a run that continues: its slots widen too
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0:
                    state[key] = value.double()
    else:
        moved_one_ulp(model, seed)
    loss = side.loss
    if isinstance(loss, training.TorchLoss):
        loss = dataclasses.replace(loss, dtype=torch.float64)
    tensors = dict(model.named_parameters())
    return _TorchSide(model, loss, optimizer, scheduler, {path: tensors[path] for path in side.params})


def optimizer_like(optimizer: keras.optimizers.Optimizer, model: keras.Model) -> keras.optimizers.Optimizer:
    """A new Keras optimizer of ``optimizer``'s config for ``model``, holding its state where it has any."""
    clone = type(optimizer).from_config(optimizer.get_config())
    if optimizer.built and int(as_numpy(optimizer.iterations)) > 0:
        clone.build(model.trainable_variables)
        for source, target in zip(optimizer.variables, clone.variables, strict=True):
            target.assign(np.asarray(as_numpy(source)).astype(keras.backend.standardize_dtype(target.dtype)))
    return clone


def _keras_floor_steps(
    keras_model: keras.Model,
    batches: list[tuple[np.ndarray, np.ndarray]],
    optimizer: keras.optimizers.Optimizer,
    loss: keras.losses.Loss,
    seed: int,
) -> tuple[keras.Model, Iterator[KerasStep], dict[str, str]]:
    """Keras's floor twin trained on the floor batches: the twin, its steps, and the twin's variable path of each
    of the model's (the clone's sublayers are named afresh)."""
    twin = keras_floor_twin(keras_model, seed)
    paths = {v.path: w.path for v, w in zip(keras_model.weights, twin.weights, strict=True)}
    floor_loss = training.keras_loss_with_dtype(loss, "float64")
    floor_batches = [(x, y.astype(np.float64) if np.asarray(y).dtype.kind == "f" else y) for x, y in batches]
    steps = keras_steps(twin, floor_batches, optimizer_like(optimizer, twin), floor_loss, live=True)
    return twin, steps, paths


def _keras_floor(now: KerasStep, floor_now: KerasStep, paths: dict[str, str]) -> dict[tuple, float]:
    """Keras's side of every tensor's floor at this step: max |run - floor twin's run| / max |run|."""
    floor = {
        ("loss",): abs(now.loss - floor_now.loss) / (abs(now.loss) or 1.0),
        ("y_pred",): distance(now.y_pred, floor_now.y_pred) / scale(now.y_pred),
    }
    for path, value in now.state.items():  # the floor run's variables are live: each read once, then dropped
        floor[("state", path)] = distance(value, as_numpy(floor_now.state[paths[path]])) / scale(value)
    for path, value in now.grads.items():
        floor[("grad", path)] = distance(value, floor_now.grads[paths[path]]) / scale(value)
    for (path, slot), value in now.slots.items():
        floor[("slot", path, slot)] = distance(value, as_numpy(floor_now.slots[(paths[path], slot)])) / scale(value)
    return floor


def _compare_step(
    now: KerasStep,
    t: TorchStep,
    t_floor: TorchStep,
    side: _TorchSide,
    floor_side: _TorchSide,
    trainable: dict[str, TensorPair],
    statistics: list[TensorPair],
    tolerance: float,
    multiple: float,
) -> tuple[list[_TensorVerdict], int]:
    """Every tensor of this step judged against its floor (Keras's side from the step, torch's measured here),
    and the number of optimizer slots compared."""
    verdicts: list[_TensorVerdict] = []
    tensors, floor_tensors = side.tensors(), floor_side.tensors()

    def check(kind: str, torch_name: str, keras_name: str, actual, floor_actual, expected, keras_floor: float):
        denominator = scale(expected)
        error = distance(actual, expected) / denominator
        floor = keras_floor + distance(actual, floor_actual) / denominator
        verdicts.append(_TensorVerdict(kind, torch_name, keras_name, judge(error, floor, tolerance, multiple)))

    for p in statistics:
        kpath = p.keras_variable.path
        expected = torch_layout(p, now.state[kpath])
        check("batchnorm statistic", p.path, kpath, tensors[p.path], floor_tensors[p.path], expected,
              now.floor[("state", kpath)])  # fmt: skip
    check("loss", "loss", "loss", np.float64(t.loss), np.float64(t_floor.loss), np.float64(now.loss),
          now.floor[("loss",)])  # fmt: skip
    for path, p in trainable.items():
        kpath = p.keras_variable.path
        expected = torch_layout(p, now.grads.get(kpath, 0 * now.state[kpath]))
        check(
            "gradient", path, kpath, t.grads[path], t_floor.grads[path], expected, now.floor.get(("grad", kpath), 0.0)
        )
    compared_slots = 0
    for path, p in trainable.items():
        kpath = p.keras_variable.path
        floor_slots = torch_slots(floor_side.optimizer, floor_side.params[path])
        for slot, value in torch_slots(side.optimizer, side.params[path]).items():
            if (kpath, slot) in now.slots:
                compared_slots += 1
                expected = torch_layout(p, now.slots[(kpath, slot)])
                floor_value = floor_slots.get(slot, value * math.inf)  # no such slot in the floor twin: no floor
                check("optimizer slot", f"{path} [{slot}]", f"{kpath}_{slot}", value, floor_value, expected,
                      now.floor[("slot", kpath, slot)])  # fmt: skip
    for path, p in trainable.items():
        kpath = p.keras_variable.path
        expected = torch_layout(p, now.state[kpath])
        check("weight", path, kpath, tensors[path], floor_tensors[path], expected, now.floor[("state", kpath)])
    return verdicts, compared_slots


def _kind_summary(verdicts: list[_TensorVerdict], kind: str) -> tuple[float | None, float | None, float | None]:
    """(worst error, floor and ratio of the tensor with the worst ratio) of one kind; Nones where it has none."""
    of_kind = [v.judgement for v in verdicts if v.kind == kind]
    if not of_kind:
        return None, None, None
    worst = max(of_kind, key=lambda j: (not math.isnan(j.floor_ratio), j.floor_ratio))
    return max(j.error for j in of_kind), worst.noise_floor, worst.floor_ratio


def verify_training(
    keras_model: keras.Model,
    torch_model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    options: TrainingOptions | None = None,
    *,
    reference: KerasRun | None = None,
    record: KerasRun | None = None,
    keep_steps: int = 0,
    progress: Callable[[int], None] | None = None,
) -> TrainingReport:
    """Train both twins on the same batches, compare every tensor after every step against its noise floor.

    Both models are trained IN PLACE. ``images`` is (K, N, H, W, C) with ``labels`` (K, N), or one batch reused.

    Args:
        options: each side's optimizer and loss, the steps, the bound and the floor seed (``TrainingOptions``).
        reference: a ``KerasRun`` recorded earlier from the same initial state: Keras is not run again (its steps
            carry Keras's side of the floors).
        record: a ``KerasRun`` to fill with this run's initial state and first ``keep_steps`` Keras steps.
        progress: called with the number of steps done.
    """
    options = options or TrainingOptions()
    dtype = model_dtype(keras_model)
    tolerance = (
        TRAIN_TOLERANCE.get(dtype, TRAIN_TOLERANCE["float32"]) if options.tolerance is None else options.tolerance
    )
    multiple = floor_multiple(dtype)
    if reference is not None:
        keras_optimizer, keras_loss = reference.optimizer, reference.loss
    else:
        keras_optimizer = (
            options.keras_optimizer or getattr(keras_model, "optimizer", None) or default_optimizer("nesterov")
        )
        keras_loss = options.keras_loss or getattr(keras_model, "loss", None) or "sparse_categorical_crossentropy"
        keras_loss = training.keras_loss_with_dtype(keras_loss, dtype)
    batches = _batches(images, labels, options.steps)
    head = head_activation(keras_model)
    classes = int(keras_model.outputs[0].shape[-1]) if keras_model.outputs else torch_model.num_classes
    batches = [(x, _targets(keras_loss, y, classes, dtype)) for x, y in batches]
    floor_batches = [(floor_images(x, options.seed + 1 + index), y) for index, (x, y) in enumerate(batches)]

    pairs = _pairs(keras_model, torch_model)
    trainable = {p.path: p for p in pairs if p.keras_variable.trainable}
    statistics = [p for p in pairs if not p.keras_variable.trainable]
    torch_loss = options.torch_loss or training.torch_loss(keras_loss, output_activation=head)
    torch_optimizer = options.torch_optimizer or training.torch_optimizer(keras_optimizer, torch_model)
    device = next(torch_model.parameters()).device

    continuing = reference is None and int(as_numpy(keras_optimizer.iterations)) > 0
    if continuing and isinstance(torch_optimizer, training.KerasRuleOptimizer):
        training.optimizer_state_to_torch(keras_optimizer, torch_optimizer, pairs)  # a run that continues
    params = {path: p.torch_tensor for path, p in trainable.items()}
    side = _TorchSide(torch_model, torch_loss, torch_optimizer, options.torch_scheduler, params)
    floor_side = _torch_floor_side(side, options.seed)
    if reference is not None:
        keras_iter: Iterator[KerasStep] = iter([reference.initial, *reference.steps[: len(batches)]])
        keras_floor, floor_iter, floor_paths = None, None, {}
    else:
        keras_floor, floor_iter, floor_paths = _keras_floor_steps(
            keras_model, floor_batches, keras_optimizer, keras_loss, options.seed
        )
        next(floor_iter)  # the floor twin's initial state
        keras_iter = keras_steps(keras_model, batches, keras_optimizer, keras_loss)
    prev = next(keras_iter)
    if record is not None:
        record.optimizer, record.loss, record.initial = keras_optimizer, keras_loss, prev

    torch_model.train()
    floor_side.model.train()
    rows: list[TrainingStep] = []
    first: DivergentTensor | None = None
    diagnosis = now = t = t_floor = None
    for index, ((x, y), (x_floor, _)) in enumerate(zip(batches, floor_batches, strict=True)):
        now = next(keras_iter, None)
        if now is None:
            raise InputError(f"the Keras reference has {index} steps; {len(batches)} were asked")
        if floor_iter is not None:
            now.floor = _keras_floor(now, next(floor_iter), floor_paths)
        if record is not None and index < keep_steps:
            record.steps.append(now)
        target = torch.from_numpy(np.asarray(y)).to(device)
        t = torch_step(torch_model, torch_loss, torch_optimizer, options.torch_scheduler,
                       torch.from_numpy(nhwc_to_nchw(x)).to(device), target, side.params)  # fmt: skip
        floor_target = target.double() if target.is_floating_point() else target
        floor_images_t = torch.from_numpy(nhwc_to_nchw(x_floor)).to(device)
        t_floor = torch_step(floor_side.model, floor_side.loss, floor_side.optimizer, floor_side.scheduler,
                             floor_images_t, floor_target, floor_side.params)  # fmt: skip

        verdicts, compared_slots = _compare_step(
            now, t, t_floor, side, floor_side, trainable, statistics, tolerance, multiple
        )
        rows.append(_row(index, now, t, verdicts, compared_slots))
        found = [v for v in verdicts if not v.judgement.ok]
        if found and first is None:
            worst = min(found, key=lambda v: TENSOR_KINDS.index(v.kind))
            j = worst.judgement
            first = DivergentTensor(index, worst.kind, worst.torch, worst.keras, j.error, j.noise_floor, j.floor_ratio)
            context = TrainingDiagnosisContext(
                keras_model, keras_optimizer, keras_loss, head, pairs, batchnorm_layers(keras_model), prev, now, t,
                t_floor, side.tensors(), np.asarray(y), tolerance, multiple,
                {(v.kind, v.torch): v.judgement.noise_floor for v in verdicts}, {(v.kind, v.torch) for v in found},
            )  # fmt: skip
            diagnosis = diagnose(worst.kind, worst.torch, context)
            if dtype != "float64" and diagnosis.cause is Cause.UNKNOWN:
                advice = (
                    f"no porting bug reproduces it in {dtype}, where rounding grows with every step: rerun with "
                    "--dtype float64 to tell a porting bug from rounding"
                )
                diagnosis = dataclasses.replace(diagnosis, detail=f"{diagnosis.detail}; {advice}")
        prev = now
        if progress is not None:
            progress(index + 1)

    top1 = None
    if reference is None:
        top1 = _top1(keras_model, torch_model, keras_floor, floor_side.model, batches, floor_batches, device)
    torch_model.eval()
    if floor_iter is not None:  # built here, used only here: the next run of this architecture takes it again
        floor_iter.close()  # its recording wrappers come off
        keras_floor.compile()  # an unbuilt optimizer: the floor optimizer's slots go now, not with the clone
        release_clone(keras_floor)
    # The floor twins hold a model, its gradients and its optimizer's slots each (GBs in float64), in reference
    # cycles (Keras layers, torch optimizers): free them now, not whenever the collector next runs.
    del keras_floor, floor_iter, floor_side, prev, now, t, t_floor
    gc.collect()
    return TrainingReport(
        agree=first is None and (top1 is None or top1.agree),
        dtype=dtype,
        tolerance=tolerance,
        floor_multiple=multiple,
        batch=int(batches[0][0].shape[0]),
        size=(int(batches[0][0].shape[1]), int(batches[0][0].shape[2])),
        keras_optimizer=_describe_optimizer(keras_optimizer),
        torch_optimizer=type(torch_optimizer).__name__,
        loss=torch_loss.describe(dtype) if isinstance(torch_loss, training.TorchLoss) else repr(torch_loss),
        rows=rows,
        top1_after_training=top1,
        first_divergent_tensor=first,
        diagnosis=diagnosis,
    )


def _row(index: int, now: KerasStep, t: TorchStep, verdicts: list, compared_slots: int) -> TrainingStep:
    summaries = {kind: _kind_summary(verdicts, kind) for kind in TENSOR_KINDS}
    return TrainingStep(
        step=index,
        learning_rate=now.learning_rate,
        keras_loss=now.loss,
        torch_loss=t.loss,
        loss_rel=summaries["loss"][0],
        grad_rel=summaries["gradient"][0],
        weight_rel=summaries["weight"][0],
        bn_rel=summaries["batchnorm statistic"][0] or 0.0,
        slot_rel=summaries["optimizer slot"][0] if compared_slots else None,
        noise_floor={kind: summary[1] for kind, summary in summaries.items() if summary[1] is not None},
        floor_ratio={kind: summary[2] for kind, summary in summaries.items() if summary[2] is not None},
        ill_conditioned=tuple(v.torch for v in verdicts if v.judgement.ill_conditioned),
        ok=all(v.judgement.ok for v in verdicts),
    )


def _describe_optimizer(optimizer: keras.optimizers.Optimizer) -> str:
    try:
        return training.keras_rule(optimizer).describe()
    except ConversionError:
        return type(optimizer).__name__


def _top1(
    keras_model: keras.Model,
    torch_model: nn.Module,
    keras_floor: keras.Model,
    torch_floor: nn.Module,
    batches: list[tuple[np.ndarray, np.ndarray]],
    floor_batches: list[tuple[np.ndarray, np.ndarray]],
    device: torch.device,
) -> Top1:
    """Inference-mode top-1 of every sample after training, in both, and in both floor twins.

    A sample whose class differs between the two counts only where neither side's floor twin flips it too:
    where rounding alone changes a side's answer, that answer is not the implementations' to agree on.
    """

    def keras_top(model: keras.Model, x: np.ndarray) -> np.ndarray:
        return np.argmax(as_numpy(model(x, training=False)), axis=-1)

    def torch_top(model: nn.Module, x: np.ndarray) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            return model(torch.from_numpy(nhwc_to_nchw(x)).to(device)).argmax(-1).cpu().numpy()

    seen, unique = set(), []
    for (x, _), (x_floor, _) in zip(batches, floor_batches, strict=True):
        if id(x) not in seen:
            seen.add(id(x))
            unique.append((x, x_floor))
    k = np.concatenate([keras_top(keras_model, x) for x, _ in unique])
    t = np.concatenate([torch_top(torch_model, x) for x, _ in unique])
    differ = k != t
    if not differ.any():  # the floor twins only matter where the two differ: skip their forwards
        return Top1(True, int(k.size), 0, 0)
    kf = np.concatenate([keras_top(keras_floor, x_floor) for _, x_floor in unique])
    tf = np.concatenate([torch_top(torch_floor, x_floor) for _, x_floor in unique])
    beyond_floor = differ & (k == kf) & (t == tf)
    return Top1(not bool(beyond_floor.any()), int(k.size), int(differ.sum()), int(beyond_floor.sum()))


def default_optimizer(
    name: str, learning_rate: float | None = None, weight_decay: float | None = DEFAULT_WEIGHT_DECAY, steps: int = 10
) -> keras.optimizers.Optimizer:
    """The Keras optimizer ``verify --train --optimizer NAME`` uses, with a schedule that moves every step.

    sgd / nesterov: momentum 0.9, ExponentialDecay(lr, decay_steps=1, decay_rate=0.9); adam / adamw / nadam /
    adamax / lion: CosineDecay(lr, decay_steps=steps); rmsprop: centered, momentum 0.9, ExponentialDecay as SGD's;
    adagrad / adadelta: ExponentialDecay as SGD's. Keras's defaults otherwise.
    """
    if name not in TRAIN_OPTIMIZERS:
        raise InputError(f"unknown optimizer {name!r}; expected one of {', '.join(TRAIN_OPTIMIZERS)}")
    lr = DEFAULT_LEARNING_RATE[name] if learning_rate is None else learning_rate
    wd = weight_decay or None
    schedules = keras.optimizers.schedules
    if name in ("sgd", "nesterov"):
        rate = schedules.ExponentialDecay(lr, decay_steps=1, decay_rate=0.9)
        return keras.optimizers.SGD(rate, momentum=0.9, nesterov=name == "nesterov", weight_decay=wd)
    if name == "adam":
        return keras.optimizers.Adam(schedules.CosineDecay(lr, decay_steps=max(steps, 1)), weight_decay=wd)
    if name == "adamw":
        return keras.optimizers.AdamW(schedules.CosineDecay(lr, decay_steps=max(steps, 1)), weight_decay=wd or 0.0)
    cosine = {"nadam": keras.optimizers.Nadam, "adamax": keras.optimizers.Adamax, "lion": keras.optimizers.Lion}
    if name in cosine:
        return cosine[name](schedules.CosineDecay(lr, decay_steps=max(steps, 1)), weight_decay=wd)
    rate = schedules.ExponentialDecay(lr, decay_steps=1, decay_rate=0.9)
    if name == "adagrad":
        return keras.optimizers.Adagrad(rate, weight_decay=wd)
    if name == "adadelta":
        return keras.optimizers.Adadelta(rate, weight_decay=wd)
    return keras.optimizers.RMSprop(rate, momentum=0.9, centered=True, weight_decay=wd)
