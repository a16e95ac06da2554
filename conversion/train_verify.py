"""Training parity: the same K batches through Keras's own training step and through the torch twin's, compared
tensor by tensor after every step, with the first divergent tensor named and its likely cause.

Keras side: ``model.compile(optimizer, loss, run_eagerly=True)`` then ``train_on_batch`` per batch. Its
gradients are not returned, so they are READ, not recomputed: for the run, ``optimizer.apply_gradients`` and
``model.compute_loss`` are wrapped on the instance (eager mode makes their arguments concrete), which records
the exact gradients ``train_step`` hands to the optimizer (before Keras clips them), the loss it differentiates
and the training-mode output ``y_pred``. Nothing is run twice, so the BatchNorm statistics move once. The
compile happens with ``floatx`` set to the model's dtype, so Keras's compile wrapper does not round the loss it
reports (Keras casts a loss to floatx there; the gradient is unaffected); the loss itself is made in the
model's dtype (``keras_loss_with_dtype``) because Keras computes a loss in floatx unless told otherwise.

torch side: ``train()`` mode, the loss from ``conversion.training.torch_loss`` (with the logits behind the
softmax where Keras's TensorFlow loss uses them), ``backward``, the optimizer's ``step()`` (by default
``conversion.training.torch_optimizer``, which steps as Keras does).

Per step each side's loss, every gradient, every BatchNorm moving statistic, every optimizer slot and every
updated weight are compared (max |torch - keras| / max |keras| per tensor; the loss |torch - keras| / |keras|).
The first divergent tensor is the first over the tolerance in the step's causal order: BatchNorm statistics
(updated by the forward), the loss, gradients, optimizer slots, weights. Its cause is found as
``conversion.verify`` finds an inference bug: each classic porting bug is RECOMPUTED from Keras's state before
that step (BatchNorm updates with torch's conventions, the loss summed or doubly softmaxed, the optimizer step
with torch's optimizer, coupled weight decay, clipping by value...) and the hypothesis that reproduces
torch's tensor is named.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import keras
import numpy as np
import torch
from torch import nn

import keras_impl
from conversion import training
from conversion.arrays import nhwc_to_nchw, seeded_images
from conversion.cli import (
    DEFAULT_LEARNING_RATE,
    DEFAULT_TRAIN_BATCH,
    DEFAULT_TRAIN_SIZE,
    DEFAULT_WEIGHT_DECAY,
    TRAIN_OPTIMIZERS,
)
from conversion.errors import ConversionError, InputError
from conversion.noise_floor import (
    Evidence,
    Judgement,
    explains,
    floor_images,
    floor_multiple,
    judge,
    keras_clone,
    keras_floor_twin,
    one_ulp_apart,
)
from conversion.weights import TensorPair, keras_to_torch, paired_tensors

UNKNOWN_CAUSE = "beyond the noise floor, cause unknown"

# The absolute bound per tensor and step, the second gate: a difference fails only beyond both it and
# FLOOR_MULTIPLE x its noise floor (conversion.noise_floor), so these are what stays when rounding is ruled out.
# - float64: 1e-10. The floor is the divergence of two float64 runs (Keras's and torch's own) whose weights
#   and images are one ulp apart; correct twins measure <= 1.1 x that floor over 10 steps of four optimizers
#   (hostile weights, batch 4 of 45x38), while the absolute errors grow from ~6e-14 at step 0 to ~1e-10 (Adam
#   with weight decay and PiecewiseConstantDecay, 6 steps: 1.5e-10): training-mode BatchNorm over few values per
#   channel and optimizers dividing by sqrt(v) amplify each step's rounding, and the floor grows with them.
# - float32: 1e-5, the float32 inference bound. Each side's floor is its own float64 run, so by the triangle
#   inequality a correct pair stays within ~1 x its floor at every step, even where float32 runs separate O(1)
#   after a few steps; every step is judged.
TRAIN_TOLERANCE = {"float64": 1e-10, "float32": 1e-5}

CATEGORIES = ("batchnorm statistic", "loss", "gradient", "optimizer slot", "weight")

# torch's own optimizers' state names for the quantities Keras's slots hold (same definition, other name).
_TORCH_SLOT_NAMES = {
    "exp_avg": "momentum",
    "exp_avg_sq": "velocity",
    "max_exp_avg_sq": "velocity_hat",
    "square_avg": "velocity",
    "grad_avg": "average_gradient",
}
_KERAS_SLOT_NAMES = ("momentum", "velocity", "velocity_hat", "average_gradient")
# The causes named when no porting bug reproduces the divergence.
UNRECOGNISED = (
    UNKNOWN_CAUSE,
    "the gradients differ while the loss agrees",
    "the optimizer update differs while the gradients agree",
    "the loss differs on the same output",
    "the training-mode forward differs",
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


@dataclass
class StepRow:
    step: int
    learning_rate: float | None
    keras_loss: float
    torch_loss: float
    loss_rel: float
    grad_rel: float
    weight_rel: float
    bn_rel: float
    slot_rel: float | None  # None when the torch optimizer keeps no Keras-comparable slots
    # per kind ("loss", "gradient", ...): the floor of the tensor with the worst error-to-floor ratio, and that ratio
    noise_floor: dict[str, float]
    floor_ratio: dict[str, float]
    ill_conditioned: list[str]  # tensors whose floor alone exceeds the absolute bound
    ok: bool


# --- small helpers ------------------------------------------------------------------------------------


def _numpy(x: object) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _as_array(x: torch.Tensor | np.ndarray | float) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _distance(actual: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    """max |actual - reference| (inf when the shapes differ or either is not finite)."""
    a, r = _as_array(actual), _as_array(reference)
    if a.shape != r.shape:
        return math.inf
    if a.dtype != r.dtype:
        a, r = a.astype(np.float64), r.astype(np.float64)
    if not a.size:
        return 0.0
    diff = float(np.abs(a - r).max())  # numpy on contiguous arrays: the fastest here (memory-bound)
    return diff if math.isfinite(diff) else math.inf


def _scale(reference: torch.Tensor | np.ndarray) -> float:
    """max |reference|, or 1 where that is 0 (the denominator of every error about this tensor)."""
    r = _as_array(reference)
    if not r.size:
        return 1.0
    scale = max(float(r.max()), -float(r.min()))
    return scale if scale > 0 and math.isfinite(scale) else 1.0


def _rel(actual: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    """max |actual - reference| / max |reference| (inf when either is not finite)."""
    return _distance(actual, reference) / _scale(reference)


def _torch_layout(pair: TensorPair, keras_value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pair.to_torch(keras_value))


def _err(actual: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.abs(np.asarray(actual, np.float64) - np.asarray(candidate, np.float64)).max())


def _best_explanation(hypotheses: dict[str, list[Evidence]]) -> str | None:
    """The hypothesis that explains what was seen (``noise_floor.explains``) and leaves the least; None if none.

    Where others explain it too and leave no more than that plus the noise floor, rounding cannot tell them
    apart: all are named ("A, or B (not distinguishable beyond the noise floor)")."""
    explaining = sorted(
        (sum(_err(e.got, e.candidate) / _scale(e.expected) for e in evidence), cause, evidence)
        for cause, evidence in hypotheses.items()
        if explains(*evidence)
    )
    if not explaining:
        return None
    best, cause, evidence = explaining[0]
    margin = sum(e.multiple * e.noise_floor for e in evidence)
    ties = [other for left, other, _ in explaining[1:] if left <= best + margin]
    if not ties:
        return cause
    return f"{cause}, or {', or '.join(ties)} (not distinguishable beyond the noise floor)"


def _model_dtype(keras_model: keras.Model) -> str:
    return keras.backend.standardize_dtype(keras_model.trainable_variables[0].dtype)


def _head_activation(keras_model: keras.Model) -> str | None:
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


def _slot_variables(optimizer: keras.optimizers.Optimizer, variables: Sequence) -> dict[tuple[str, str], object]:
    """(keras variable path, Keras slot name) -> the optimizer's slot variable (named ``{path}_{slot}``)."""
    by_name = {v.name: v for v in optimizer.variables}
    slots = {}
    for variable in variables:
        prefix = variable.path.replace("/", "_") + "_"
        for slot in _KERAS_SLOT_NAMES:
            if prefix + slot in by_name:
                slots[(variable.path, slot)] = by_name[prefix + slot]
    return slots


