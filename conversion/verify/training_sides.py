"""Each side of a training comparison: Keras's own ``train_on_batch``, recorded step by step, and the torch
step; and the array helpers both sides are compared with.

Keras side: ``model.compile(optimizer, loss, run_eagerly=True)`` then ``train_on_batch`` per batch. Its
gradients are not returned, so they are READ, not recomputed: for the run, ``optimizer.apply_gradients`` and
``model.compute_loss`` are wrapped on the instance (eager mode makes their arguments concrete), which records
the exact gradients ``train_step`` hands to the optimizer (before Keras clips them), the loss it differentiates
and the training-mode output ``y_pred``. Nothing is run twice, so the BatchNorm statistics move once. The
compile happens with ``floatx`` set to the model's dtype, so Keras's compile wrapper does not round the loss it
reports (Keras casts a loss to floatx there; the gradient is unaffected).

torch side: ``train()`` mode, the loss (with the logits behind the softmax where Keras's TensorFlow loss uses
them), ``backward``, the optimizer's ``step()``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import torch
from torch import nn

from conversion import training
from conversion.errors import ConversionError
from conversion.verify.stages import model_dtype
from conversion.weights import TensorPair

# torch's own optimizers' state names for the quantities Keras's slots hold (same definition, other name).
TORCH_SLOT_NAMES = {
    "exp_avg": "momentum",
    "exp_avg_sq": "velocity",
    "max_exp_avg_sq": "velocity_hat",
    "square_avg": "velocity",
    "grad_avg": "average_gradient",
}

# Every slot of conversion.training's rules (Adamax's norm, Adagrad's accumulator, Adadelta's two accumulators too).
KERAS_SLOT_NAMES = (
    "momentum",
    "velocity",
    "velocity_hat",
    "average_gradient",
    "norm",
    "accumulator",
    "accumulated_grad",
    "accumulated_delta_var",
)


@dataclass
class KerasStep:
    """What one Keras ``train_on_batch`` did (index -1: the state before the first step)."""

    step: int
    learning_rate: float | None  # the rate this step used (the schedule at ``iterations``)
    loss: float | None
    y_pred: np.ndarray | None
    grads: dict[str, np.ndarray]  # keras variable path -> gradient handed to the optimizer (Keras layout)
    state: dict[str, np.ndarray]  # keras variable path -> value after the step (weights and BN statistics)
    slots: dict[tuple[str, str], np.ndarray]  # (keras variable path, slot name) -> value after the step
    # Keras's side of each tensor's noise floor: max |this run - its floor twin's run| / max |this run|, keyed
    # ("loss",), ("state", path), ("grad", path), ("slot", path, slot name).
    floor: dict[tuple, float] = field(default_factory=dict)


@dataclass
class KerasRun:
    """A recorded Keras run: the optimizer and loss it used, its initial state and (some of) its steps."""

    optimizer: keras.optimizers.Optimizer
    loss: keras.losses.Loss
    initial: KerasStep
    steps: list[KerasStep] = field(default_factory=list)


def as_numpy(x: object) -> np.ndarray:
    """A Keras tensor or variable as a numpy array: on TensorFlow one copy of a variable and none of a tensor
    (a read-only view: TensorFlow's tensors never change). ``keras.ops.convert_to_numpy`` copies both twice, and
    training parity reads every weight, gradient and slot of each step (~0.2 s a step in float64 here)."""
    if keras.backend.backend() == "tensorflow":
        return np.asarray(x)
    return np.asarray(keras.ops.convert_to_numpy(x))


def as_array(x: torch.Tensor | np.ndarray | float) -> np.ndarray:
    """A torch tensor, array or number as a numpy array (on the CPU)."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def distance(actual: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    """max |actual - reference| (inf when the shapes differ or either is not finite)."""
    a, r = as_array(actual), as_array(reference)
    if a.shape != r.shape:
        return math.inf
    if a.dtype != r.dtype:
        a, r = a.astype(np.float64), r.astype(np.float64)
    if not a.size:
        return 0.0
    scratch = _scratch(a.size, a.dtype).reshape(a.shape)
    np.subtract(a, r, out=scratch)
    diff = float(np.abs(scratch, out=scratch).max())
    return diff if math.isfinite(diff) else math.inf


_SCRATCH: dict[np.dtype, np.ndarray] = {}


def _scratch(size: int, dtype: np.dtype) -> np.ndarray:
    """A flat buffer of at least ``size`` elements, reused by every ``distance``: a step compares every weight,
    gradient and slot two or three times, and fresh temporaries of 21M parameters are mostly page faults."""
    buffer = _SCRATCH.get(dtype)
    if buffer is None or buffer.size < size:
        buffer = _SCRATCH[dtype] = np.empty(size, dtype)
    return buffer[:size]


def scale(reference: torch.Tensor | np.ndarray) -> float:
    """max |reference|, or 1 where that is 0 (the denominator of every error about this tensor)."""
    r = as_array(reference)
    if not r.size:
        return 1.0
    scale = max(float(r.max()), -float(r.min()))
    return scale if scale > 0 and math.isfinite(scale) else 1.0


def rel(actual: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    """max |actual - reference| / max |reference| (inf when either is not finite)."""
    return distance(actual, reference) / scale(reference)


def torch_layout(pair: TensorPair, keras_value: np.ndarray) -> np.ndarray:
    """A Keras value of ``pair`` in torch's layout, contiguous."""
    return np.ascontiguousarray(pair.to_torch(keras_value))


def max_abs_diff(actual: np.ndarray, candidate: np.ndarray) -> float:
    """max |actual - candidate| in float64."""
    return float(np.abs(np.asarray(actual, np.float64) - np.asarray(candidate, np.float64)).max())


def head_activation(keras_model: keras.Model) -> str | None:
    """The Keras name of the model's head activation; None for logits."""
    name = keras.activations.serialize(keras_model.layers[-1].activation)
    return None if name == "linear" else name


@contextlib.contextmanager
def _floatx(dtype: str) -> Iterator[None]:
    old = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(old)


def slot_variables(optimizer: keras.optimizers.Optimizer, variables: Sequence) -> dict[tuple[str, str], object]:
    """(keras variable path, Keras slot name) -> the optimizer's slot variable (named ``{path}_{slot}``)."""
    by_name = {v.name: v for v in optimizer.variables}
    slots = {}
    for variable in variables:
        prefix = variable.path.replace("/", "_") + "_"
        for slot in KERAS_SLOT_NAMES:
            if prefix + slot in by_name:
                slots[(variable.path, slot)] = by_name[prefix + slot]
    return slots


def torch_slots(optimizer: object, parameter: torch.Tensor) -> dict[str, torch.Tensor]:
    """The optimizer's state of ``parameter`` under Keras's slot names, where it holds the same quantity."""
    state = getattr(optimizer, "state", {}).get(parameter, {})
    if any(name in state for name in KERAS_SLOT_NAMES):  # conversion.training's KerasRuleOptimizer
        return {k: v for k, v in state.items() if k in KERAS_SLOT_NAMES}
    return {TORCH_SLOT_NAMES[k]: v for k, v in state.items() if k in TORCH_SLOT_NAMES}


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The rate Keras's next step uses (the schedule at ``iterations``)."""
    return float(as_numpy(optimizer.learning_rate))


def _keras_state(keras_model: keras.Model, optimizer: keras.optimizers.Optimizer, live: bool) -> tuple[dict, dict]:
    """Every weight and slot: copies, or (``live``) the variables themselves, read when compared."""
    read = (lambda v: v) if live else as_numpy
    state = {v.path: read(v) for v in keras_model.weights}
    slots = {key: read(v) for key, v in slot_variables(optimizer, keras_model.trainable_variables).items()}
    return state, slots


@contextlib.contextmanager
def _recording(keras_model: keras.Model, optimizer: keras.optimizers.Optimizer) -> Iterator[dict]:
    """Wrap ``compute_loss`` and ``apply_gradients`` on the instances to read what ``train_step`` computes."""
    seen: dict = {}
    compute_loss, apply_gradients = keras_model.compute_loss, optimizer.apply_gradients

    def recorded_compute_loss(*args: object, **kwargs: object) -> object:
        loss = compute_loss(*args, **kwargs)
        seen["loss"] = float(as_numpy(loss))
        seen["y_pred"] = as_numpy(args[2] if len(args) > 2 else kwargs["y_pred"])
        return loss

    def recorded_apply_gradients(grads_and_vars: object) -> object:
        grads_and_vars = list(grads_and_vars)
        seen["grads"] = {v.path: as_numpy(g) for g, v in grads_and_vars if g is not None}
        return apply_gradients(grads_and_vars)

    keras_model.compute_loss = recorded_compute_loss  # instance attributes shadow the methods
    optimizer.apply_gradients = recorded_apply_gradients
    try:
        yield seen
    finally:
        del keras_model.compute_loss
        del optimizer.apply_gradients


def keras_steps(
    keras_model: keras.Model,
    batches: Sequence[tuple[np.ndarray, np.ndarray]],
    keras_optimizer: keras.optimizers.Optimizer,
    keras_loss: keras.losses.Loss,
    *,
    live: bool = False,
) -> Iterator[KerasStep]:
    """Yield the state before training (step -1), then what each ``train_on_batch`` did (trains in place).

    ``live``: a step's ``state`` and ``slots`` hold the variables themselves, valid only until the next step (a floor
    run, read once and dropped: no 21M-parameter copies kept)."""
    if keras.backend.backend() != "tensorflow":
        raise ConversionError(
            f"verify --train reads Keras's train_step on TensorFlow; backend is {keras.backend.backend()}"
        )
    with _floatx(model_dtype(keras_model)):  # so the compiled loss is reported unrounded
        keras_model.compile(optimizer=keras_optimizer, loss=keras_loss, run_eagerly=True)
    if not keras_optimizer.built:
        keras_optimizer.build(keras_model.trainable_variables)
    state, slots = _keras_state(keras_model, keras_optimizer, live)
    yield KerasStep(-1, None, None, None, {}, state, slots)
    with _recording(keras_model, keras_optimizer) as seen:
        for index, (x, y) in enumerate(batches):
            learning_rate = current_learning_rate(keras_optimizer)
            keras_model.train_on_batch(x, y)
            state, slots = _keras_state(keras_model, keras_optimizer, live)
            yield KerasStep(index, learning_rate, seen["loss"], seen["y_pred"], seen["grads"], state, slots)


@dataclass
class TorchStep:
    """What one torch training step did."""

    loss: float
    output: np.ndarray
    grads: dict[str, torch.Tensor]  # torch path -> gradient (torch layout)
    values_per_channel: dict[str, int]  # BatchNorm module path -> n of its batch statistics


def torch_step(
    torch_model: nn.Module,
    loss_fn: Callable,
    optimizer: object,
    scheduler: object | None,
    x: torch.Tensor,
    target: torch.Tensor,
    trainable: dict[str, torch.Tensor],
) -> TorchStep:
    """One torch step: forward in the model's mode, the loss, backward, the optimizer's step (and the scheduler's);
    the gradients are copied before the step. ``trainable`` maps torch paths to the parameters to record."""
    counts: dict[str, int] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda _, args, path=path: counts.__setitem__(path, args[0].numel() // args[0].shape[1])
        )
        for path, module in torch_model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    try:
        torch_model.zero_grad(set_to_none=True)
        if isinstance(loss_fn, training.TorchLoss):
            output, logits = training.forward_with_logits(torch_model, x)
            loss = loss_fn(output, target, logits=logits)
        else:
            output = torch_model(x)
            loss = loss_fn(output, target)
    finally:
        for hook in hooks:
            hook.remove()
    loss.backward()
    grads = {
        path: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for path, p in trainable.items()
    }
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    torch_model.zero_grad(set_to_none=True)  # the copies above are what is compared; free the model's own
    return TorchStep(float(loss.detach()), output.detach().cpu().numpy(), grads, counts)