def _torch_slots(optimizer: object, parameter: torch.Tensor) -> dict[str, torch.Tensor]:
    """The optimizer's state of ``parameter`` under Keras's slot names, where it holds the same quantity."""
    state = getattr(optimizer, "state", {}).get(parameter, {})
    if any(name in state for name in _KERAS_SLOT_NAMES):  # conversion.training's KerasRuleOptimizer
        return {k: v for k, v in state.items() if k in _KERAS_SLOT_NAMES}
    return {_TORCH_SLOT_NAMES[k]: v for k, v in state.items() if k in _TORCH_SLOT_NAMES}


def _learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    return float(_numpy(optimizer.learning_rate))


# --- the Keras side --------------------------------------------------------------------------------


def _keras_state(keras_model: keras.Model, optimizer: keras.optimizers.Optimizer) -> tuple[dict, dict]:
    state = {v.path: _numpy(v) for v in keras_model.weights}
    slots = {key: _numpy(v) for key, v in _slot_variables(optimizer, keras_model.trainable_variables).items()}
    return state, slots


@contextlib.contextmanager
def _recording(keras_model: keras.Model, optimizer: keras.optimizers.Optimizer) -> Iterator[dict]:
    """Wrap ``compute_loss`` and ``apply_gradients`` on the instances to read what ``train_step`` computes."""
    seen: dict = {}
    compute_loss, apply_gradients = keras_model.compute_loss, optimizer.apply_gradients

    def recorded_compute_loss(*args: object, **kwargs: object) -> object:
        loss = compute_loss(*args, **kwargs)
        seen["loss"] = float(_numpy(loss))
        seen["y_pred"] = _numpy(args[2] if len(args) > 2 else kwargs["y_pred"])
        return loss

    def recorded_apply_gradients(grads_and_vars: object) -> object:
        grads_and_vars = list(grads_and_vars)
        seen["grads"] = {v.path: _numpy(g) for g, v in grads_and_vars if g is not None}
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
) -> Iterator[KerasStep]:
    """Yield the state before training (step -1), then what each ``train_on_batch`` did (trains in place)."""
    if keras.backend.backend() != "tensorflow":
        raise ConversionError(
            f"verify --train reads Keras's train_step on TensorFlow; backend is {keras.backend.backend()}"
        )
    with _floatx(_model_dtype(keras_model)):  # so the compiled loss is reported unrounded
        keras_model.compile(optimizer=keras_optimizer, loss=keras_loss, run_eagerly=True)
    if not keras_optimizer.built:
        keras_optimizer.build(keras_model.trainable_variables)
    state, slots = _keras_state(keras_model, keras_optimizer)
    yield KerasStep(-1, None, None, None, {}, state, slots)
    with _recording(keras_model, keras_optimizer) as seen:
        for index, (x, y) in enumerate(batches):
            learning_rate = _learning_rate(keras_optimizer)
            keras_model.train_on_batch(x, y)
            state, slots = _keras_state(keras_model, keras_optimizer)
            yield KerasStep(index, learning_rate, seen["loss"], seen["y_pred"], seen["grads"], state, slots)


# --- the torch side ----------------------------------------------------------------------------------


@dataclass
class _TorchStep:
    loss: float
    output: np.ndarray
    grads: dict[str, torch.Tensor]  # torch path -> gradient (torch layout)
    values_per_channel: dict[str, int]  # BatchNorm module path -> n of its batch statistics


def _torch_step(
    torch_model: nn.Module,
    loss_fn: Callable,
    optimizer: object,
    scheduler: object | None,
    x: torch.Tensor,
    target: torch.Tensor,
    trainable: dict[str, torch.Tensor],
) -> _TorchStep:
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
    return _TorchStep(float(loss.detach()), output.detach().cpu().numpy(), grads, counts)


# --- diagnosis ---------------------------------------------------------------------------------------


def _bn_layers(keras_model: keras.Model) -> dict[str, keras.layers.BatchNormalization]:
    """keras variable path of a moving statistic -> its BatchNormalization layer."""
    layers = {}
    for layer in keras_model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layers[layer.moving_mean.path] = layers[layer.moving_variance.path] = layer
    return layers


def _diagnose_bn(
    pair: TensorPair,
    layer: keras.layers.BatchNormalization,
    prev: KerasStep,
    now: KerasStep,
    torch_state: dict[str, torch.Tensor],
    n: int | None,
    floors: dict[str, float],
    multiple: float,
) -> tuple[str, str]:
    module = pair.path.rpartition(".")[0]
    mean_path, var_path = layer.moving_mean.path, layer.moving_variance.path
    old_mean, old_var = prev.state[mean_path], prev.state[var_path]
    new_mean, new_var = now.state[mean_path], now.state[var_path]
    got_mean = torch_state[f"{module}.running_mean"].detach().cpu().numpy()
    got_var = torch_state[f"{module}.running_var"].detach().cpu().numpy()
    floor_mean, floor_var = floors[f"{module}.running_mean"], floors[f"{module}.running_var"]
    k = float(layer.momentum)
    batch_mean, batch_var = (new_mean - k * old_mean) / (1 - k), (new_var - k * old_var) / (1 - k)
    hypotheses = {
        "torch model left in eval mode while training (frozen BatchNorm: moving statistics never updated and the "
        "forward normalises with them; call model.train())": (old_mean, old_var),
        "BatchNorm momentum passed unconverted (torch momentum must be 1 - Keras momentum; torch got "
        f"{k:g}, the weight Keras gives the OLD statistic)": (
            k * batch_mean + (1 - k) * old_mean,
            k * batch_var + (1 - k) * old_var,
        ),
    }
    if n and n > 1:
        hypotheses[
            "running variance updated with the unbiased batch variance (torch's nn.BatchNorm2d, factor n/(n-1) = "
            f"{n}/{n - 1}); Keras stores the biased one"
        ] = (new_mean, k * old_var + (1 - k) * batch_var * n / (n - 1))
    cause = _best_explanation(
        {
            cause: [
                Evidence(got_mean, new_mean, m, floor_mean, multiple),
                Evidence(got_var, new_var, v, floor_var, multiple),
            ]
            for cause, (m, v) in hypotheses.items()
        }
    )
    if cause is not None:
        return cause, f"recomputing {module}'s update with this convention reproduces torch's statistics"
    return (
        f"{UNKNOWN_CAUSE}: BatchNorm moving statistics updated differently",
        f"no convention reproduces {module}'s statistics (mean: {_rel(got_mean, new_mean):.3g} against a floor of "
        f"{floor_mean:.2g}; variance: {_rel(got_var, new_var):.3g} against {floor_var:.2g})",
    )


def _crossentropy_hypotheses(
    keras_loss: keras.losses.Loss, y_pred: np.ndarray, labels: np.ndarray, head: str | None, keras_value: float
) -> dict[str, float]:
    """Loss values of the classic loss-porting bugs, recomputed from Keras's own y_pred."""
    n = y_pred.shape[0]
    scores = np.asarray(y_pred, np.float64)
    onehot = labels if labels.ndim == 2 else np.eye(scores.shape[-1])[labels]
    shifted = scores - scores.max(axis=-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    ce_of_scores = float(-(onehot * log_softmax).sum(axis=-1).mean())
    out = {
        f"loss summed over the batch instead of averaged (reduction='sum'; the batch has {n} samples)": keras_value * n,
        "loss computed in float32 (Keras computes it in the loss's dtype)": float(np.float32(keras_value)),
    }
    if head == "softmax":
        out["nn.CrossEntropyLoss applied to the softmax output (a double softmax)"] = ce_of_scores
        out["nn.CrossEntropyLoss applied to the softmax output (a double softmax), summed"] = ce_of_scores * n
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            as_probs = float(-(onehot * np.log(np.clip(scores, 1e-7, 1 - 1e-7))).sum(axis=-1).mean())
        out["logits taken as probabilities (from_logits=False on a logits head)"] = as_probs
    return out


def _clip(optimizer: keras.optimizers.Optimizer, g: np.ndarray, global_norm: float) -> np.ndarray:
    """Keras's clipping of one gradient (global_clipnorm needs the norm over all of them)."""
    if optimizer.clipnorm:
        return g * optimizer.clipnorm / max(float(np.sqrt((g * g).sum())), optimizer.clipnorm)
    if optimizer.global_clipnorm:
        return g * optimizer.global_clipnorm / max(global_norm, optimizer.global_clipnorm)
    if optimizer.clipvalue:
        return np.clip(g, -optimizer.clipvalue, optimizer.clipvalue)
    return g


def _keras_rule_step(
    optimizer: keras.optimizers.Optimizer,
    w: np.ndarray,
    g: np.ndarray,
    slots: dict[str, np.ndarray],
    iteration: int,
    **overrides: object,
) -> np.ndarray:
    """One step of Keras's OWN update code (a fresh optimizer of the same config) on one variable."""
    config = optimizer.get_config() | {"clipnorm": None, "global_clipnorm": None, "clipvalue": None} | overrides
    proxy = type(optimizer).from_config(config)
    variable = keras.Variable(w, name="w")
    proxy.build([variable])
    proxy.iterations.assign(iteration)
    for (_, slot), slot_variable in _slot_variables(proxy, [variable]).items():
        if slot in slots:
            slot_variable.assign(slots[slot])
    proxy.apply_gradients([(keras.ops.convert_to_tensor(g), variable)])
    return _numpy(variable)


def _torch_rule_step(
    cls: type, w: np.ndarray, g: np.ndarray, state: dict[str, object], **options: object
) -> np.ndarray:
    """One step of a torch optimizer on one parameter, from the given state."""
    p = nn.Parameter(torch.from_numpy(np.array(w, copy=True)))
    p.grad = torch.from_numpy(np.array(g, copy=True))
    opt = cls([p], **options)
    if state:
        opt.state[p] = {
            k: (torch.from_numpy(np.array(v, copy=True)) if isinstance(v, np.ndarray) else v) for k, v in state.items()
        }
    opt.step()
    return p.detach().numpy()


def _optimizer_hypotheses(
    optimizer: keras.optimizers.Optimizer,
    w: np.ndarray,
    g: np.ndarray,
    slots: dict[str, np.ndarray],
    step: int,
    lr: float,
    lr_prev: float | None,
    global_norm: float,
) -> dict[str, Callable[[], np.ndarray]]:
    """Weights after this step under each classic optimizer-porting bug (computed lazily)."""
    kind = type(optimizer).__name__
    wd = optimizer.weight_decay or 0.0
    clipped = _clip(optimizer, g, global_norm)
    decayed = w - w * wd * lr
    h: dict[str, Callable[[], np.ndarray]] = {}
    clip = optimizer.clipnorm or optimizer.global_clipnorm
    if clip:
        which = "clipnorm" if optimizer.clipnorm else "global_clipnorm"
        h[f"gradients clipped by value (clip_grad_value_ / clipvalue={clip:g}) where Keras clips by norm ({which})"] = (
            lambda: _keras_rule_step(optimizer, w, np.clip(g, -clip, clip), slots, step)
        )
        if optimizer.clipnorm:
            h[
                "gradients clipped by their global norm (clip_grad_norm_ over all parameters) where Keras clips each "
                "variable's norm (clipnorm)"
            ] = lambda: _keras_rule_step(optimizer, w, g * clip / max(global_norm, clip), slots, step)
        else:
            h["gradients clipped per variable where Keras clips the global norm (global_clipnorm)"] = lambda: (
                _keras_rule_step(optimizer, w, g * clip / max(float(np.sqrt((g * g).sum())), clip), slots, step)
            )
    if optimizer.clipvalue or clip:
        h["gradient clipping missing"] = lambda: _keras_rule_step(optimizer, w, g, slots, step)
    if wd:
        h[
            f"weight decay coupled (torch's weight_decay adds wd*w to the gradient, L2) where Keras decays decoupled "
            f"(w -= w*wd*lr, wd={wd:g})"
        ] = lambda: _keras_rule_step(optimizer, w, clipped + wd * w, slots, step, weight_decay=0.0)
        h["weight decay missing"] = lambda: _keras_rule_step(optimizer, w, clipped, slots, step, weight_decay=0.0)
    if kind == "SGD" and optimizer.momentum:
        buffer = {} if step == 0 or not lr_prev else {"momentum_buffer": -slots["momentum"] / lr_prev}
        h[
            "SGD momentum in torch's convention (b = momentum*b + g; w -= lr*b): under a changing learning rate the "
            "velocity keeps the old rate; Keras's m = momentum*m - lr*g does not"
        ] = lambda: _torch_rule_step(
            torch.optim.SGD, decayed, clipped, buffer, lr=lr, momentum=optimizer.momentum, nesterov=optimizer.nesterov
        )
    if kind in ("Adam", "AdamW"):
        state = {"step": torch.tensor(float(step)), "exp_avg": slots["momentum"], "exp_avg_sq": slots["velocity"]}
        if optimizer.amsgrad:
            state["max_exp_avg_sq"] = slots["velocity_hat"]
        options = dict(lr=lr, betas=(optimizer.beta_1, optimizer.beta_2), amsgrad=optimizer.amsgrad)
        h[
            "Adam epsilon in torch's form and value (torch.optim.Adam: m_hat / (sqrt(v_hat) + 1e-8)); Keras divides by "
            f"sqrt(v) + {optimizer.epsilon:g} with the bias correction folded into the step size"
        ] = lambda: _torch_rule_step(torch.optim.AdamW, w, clipped, state, eps=1e-8, weight_decay=wd, **options)
        h[
            "Adam epsilon in torch's form (m_hat / (sqrt(v_hat) + eps)); Keras divides by sqrt(v) + epsilon with the "
            "bias correction folded into the step size"
        ] = lambda: _torch_rule_step(
            torch.optim.AdamW, w, clipped, state, eps=optimizer.epsilon, weight_decay=wd, **options
        )
        if wd:
            h["torch.optim.Adam's weight_decay (L2, coupled) and torch's epsilon; Keras decays decoupled"] = lambda: (
                _torch_rule_step(torch.optim.Adam, w, clipped, state, eps=1e-8, weight_decay=wd, **options)
            )
    if kind == "RMSprop":
        # torch creates all of its state at once: give it all (Keras's slots start at zero too)
        state = {"step": torch.tensor(float(step)), "square_avg": slots["velocity"]}
        if optimizer.centered:
            state["grad_avg"] = slots["average_gradient"]
        if optimizer.momentum:
            state["momentum_buffer"] = slots["momentum"] / lr_prev if step > 0 and lr_prev else 0 * w
        options = dict(lr=lr, alpha=optimizer.rho, momentum=optimizer.momentum, centered=optimizer.centered)
        for eps in dict.fromkeys((optimizer.epsilon, 1e-8)):
            h[
                f"RMSprop epsilon outside the square root (torch: sqrt(v) + eps, eps={eps:g}); Keras: sqrt(v + epsilon)"
            ] = lambda eps=eps: _torch_rule_step(torch.optim.RMSprop, decayed, clipped, state, eps=eps, **options)
    return h


def _diagnose_optimizer(
    optimizer: keras.optimizers.Optimizer,
    pair: TensorPair,
    prev: KerasStep,
    now: KerasStep,
    torch_weight: np.ndarray,
    floor: float,
    multiple: float,
) -> tuple[str, str]:
    path = pair.keras_variable.path
    w, g, got, expected = prev.state[path], now.grads[path], torch_weight, now.state[path]
    slots = {slot: value for (owner, slot), value in prev.slots.items() if owner == path}
    global_norm = float(np.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in now.grads.values())))
    hypotheses = _optimizer_hypotheses(
        optimizer, w, g, slots, now.step, now.learning_rate, prev.learning_rate, global_norm
    )
    evidence = {cause: [Evidence(got, expected, compute(), floor, multiple)] for cause, compute in hypotheses.items()}
    delta_keras, delta_torch = expected - w, got - w
    norm = float((delta_keras * delta_keras).sum())
    if norm > 0:  # the same update, scaled: another learning rate
        c = float((delta_torch * delta_keras).sum()) / norm
        if abs(c - 1) > 1e-6:
            cause = (
                f"learning rate differs: torch's step is {c:.4g} x Keras's (Keras used {now.learning_rate:.6g} at "
                f"step {now.step})"
            )
            evidence[cause] = [Evidence(got, expected, w + c * delta_keras, floor, multiple)]
    cause = _best_explanation(evidence)
    if cause is not None:
        return cause, f"recomputing step {now.step} of {pair.path} with this bug reproduces torch's weights"
    return (
        f"{UNKNOWN_CAUSE}: the optimizer update differs while the gradients agree: compare the update rule, "
        f"epsilon, weight decay, clipping and the learning rate (Keras used {now.learning_rate:.6g} at step "
        f"{now.step})",
        f"no known optimizer-porting bug reproduces torch's weights ({_rel(got, expected):.3g} against a floor of "
        f"{floor:.2g})",
    )


# --- the engine ----------------------------------------------------------------------------------------


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
            pairs.append(TensorPair(p.path, p.keras_variable, tensors[p.path], p.to_torch, p.to_keras))
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

    kind: str  # one of CATEGORIES
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
        rng = np.random.default_rng(seed)
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                if tensor.is_floating_point():
                    tensor.copy_(torch.from_numpy(one_ulp_apart(tensor.detach().cpu().numpy(), rng)))
    loss = side.loss
    if isinstance(loss, training.TorchLoss):
        loss = dataclasses.replace(loss, dtype=torch.float64)
    tensors = dict(model.named_parameters())
    return _TorchSide(model, loss, optimizer, scheduler, {path: tensors[path] for path in side.params})


def _optimizer_like(optimizer: keras.optimizers.Optimizer, model: keras.Model) -> keras.optimizers.Optimizer:
    """A new Keras optimizer of ``optimizer``'s config for ``model``, holding its state where it has any."""
    clone = type(optimizer).from_config(optimizer.get_config())
    if optimizer.built and int(_numpy(optimizer.iterations)) > 0:
        clone.build(model.trainable_variables)
        for source, target in zip(optimizer.variables, clone.variables, strict=True):
            target.assign(np.asarray(_numpy(source)).astype(keras.backend.standardize_dtype(target.dtype)))
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
    return twin, keras_steps(twin, floor_batches, _optimizer_like(optimizer, twin), floor_loss), paths


def _keras_floor(now: KerasStep, floor_now: KerasStep, paths: dict[str, str]) -> dict[tuple, float]:
    """Keras's side of every tensor's floor at this step: max |run - floor twin's run| / max |run|."""
    floor = {
        ("loss",): abs(now.loss - floor_now.loss) / (abs(now.loss) or 1.0),
        ("y_pred",): _distance(now.y_pred, floor_now.y_pred) / _scale(now.y_pred),
    }
    for path, value in now.state.items():
        floor[("state", path)] = _distance(value, floor_now.state[paths[path]]) / _scale(value)
    for path, value in now.grads.items():
        floor[("grad", path)] = _distance(value, floor_now.grads[paths[path]]) / _scale(value)
    for (path, slot), value in now.slots.items():
        floor[("slot", path, slot)] = _distance(value, floor_now.slots[(paths[path], slot)]) / _scale(value)
    return floor


def _compare_step(
    now: KerasStep,
    t: _TorchStep,
    t_floor: _TorchStep,
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
        scale = _scale(expected)
        error = _distance(actual, expected) / scale
        floor = keras_floor + _distance(actual, floor_actual) / scale
        verdicts.append(_TensorVerdict(kind, torch_name, keras_name, judge(error, floor, tolerance, multiple)))

    for p in statistics:
        kpath = p.keras_variable.path
        expected = _torch_layout(p, now.state[kpath])
        check("batchnorm statistic", p.path, kpath, tensors[p.path], floor_tensors[p.path], expected,
              now.floor[("state", kpath)])  # fmt: skip
    check("loss", "loss", "loss", np.float64(t.loss), np.float64(t_floor.loss), np.float64(now.loss),
          now.floor[("loss",)])  # fmt: skip
    for path, p in trainable.items():
        kpath = p.keras_variable.path
        expected = _torch_layout(p, now.grads.get(kpath, 0 * now.state[kpath]))
        check(
            "gradient", path, kpath, t.grads[path], t_floor.grads[path], expected, now.floor.get(("grad", kpath), 0.0)
        )
    compared_slots = 0
    for path, p in trainable.items():
        kpath = p.keras_variable.path
        floor_slots = _torch_slots(floor_side.optimizer, floor_side.params[path])
        for slot, value in _torch_slots(side.optimizer, side.params[path]).items():
            if (kpath, slot) in now.slots:
                compared_slots += 1
                expected = _torch_layout(p, now.slots[(kpath, slot)])
                floor_value = floor_slots.get(slot, value * math.inf)  # no such slot in the floor twin: no floor
                check("optimizer slot", f"{path} [{slot}]", f"{kpath}_{slot}", value, floor_value, expected,
                      now.floor[("slot", kpath, slot)])  # fmt: skip
    for path, p in trainable.items():
        kpath = p.keras_variable.path
        expected = _torch_layout(p, now.state[kpath])
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
    *,
    steps: int | None = None,
    keras_optimizer: keras.optimizers.Optimizer | None = None,
    keras_loss: object | None = None,
    torch_optimizer: object | None = None,
    torch_loss: Callable | None = None,
    torch_scheduler: object | None = None,
    tolerance: float | None = None,
    reference: KerasRun | None = None,
    record: KerasRun | None = None,
    keep_steps: int = 0,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Train both twins on the same batches, compare every tensor after every step; returns the report.

    Both models are trained IN PLACE. ``images`` is (K, N, H, W, C) with ``labels`` (K, N), or one batch reused.
    Each side also trains its floor twin (``conversion.noise_floor``: float64 for a float32 model, one ulp apart
    for a float64 one) on the floor images, and every tensor is judged against its floor.

    Args:
        keras_optimizer / keras_loss: Keras's; default the model's compiled ones, else Nesterov SGD and sparse
            categorical crossentropy. The loss is made in the model's dtype.
        torch_optimizer / torch_loss / torch_scheduler: a ready torch side (to plant a porting bug); default
            ``conversion.training.torch_optimizer`` and ``torch_loss`` of Keras's, no scheduler (the Keras rule
            carries the schedule). ``torch_scheduler.step()`` runs after each optimizer step.
        tolerance: the absolute bound (default TRAIN_TOLERANCE of the model's dtype).
        reference: a ``KerasRun`` recorded earlier from the same initial state: Keras is not run again (its
            steps carry Keras's side of the floors).
        record: a ``KerasRun`` to fill with this run's initial state and first ``keep_steps`` Keras steps.
        seed: draws the one-ulp moves of a float64 floor twin.
        progress: called with the number of steps done.
    """
    dtype = _model_dtype(keras_model)
    tolerance = TRAIN_TOLERANCE.get(dtype, TRAIN_TOLERANCE["float32"]) if tolerance is None else tolerance
    multiple = floor_multiple(dtype)
    if reference is not None:
        keras_optimizer, keras_loss = reference.optimizer, reference.loss
    else:
        keras_optimizer = keras_optimizer or getattr(keras_model, "optimizer", None) or default_optimizer("nesterov")
        keras_loss = keras_loss or getattr(keras_model, "loss", None) or "sparse_categorical_crossentropy"
        keras_loss = training.keras_loss_with_dtype(keras_loss, dtype)
    batches = _batches(images, labels, steps)
    head = _head_activation(keras_model)
    classes = int(keras_model.outputs[0].shape[-1]) if keras_model.outputs else torch_model.num_classes
    batches = [(x, _targets(keras_loss, y, classes, dtype)) for x, y in batches]
    floor_batches = [(floor_images(x, seed + 1 + index), y) for index, (x, y) in enumerate(batches)]

    pairs = _pairs(keras_model, torch_model)
    trainable = {p.path: p for p in pairs if p.keras_variable.trainable}
    statistics = [p for p in pairs if not p.keras_variable.trainable]
    bn_layers = _bn_layers(keras_model)
    if torch_loss is None:
        torch_loss = training.torch_loss(keras_loss, output_activation=head)
    if torch_optimizer is None:
        torch_optimizer = training.torch_optimizer(keras_optimizer, torch_model)
    device = next(torch_model.parameters()).device

    continuing = reference is None and int(_numpy(keras_optimizer.iterations)) > 0
    if continuing and isinstance(torch_optimizer, training.KerasRuleOptimizer):
        training.optimizer_state_to_torch(keras_optimizer, torch_optimizer, pairs)  # a run that continues
    side = _TorchSide(
        torch_model,
        torch_loss,
        torch_optimizer,
        torch_scheduler,
        {path: p.torch_tensor for path, p in trainable.items()},
    )
    floor_side = _torch_floor_side(side, seed)
    if reference is not None:
        keras_iter: Iterator[KerasStep] = iter([reference.initial, *reference.steps[: len(batches)]])
        keras_floor, floor_iter, floor_paths = None, None, {}
    else:
        keras_floor, floor_iter, floor_paths = _keras_floor_steps(
            keras_model, floor_batches, keras_optimizer, keras_loss, seed
        )
        next(floor_iter)  # the floor twin's initial state
        keras_iter = keras_steps(keras_model, batches, keras_optimizer, keras_loss)
    prev = next(keras_iter)
    if record is not None:
        record.optimizer, record.loss, record.initial = keras_optimizer, keras_loss, prev

    torch_model.train()
    floor_side.model.train()
    rows: list[StepRow] = []
    first: dict | None = None
    diagnosis: dict | None = None
    for index, ((x, y), (x_floor, _)) in enumerate(zip(batches, floor_batches, strict=True)):
        now = next(keras_iter, None)
        if now is None:
            raise InputError(f"the Keras reference has {index} steps; {len(batches)} were asked")
        if floor_iter is not None:
            now.floor = _keras_floor(now, next(floor_iter), floor_paths)
        if record is not None and index < keep_steps:
            record.steps.append(now)
        yt = torch.from_numpy(np.asarray(y)).to(device)
        t = _torch_step(torch_model, torch_loss, torch_optimizer, torch_scheduler,
                        torch.from_numpy(nhwc_to_nchw(x)).to(device), yt, side.params)  # fmt: skip
        floor_y = yt.double() if yt.is_floating_point() else yt
        x_floor = torch.from_numpy(nhwc_to_nchw(x_floor)).to(device)
        t_floor = _torch_step(floor_side.model, floor_side.loss, floor_side.optimizer, floor_side.scheduler,
                              x_floor, floor_y, floor_side.params)  # fmt: skip

        verdicts, compared_slots = _compare_step(
            now, t, t_floor, side, floor_side, trainable, statistics, tolerance, multiple
        )
        summaries = {kind: _kind_summary(verdicts, kind) for kind in CATEGORIES}
        found = [v for v in verdicts if not v.judgement.ok]
        row = StepRow(
            index,
            now.learning_rate,
            now.loss,
            t.loss,
            summaries["loss"][0],
            summaries["gradient"][0],
            summaries["weight"][0],
            summaries["batchnorm statistic"][0] or 0.0,
            summaries["optimizer slot"][0] if compared_slots else None,
            {kind: summary[1] for kind, summary in summaries.items() if summary[1] is not None},
            {kind: summary[2] for kind, summary in summaries.items() if summary[2] is not None},
            [v.torch for v in verdicts if v.judgement.ill_conditioned],
            not found,
        )
        rows.append(row)
        if found and first is None:
            worst = min(found, key=lambda v: CATEGORIES.index(v.kind))
            first = {
                "step": index,
                "kind": worst.kind,
                "torch": worst.torch,
                "keras": worst.keras,
                "max_rel": worst.judgement.error,
                "noise_floor": worst.judgement.noise_floor,
                "floor_ratio": worst.judgement.floor_ratio,
            }
            floors = {(v.kind, v.torch): v.judgement.noise_floor for v in verdicts}
            failing = {(v.kind, v.torch) for v in found}
            context = _TrainDiagnosis(
                keras_model, keras_optimizer, keras_loss, head, pairs, bn_layers, prev, now, t, t_floor,
                side.tensors(), np.asarray(y), tolerance, multiple, floors, failing,
            )  # fmt: skip
            cause, evidence = _diagnose(worst.kind, worst.torch, context)
            if dtype != "float64" and cause.startswith(UNRECOGNISED):
                cause += (
                    f"; no porting bug reproduces it in {dtype}, where rounding grows with every step: rerun with "
                    "--dtype float64 to tell a porting bug from rounding"
                )
            diagnosis = {"cause": cause, "evidence": evidence}
        prev = now
        if progress is not None:
            progress(index + 1)

    top1 = None
    if reference is None:
        top1 = _top1(keras_model, torch_model, keras_floor, floor_side.model, batches, floor_batches, device)
    torch_model.eval()
    return {
        "agree": first is None and (top1 is None or top1["agree"]),
        "reference": "keras",
        "dtype": dtype,
        "tolerance": tolerance,
        "floor_multiple": multiple,
        "metric": "max |torch - keras| / max |keras| per tensor (the loss: |torch - keras| / |keras|), worst per step",
        "noise_floor_method": (
            "each side against its own float64 run (same weights and images in float64)"
            if dtype == "float32"
            else "each side against its own run with every weight and image element one ulp apart"
        ),
        "judged_steps": "all",
        "batch": int(batches[0][0].shape[0]),
        "size": [int(batches[0][0].shape[1]), int(batches[0][0].shape[2])],
        "steps": len(batches),
        "keras_optimizer": _describe_optimizer(keras_optimizer),
        "torch_optimizer": type(torch_optimizer).__name__,
        "loss": torch_loss.describe(dtype) if isinstance(torch_loss, training.TorchLoss) else repr(torch_loss),
        "keras_gradients": "read from train_on_batch (run eagerly): the gradients train_step hands to apply_gradients",
        "rows": [asdict(row) for row in rows],
        "worst": {
            name: max((r[key] for r in map(asdict, rows) if r[key] is not None), default=None)
            for name, key in (
                ("loss", "loss_rel"),
                ("gradient", "grad_rel"),
                ("weight", "weight_rel"),
                ("batchnorm statistic", "bn_rel"),
                ("optimizer slot", "slot_rel"),
            )
        },
        "worst_floor_ratio": {
            kind: max((row.floor_ratio[kind] for row in rows if kind in row.floor_ratio), default=None)
            for kind in CATEGORIES
        },
        "top1_after_training": top1,
        "first_divergent_step": None if first is None else first["step"],
        "first_divergent_tensor": first,
        "diagnosis": diagnosis,
    }


def _describe_optimizer(optimizer: keras.optimizers.Optimizer) -> str:
    try:
        return training.keras_rule(optimizer).describe()
    except ConversionError:
        return type(optimizer).__name__


@dataclass
class _TrainDiagnosis:
    """What the diagnosis of a training divergence needs: both sides at the step, and every tensor's floor."""

    keras_model: keras.Model
    optimizer: keras.optimizers.Optimizer
    keras_loss: keras.losses.Loss
    head: str | None
    pairs: list[TensorPair]
    bn_layers: dict
    prev: KerasStep
    now: KerasStep
    t: _TorchStep
    t_floor: _TorchStep
    tensors: dict[str, torch.Tensor]
    labels: np.ndarray
    tolerance: float
    multiple: float  # FLOOR_MULTIPLE of the compared dtype
    floors: dict[tuple[str, str], float]  # (kind, torch name) -> the noise floor it was judged against
    failing: set[tuple[str, str]]  # (kind, torch name) of the tensors beyond their floor and bound at this step


def _diagnose(category: str, torch_path: str, c: _TrainDiagnosis) -> tuple[str, str]:
    """The likely cause of the first divergence, by recomputing the classic porting bugs."""
    by_path = {p.path: p for p in c.pairs}
    now, t = c.now, c.t
    if category == "batchnorm statistic":
        pair = by_path[torch_path]
        n = t.values_per_channel.get(torch_path.rpartition(".")[0])
        floors = {name: floor for (kind, name), floor in c.floors.items() if kind == category}
        layer = c.bn_layers[pair.keras_variable.path]
        return _diagnose_bn(pair, layer, c.prev, now, c.tensors, n, floors, c.multiple)
    if category == "loss":
        scale = _scale(now.y_pred)
        output_floor = now.floor.get(("y_pred",), 0.0) + _distance(t.output, c.t_floor.output) / scale
        forward = judge(_rel(t.output, now.y_pred), output_floor, c.tolerance, c.multiple)
        if not forward.ok:
            return (
                "the training-mode forward differs (torch's output is not Keras's y_pred)",
                f"output max rel err {forward.error:.3g}, {forward.floor_ratio:.3g} x its noise floor; run "
                "`resnet34-parity verify` on these weights",
            )
        hypotheses = _crossentropy_hypotheses(c.keras_loss, now.y_pred, c.labels, c.head, now.loss)
        floor = c.floors[("loss", "loss")]
        cause = _best_explanation(
            {cause: [Evidence(np.float64(t.loss), np.float64(now.loss), np.float64(value), floor, c.multiple)]
             for cause, value in hypotheses.items()}
        )  # fmt: skip
        if cause is not None:
            return cause, f"recomputed from Keras's y_pred: {t.loss:.10g} (torch) vs {now.loss:.10g} (Keras)"
        return (
            f"{UNKNOWN_CAUSE}: the loss differs on the same output: compare the loss function",
            f"{t.loss!r} vs {now.loss!r} (noise floor {floor:.2g})",
        )
    if category == "gradient":
        keras_grads = {p: by_path[p].to_torch(now.grads[by_path[p].keras_variable.path]) for p in t.grads}
        dot = sum(
            float((torch.from_numpy(np.ascontiguousarray(k)) * t.grads[p].cpu()).sum()) for p, k in keras_grads.items()
        )
        norm = sum(float((k.astype(np.float64) ** 2).sum()) for k in keras_grads.values())
        scale = dot / norm if norm else math.nan
        if math.isfinite(scale):
            evidence = [
                Evidence(_as_array(t.grads[p]), k, scale * k, c.floors[("gradient", p)], c.multiple)
                for p, k in keras_grads.items()
            ]
            if explains(*evidence):
                batch = len(c.labels)
                why = " (the batch size: the loss summed, not averaged)" if abs(scale - batch) < 1e-6 * batch else ""
                return f"gradients scaled by {scale:.6g}{why}", "every torch gradient is a constant multiple of Keras's"
        return (
            f"{UNKNOWN_CAUSE}: the gradients differ while the loss agrees: the backward differs (a custom autograd "
            "function, a detached tensor, or a layer whose training-mode forward differs)",
            f"first differing gradient: {torch_path}",
        )
    path = torch_path.split(" ")[0]  # an optimizer slot: "path [slot]"
    if ("gradient", path) in c.failing:
        return "the gradients differ (see the gradient rows)", f"{path}'s gradient differs too"
    pair = by_path[path]
    weight = pair.to_keras(c.tensors[path].detach().cpu().numpy())
    return _diagnose_optimizer(c.optimizer, pair, c.prev, now, weight, c.floors[("weight", path)], c.multiple)


def _top1(
    keras_model: keras.Model,
    torch_model: nn.Module,
    keras_floor: keras.Model,
    torch_floor: nn.Module,
    batches: list[tuple[np.ndarray, np.ndarray]],
    floor_batches: list[tuple[np.ndarray, np.ndarray]],
    device: torch.device,
) -> dict:
    """Inference-mode top-1 of every sample after training, in both, and in both floor twins.

    A sample whose class differs between the two counts only where neither side's floor twin flips it too:
    where rounding alone changes a side's answer, that answer is not the implementations' to agree on.
    """

    def keras_top(model: keras.Model, x: np.ndarray) -> np.ndarray:
        return np.argmax(_numpy(model(x, training=False)), axis=-1)

    def torch_top(model: nn.Module, x: np.ndarray) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            return model(torch.from_numpy(nhwc_to_nchw(x)).to(device)).argmax(-1).cpu().numpy()

    seen, tops = set(), []
    for (x, _), (x_floor, _) in zip(batches, floor_batches, strict=True):
        if id(x) in seen:
            continue
        seen.add(id(x))
        tops.append(
            (keras_top(keras_model, x), torch_top(torch_model, x), keras_top(keras_floor, x_floor),
             torch_top(torch_floor, x_floor))
        )  # fmt: skip
    k, t, kf, tf = (np.concatenate(column) for column in zip(*tops, strict=True))
    differ = k != t
    beyond_floor = differ & (k == kf) & (t == tf)
    return {
        "agree": not bool(beyond_floor.any()),
        "samples": int(k.size),
        "differ": int(differ.sum()),
        "differ_beyond_floor": int(beyond_floor.sum()),
    }


# --- defaults and the command ------------------------------------------------------------------------------


def default_optimizer(
    name: str, learning_rate: float | None = None, weight_decay: float | None = DEFAULT_WEIGHT_DECAY, steps: int = 10
) -> keras.optimizers.Optimizer:
    """The Keras optimizer ``verify --train --optimizer NAME`` uses, with a schedule that moves every step.

    sgd / nesterov: momentum 0.9, ExponentialDecay(lr, decay_steps=1, decay_rate=0.9); adam / adamw:
    CosineDecay(lr, decay_steps=steps); rmsprop: centered, momentum 0.9, ExponentialDecay as SGD's.
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
    rate = schedules.ExponentialDecay(lr, decay_steps=1, decay_rate=0.9)
    return keras.optimizers.RMSprop(rate, momentum=0.9, centered=True, weight_decay=wd)


def _train_models(args: argparse.Namespace) -> tuple[keras.Model, nn.Module, str | None]:
    """The Keras model that trains as the reference, its torch side, and what was cast for --dtype (or None)."""
    from conversion.files import load_keras, load_torch

    if getattr(args, "onnx", None):
        raise InputError("--train compares training steps; an ONNX file has none (drop --onnx)")
    if args.keras:
        keras_model = load_keras(args.keras, args.classifier_activation)
        torch_model = (
            load_torch(args.torch, _head_activation(keras_model)) if args.torch else keras_to_torch(keras_model)
        )
        stored = _model_dtype(keras_model)
        if args.dtype is None or args.dtype == stored:
            return keras_model, torch_model, None
        if args.dtype != "float64":
            raise InputError(f"--dtype {args.dtype}: a file's weights are cast only to float64 (widening is exact)")
        cast = keras_clone(keras_model, args.dtype)
        compiled = getattr(keras_model, "optimizer", None)
        if compiled is not None:  # the file's own optimizer (and its state) and loss, for the float64 model
            cast.compile(optimizer=_optimizer_like(compiled, cast), loss=keras_model.loss)
        return cast, torch_model.double(), f"the files' {stored} weights cast to {args.dtype} for the comparison"
    if args.torch:
        raise InputError("--train needs --keras (the reference it trains); --torch alone has no Keras optimizer")
    from conversion.hostile import randomize_weights

    keras_model = keras_impl.build_resnet34(10, (None, None, 3), args.classifier_activation, args.dtype or "float32")
    randomize_weights(keras_model, args.seed)
    return keras_model, keras_to_torch(keras_model), None


def _train_data(args: argparse.Namespace, keras_model: keras.Model) -> tuple[np.ndarray, np.ndarray]:
    dtype = _model_dtype(keras_model)
    classes = int(keras_model.outputs[0].shape[-1])
    _, height, width, channels = keras_model.input_shape
    size = DEFAULT_TRAIN_SIZE if args.size is None else tuple(args.size)
    batch = DEFAULT_TRAIN_BATCH if args.batch is None else args.batch
    if (height, width) != (None, None):
        size = (height, width)
    rng = np.random.default_rng(args.seed + 2)
    if args.images:
        from conversion.arrays import check_images

        try:
            images = np.load(args.images, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise InputError(f"{args.images}: not a readable .npy array of images ({error})") from None
        images = check_images(images, channels, min_size=2)
        if images.dtype != dtype:
            if images.dtype == np.float64:
                raise InputError(f"expected {dtype} images for a {dtype} model; received {images.dtype}")
            images = images.astype(dtype)  # float32 images for a float64 comparison: widening is exact
        return images, rng.integers(0, classes, images.shape[0])  # the same batch every step
    images = np.stack(
        [seeded_images(batch, *size, channels, seed=args.seed + 1 + k, dtype=dtype) for k in range(args.steps)]
    )
    return images, rng.integers(0, classes, (args.steps, batch))


def run_train_command(args: argparse.Namespace) -> int:
    """``resnet34-parity verify --train``: 0 when every step agrees, 1 when not (bad input raises UserInputError)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if args.steps < 1:
        raise InputError(f"--steps must be a positive integer; received {args.steps}")
    for flag, value in (("--learning-rate", args.learning_rate), ("--weight-decay", args.weight_decay)):
        if value is not None and (not math.isfinite(value) or value < 0 or (flag == "--learning-rate" and value == 0)):
            raise InputError(f"{flag} must be a finite positive number; received {value}")
    console = Console(stderr=True)
    with console.status("building the models...", spinner="dots"):
        keras_model, torch_model, cast = _train_models(args)
        images, labels = _train_data(args, keras_model)
    compiled = getattr(keras_model, "optimizer", None)
    if args.optimizer is None and compiled is not None and (args.learning_rate or args.weight_decay is not None):
        raise InputError(
            "--learning-rate/--weight-decay set up --optimizer; the model's compiled optimizer is used as saved"
        )
    optimizer = (
        default_optimizer(
            args.optimizer or "nesterov",
            args.learning_rate,
            DEFAULT_WEIGHT_DECAY if args.weight_decay is None else args.weight_decay,
            args.steps,
        )
        if args.optimizer or compiled is None
        else compiled
    )
    try:
        training.keras_rule(optimizer)  # refuse an untranslatable optimizer before any work
    except ConversionError as error:
        raise ConversionError(f"verify --train: {error}") from None
    with Progress(
        TextColumn("training both twins"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task("steps", total=args.steps)
        report = verify_training(
            keras_model,
            torch_model,
            images,
            labels,
            steps=args.steps,
            keras_optimizer=optimizer,
            keras_loss=getattr(keras_model, "loss", None),
            seed=args.seed,
            progress=lambda done: bar.update(task, completed=done),
        )
    report["cast"] = cast
    if args.json:
        json.dump(report, sys.stdout, indent=2, allow_nan=True)
        print()
    else:
        _print_report(report)
    return 0 if report["agree"] else 1


def _kind_cell(row: dict, key: str, kind: str) -> str:
    """'error (ratio x)' for one tensor kind of one step."""
    if row[key] is None:
        return "n/a"
    ratio = row["floor_ratio"].get(kind)
    return f"{row[key]:.1e} ({ratio:.2g}x)" if ratio is not None else f"{row[key]:.1e}"


def _print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cast = f", {report['cast']}" if report.get("cast") else ""
    table = Table(
        title=f"Training step by step against Keras ({report['dtype']}{cast}, bound {report['tolerance']:g} or "
        f"{report['floor_multiple']:g} x the noise floor, batch {report['batch']}, "
        f"{report['size'][0]}x{report['size'][1]}): max rel err (its ratio to the noise floor)",
        caption=f"{report['keras_optimizer']} | loss: {report['loss']}",
    )
    for column in ("step", "lr", "keras loss", "loss", "grads", "weights", "BN stats", "slots", ""):
        table.add_column(column, justify="right")
    for r in report["rows"]:
        verdict = "ok" if r["ok"] else "[red]DIVERGES[/red]"
        if r["ill_conditioned"]:
            verdict += f" [yellow]({len(r['ill_conditioned'])} ill-conditioned)[/yellow]"
        table.add_row(
            str(r["step"]),
            f"{r['learning_rate']:.4g}" if r["learning_rate"] is not None else "",
            f"{r['keras_loss']:.10g}",
            _kind_cell(r, "loss_rel", "loss"),
            _kind_cell(r, "grad_rel", "gradient"),
            _kind_cell(r, "weight_rel", "weight"),
            _kind_cell(r, "bn_rel", "batchnorm statistic"),
            _kind_cell(r, "slot_rel", "optimizer slot"),
            verdict,
        )
    console = Console()
    console.print(table)
    top1 = report["top1_after_training"]
    if top1:
        console.print(
            f"top-1 after training: {top1['samples'] - top1['differ']}/{top1['samples']} samples agree"
            + (
                f" ({top1['differ'] - top1['differ_beyond_floor']} of the others flip in a floor twin too: rounding)"
                if top1["differ"] > top1["differ_beyond_floor"]
                else ""
            )
        )
    if report["agree"]:
        keys = ("loss_rel", "grad_rel", "weight_rel", "bn_rel", "slot_rel")
        worst = max(r[k] for r in report["rows"] for k in keys if r[k] is not None)
        ratio = max((v for v in report["worst_floor_ratio"].values() if v is not None), default=0.0)
        console.print(
            f"[green]AGREE[/green]: every step matches Keras; worst max relative error {worst:.2e} (bound "
            f"{report['tolerance']:g}), worst ratio to the noise floor {ratio:.2g} (limit {report['floor_multiple']:g})"
        )
    else:
        first, d = report["first_divergent_tensor"], report["diagnosis"] or {}
        where = (
            f"first divergent tensor at step {first['step']}: {first['kind']} {first['torch']} "
            f"(Keras {first['keras']}), max rel err {first['max_rel']:.3g}, {first['floor_ratio']:.3g} x its noise "
            f"floor {first['noise_floor']:.2g}"
            if first
            else "the top-1 predictions differ after training, beyond what rounding flips"
        )
        console.print(f"[red]DISAGREE[/red]: {where}" + (f": likely cause: {d['cause']}" if d.get("cause") else ""))
