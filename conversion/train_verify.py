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
from conversion.weights import TensorPair, keras_to_torch, paired_tensors

# Max relative error allowed per tensor and step, measured with `resnet34-parity verify --train --json --dtype D
# --optimizer X` (X = nesterov, adam, adamw, rmsprop; their schedules; hostile weights, batch 4 of 45x38):
# - float64, every step is judged: worst after 10 steps 3.5e-11 (RMSprop/Adam: 3e-11 / 1.3e-11; Nesterov SGD
#   1.3e-12 on gradients, 5.6e-14 on weights), from ~6e-14 at step 0: the errors grow with the steps because
#   training-mode BatchNorm over few values per channel (16 in the last stage) and optimizers dividing by
#   sqrt(v) amplify each step's rounding. 1e-10 keeps a ~3x margin over the worst.
# - float32, only step 0 is judged (both start from the same weights, so it measures the implementations):
#   worst 7.5e-3 (RMSprop's momentum slot; Adam's weights 1.2e-3: dividing by sqrt(v + eps) turns a gradient's
#   rounding error near zero into up to lr / sqrt(eps) of update). From there the float32 runs separate:
#   gradients differ O(1) by step 3-5 at any learning rate tried (1e-4 to 2e-3), the same amplification float64
#   shows from 1e-14. Later float32 steps are reported, not judged; the top-1 after training is judged.
TRAIN_TOLERANCE = {"float64": 1e-10, "float32": 5e-2}

# A hypothesis is the cause when it explains >= 95% of the discrepancy (its error <= 5% of Keras's).
EXPLAINED = 0.05

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
    "the gradients differ while the loss agrees",
    "the optimizer update differs while the gradients agree",
    "BatchNorm moving statistics updated differently",
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
    ok: bool | None  # None: reported, not judged (float32 after step 0)


# --- small helpers ------------------------------------------------------------------------------------


def _numpy(x: object) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _rel(actual: torch.Tensor | np.ndarray, reference: np.ndarray) -> float:
    """max |actual - reference| / max |reference| (inf when either is not finite)."""
    a = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    r = np.asarray(reference)
    if a.shape != r.shape:
        return math.inf
    if a.dtype != r.dtype:
        a, r = a.astype(np.float64), r.astype(np.float64)
    if not a.size:
        return 0.0
    diff = float(np.abs(a - r).max())  # numpy on contiguous arrays: the fastest here (memory-bound)
    if not math.isfinite(diff):
        return math.inf
    scale = max(float(r.max()), -float(r.min()))
    return diff / (scale if scale > 0 else 1.0)


def _torch_layout(pair: TensorPair, keras_value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pair.to_torch(keras_value))


def _err(actual: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.abs(np.asarray(actual, np.float64) - np.asarray(candidate, np.float64)).max())


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
) -> tuple[str, str]:
    module = pair.path.rpartition(".")[0]
    mean_path, var_path = layer.moving_mean.path, layer.moving_variance.path
    old_mean, old_var = prev.state[mean_path], prev.state[var_path]
    new_mean, new_var = now.state[mean_path], now.state[var_path]
    got_mean = torch_state[f"{module}.running_mean"].detach().cpu().numpy()
    got_var = torch_state[f"{module}.running_var"].detach().cpu().numpy()
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
    base = _err(got_mean, new_mean) + _err(got_var, new_var)
    scored = [
        (_err(got_mean, m) + _err(got_var, v), cause)
        for cause, (m, v) in hypotheses.items()
        if _err(m, new_mean) + _err(v, new_var) > 0
    ]
    best = min(scored, default=(math.inf, ""))
    if best[0] <= EXPLAINED * base:
        return best[1], f"recomputing {module}'s update with this convention reproduces torch's statistics"
    return "BatchNorm moving statistics updated differently", f"no convention reproduces {module}'s statistics"


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
) -> tuple[str, str]:
    path = pair.keras_variable.path
    w, g, got, expected = prev.state[path], now.grads[path], torch_weight, now.state[path]
    slots = {slot: value for (owner, slot), value in prev.slots.items() if owner == path}
    global_norm = float(np.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in now.grads.values())))
    base = _err(got, expected)
    hypotheses = _optimizer_hypotheses(
        optimizer, w, g, slots, now.step, now.learning_rate, prev.learning_rate, global_norm
    )
    scored = []
    for cause, compute in hypotheses.items():
        candidate = compute()
        if _err(candidate, expected) > 0:  # a hypothesis that changes nothing here explains nothing
            scored.append((_err(got, candidate), cause))
    delta_keras, delta_torch = expected - w, got - w
    norm = float((delta_keras * delta_keras).sum())
    if norm > 0:  # the same update, scaled: another learning rate
        c = float((delta_torch * delta_keras).sum()) / norm
        if abs(c - 1) > 1e-6:
            scored.append(
                (
                    _err(got, w + c * delta_keras),
                    f"learning rate differs: torch's step is {c:.4g} x Keras's (Keras "
                    f"used {now.learning_rate:.6g} at step {now.step})",
                )
            )
    best = min(scored, default=(math.inf, ""))
    if best[0] <= EXPLAINED * base:
        return best[1], f"recomputing step {now.step} of {pair.path} with this bug reproduces torch's weights"
    return (
        "the optimizer update differs while the gradients agree: compare the update rule, epsilon, weight decay, "
        f"clipping and the learning rate (Keras used {now.learning_rate:.6g} at step {now.step})",
        "no known optimizer-porting bug reproduces torch's weights",
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


def _compare_step(
    now: KerasStep,
    t: _TorchStep,
    trainable: dict[str, TensorPair],
    statistics: list[TensorPair],
    tensors: dict[str, torch.Tensor],
    torch_optimizer: object,
    tolerance: float,
) -> tuple[dict[str, float], list[tuple[str, str, str, float]], int]:
    """Worst error per category, the tensors over tolerance (category, torch, keras, err), slots compared."""
    worst = dict.fromkeys(CATEGORIES, 0.0)
    found: list[tuple[str, str, str, float]] = []

    def check(category: str, torch_path: str, keras_path: str, actual: object, expected: np.ndarray) -> None:
        err = _rel(actual, expected)
        worst[category] = max(worst[category], err)
        if err > tolerance:
            found.append((category, torch_path, keras_path, err))

    for p in statistics:
        kpath = p.keras_variable.path
        check("batchnorm statistic", p.path, kpath, tensors[p.path], _torch_layout(p, now.state[kpath]))
    loss_rel = abs(t.loss - now.loss) / abs(now.loss) if now.loss else abs(t.loss)
    worst["loss"] = loss_rel if math.isfinite(loss_rel) else math.inf
    if worst["loss"] > tolerance:
        found.append(("loss", "loss", "loss", worst["loss"]))
    for path, p in trainable.items():
        kpath = p.keras_variable.path
        check("gradient", path, kpath, t.grads[path], _torch_layout(p, now.grads.get(kpath, 0 * now.state[kpath])))
    compared_slots = 0
    for path, p in trainable.items():
        kpath = p.keras_variable.path
        for slot, value in _torch_slots(torch_optimizer, tensors[path]).items():
            if (kpath, slot) in now.slots:
                compared_slots += 1
                check(
                    "optimizer slot",
                    f"{path} [{slot}]",
                    f"{kpath}_{slot}",
                    value,
                    _torch_layout(p, now.slots[(kpath, slot)]),
                )
    for path, p in trainable.items():
        check("weight", path, p.keras_variable.path, tensors[path], _torch_layout(p, now.state[p.keras_variable.path]))
    return worst, found, compared_slots


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
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Train both twins on the same batches, compare every tensor after every step; returns the report.

    Both models are trained IN PLACE. ``images`` is (K, N, H, W, C) with ``labels`` (K, N), or one batch reused.

    Args:
        keras_optimizer / keras_loss: Keras's; default the model's compiled ones, else Nesterov SGD and sparse
            categorical crossentropy. The loss is made in the model's dtype.
        torch_optimizer / torch_loss / torch_scheduler: a ready torch side (to plant a porting bug); default
            ``conversion.training.torch_optimizer`` and ``torch_loss`` of Keras's, no scheduler (the Keras rule
            carries the schedule). ``torch_scheduler.step()`` runs after each optimizer step.
        reference: a ``KerasRun`` recorded earlier from the same initial state: Keras is not run again.
        record: a ``KerasRun`` to fill with this run's initial state and first ``keep_steps`` Keras steps.
        progress: called with the number of steps done.
    """
    dtype = _model_dtype(keras_model)
    explicit_tolerance = tolerance is not None
    tolerance = TRAIN_TOLERANCE.get(dtype, TRAIN_TOLERANCE["float32"]) if tolerance is None else tolerance
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

    pairs = _pairs(keras_model, torch_model)
    trainable = {p.path: p for p in pairs if p.keras_variable.trainable}
    statistics = [p for p in pairs if not p.keras_variable.trainable]
    bn_layers = _bn_layers(keras_model)
    torch_params = {path: p.torch_tensor for path, p in trainable.items()}
    if torch_loss is None:
        torch_loss = training.torch_loss(keras_loss, output_activation=head)
    if torch_optimizer is None:
        torch_optimizer = training.torch_optimizer(keras_optimizer, torch_model)
    device = next(torch_model.parameters()).device

    if reference is not None:
        keras_iter: Iterator[KerasStep] = iter([reference.initial, *reference.steps[: len(batches)]])
    else:
        keras_iter = keras_steps(keras_model, batches, keras_optimizer, keras_loss)
    prev = next(keras_iter)
    if record is not None:
        record.optimizer, record.loss, record.initial = keras_optimizer, keras_loss, prev
    if (
        reference is None
        and isinstance(torch_optimizer, training.KerasRuleOptimizer)
        and int(_numpy(keras_optimizer.iterations)) > 0
    ):
        training.optimizer_state_to_torch(keras_optimizer, torch_optimizer, pairs)  # a run that continues

    judge_all = explicit_tolerance or dtype == "float64"  # float32: step 0 only (see TRAIN_TOLERANCE)
    torch_model.train()
    rows: list[StepRow] = []
    first: dict | None = None
    diagnosis: dict | None = None
    for index, (x, y) in enumerate(batches):
        now = next(keras_iter, None)
        if now is None:
            raise InputError(f"the Keras reference has {index} steps; {len(batches)} were asked")
        if record is not None and index < keep_steps:
            record.steps.append(now)
        xt = torch.from_numpy(nhwc_to_nchw(x)).to(device)
        yt = torch.from_numpy(np.asarray(y)).to(device)
        t = _torch_step(torch_model, torch_loss, torch_optimizer, torch_scheduler, xt, yt, torch_params)
        tensors = dict(torch_model.named_parameters()) | dict(torch_model.named_buffers())

        worst, found, compared_slots = _compare_step(now, t, trainable, statistics, tensors, torch_optimizer, tolerance)
        loss_rel = worst["loss"]
        judged = judge_all or index == 0
        found = found if judged else []

        row = StepRow(
            index,
            now.learning_rate,
            now.loss,
            t.loss,
            loss_rel,
            worst["gradient"],
            worst["weight"],
            worst["batchnorm statistic"],
            worst["optimizer slot"] if compared_slots else None,
            not found if judged else None,
        )
        rows.append(row)
        if found and first is None:
            category, torch_path, keras_path, err = min(found, key=lambda f: CATEGORIES.index(f[0]))
            first = {"step": index, "kind": category, "torch": torch_path, "keras": keras_path, "max_rel": err}
            cause, evidence = _diagnose(
                category,
                torch_path,
                keras_model,
                keras_optimizer,
                keras_loss,
                head,
                pairs,
                bn_layers,
                prev,
                now,
                t,
                tensors,
                np.asarray(y),
                tolerance,
            )
            if dtype != "float64" and cause.startswith(UNRECOGNISED):
                cause += (
                    f"; no porting bug reproduces it, and in {dtype} rounding grows with every step: rerun with "
                    "--dtype float64 to tell a porting bug from rounding"
                )
            diagnosis = {"cause": cause, "evidence": evidence}
        prev = now
        if progress is not None:
            progress(index + 1)

    top1 = _top1(keras_model, torch_model, [x for x, _ in batches], device) if reference is None else None
    torch_model.eval()
    return {
        "agree": first is None and (top1 is None or top1["agree"]),
        "reference": "keras",
        "dtype": dtype,
        "tolerance": tolerance,
        "metric": "max |torch - keras| / max |keras| per tensor (the loss: |torch - keras| / |keras|), worst per step",
        "judged_steps": "all"
        if judge_all
        else "step 0 (float32 runs separate by rounding afterwards; see TRAIN_TOLERANCE)",
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


def _diagnose(
    category: str,
    torch_path: str,
    keras_model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    keras_loss: keras.losses.Loss,
    head: str | None,
    pairs: list[TensorPair],
    bn_layers: dict,
    prev: KerasStep,
    now: KerasStep,
    t: _TorchStep,
    tensors: dict[str, torch.Tensor],
    labels: np.ndarray,
    tolerance: float,
) -> tuple[str, str]:
    """The likely cause of the first divergence, by recomputing the classic porting bugs."""
    by_path = {p.path: p for p in pairs}
    if category == "batchnorm statistic":
        pair = by_path[torch_path]
        n = t.values_per_channel.get(torch_path.rpartition(".")[0])
        return _diagnose_bn(pair, bn_layers[pair.keras_variable.path], prev, now, tensors, n)
    if category == "loss":
        if _rel(t.output, now.y_pred) > tolerance:
            return (
                "the training-mode forward differs (torch's output is not Keras's y_pred)",
                f"output max rel err {_rel(t.output, now.y_pred):.3g}; run `resnet34-parity verify` on these weights",
            )
        hypotheses = _crossentropy_hypotheses(keras_loss, now.y_pred, labels, head, now.loss)
        scored = [(abs(t.loss - value), cause) for cause, value in hypotheses.items() if value != now.loss]
        best = min(scored, default=(math.inf, ""))
        if best[0] <= EXPLAINED * abs(t.loss - now.loss):
            return best[1], f"recomputed from Keras's y_pred: {t.loss:.10g} (torch) vs {now.loss:.10g} (Keras)"
        return "the loss differs on the same output: compare the loss function", f"{t.loss!r} vs {now.loss!r}"
    if category == "gradient":
        keras_grads = [(by_path[p].to_torch(now.grads[by_path[p].keras_variable.path]), t.grads[p]) for p in t.grads]
        dot = sum(float((torch.from_numpy(np.ascontiguousarray(k)) * g.cpu()).sum()) for k, g in keras_grads)
        norm = sum(float((k.astype(np.float64) ** 2).sum()) for k, _ in keras_grads)
        c = dot / norm if norm else math.nan
        base = max(_rel(g, k) for k, g in keras_grads)
        residual = max(_rel(g, c * k) for k, g in keras_grads) if math.isfinite(c) else math.inf
        if residual <= EXPLAINED * base and abs(c - 1) > 1e-3:
            batch = len(labels)
            why = " (the batch size: the loss summed, not averaged)" if abs(c - batch) < 1e-6 * batch else ""
            return f"gradients scaled by {c:.6g}{why}", "every torch gradient is a constant multiple of Keras's"
        return (
            "the gradients differ while the loss agrees: the backward differs (a custom autograd function, a "
            "detached tensor, or a layer whose training-mode forward differs)",
            f"first differing gradient: {torch_path}",
        )
    path = torch_path.split(" ")[0]  # an optimizer slot: "path [slot]"
    pair = by_path[path]
    if _rel(t.grads[path], pair.to_torch(now.grads[pair.keras_variable.path])) > tolerance:
        return "the gradients differ (see the gradient rows)", f"{path}'s gradient differs too"
    weight = pair.to_keras(tensors[path].detach().cpu().numpy())
    return _diagnose_optimizer(optimizer, pair, prev, now, weight)


def _top1(keras_model: keras.Model, torch_model: nn.Module, batches: list[np.ndarray], device: torch.device) -> dict:
    """Inference-mode top-1 of every sample after training, in both."""
    torch_model.eval()
    keras_top, torch_top = [], []
    seen = set()
    for x in batches:
        if id(x) in seen:
            continue
        seen.add(id(x))
        keras_top.append(np.argmax(_numpy(keras_model(x, training=False)), axis=-1))
        with torch.no_grad():
            torch_top.append(torch_model(torch.from_numpy(nhwc_to_nchw(x)).to(device)).argmax(-1).cpu().numpy())
    keras_top, torch_top = np.concatenate(keras_top), np.concatenate(torch_top)
    return {
        "agree": bool((keras_top == torch_top).all()),
        "samples": int(keras_top.size),
        "differ": int((keras_top != torch_top).sum()),
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


def _train_models(args: argparse.Namespace) -> tuple[keras.Model, nn.Module]:
    from conversion.files import load_keras, load_torch

    if getattr(args, "onnx", None):
        raise InputError("--train compares training steps; an ONNX file has none (drop --onnx)")
    if args.keras:
        keras_model = load_keras(args.keras, args.classifier_activation)
        torch_model = (
            load_torch(args.torch, _head_activation(keras_model)) if args.torch else keras_to_torch(keras_model)
        )
        return keras_model, torch_model
    if args.torch:
        raise InputError("--train needs --keras (the reference it trains); --torch alone has no Keras optimizer")
    from conversion.hostile import randomize_weights

    keras_model = keras_impl.build_resnet34(10, (None, None, 3), args.classifier_activation, args.dtype)
    randomize_weights(keras_model, args.seed)
    return keras_model, keras_to_torch(keras_model)


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
        images = check_images(images, channels, dtype, min_size=2)
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
        keras_model, torch_model = _train_models(args)
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
            progress=lambda done: bar.update(task, completed=done),
        )
    if args.json:
        json.dump(report, sys.stdout, indent=2, allow_nan=True)
        print()
    else:
        _print_report(report)
    return 0 if report["agree"] else 1


def _print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Training step by step against Keras ({report['dtype']}, tolerance {report['tolerance']:g}, batch "
        f"{report['batch']}, {report['size'][0]}x{report['size'][1]})",
        caption=f"{report['keras_optimizer']} | loss: {report['loss']}",
    )
    for column in ("step", "lr", "keras loss", "torch loss", "loss rel", "grads", "weights", "BN stats", "slots", ""):
        table.add_column(column, justify="right")
    for r in report["rows"]:
        table.add_row(
            str(r["step"]),
            f"{r['learning_rate']:.4g}" if r["learning_rate"] is not None else "",
            f"{r['keras_loss']:.10g}",
            f"{r['torch_loss']:.10g}",
            f"{r['loss_rel']:.2e}",
            f"{r['grad_rel']:.2e}",
            f"{r['weight_rel']:.2e}",
            f"{r['bn_rel']:.2e}",
            "n/a" if r["slot_rel"] is None else f"{r['slot_rel']:.2e}",
            {True: "ok", False: "[red]DIVERGES[/red]", None: "not judged"}[r["ok"]],
        )
    console = Console()
    console.print(table)
    top1 = report["top1_after_training"]
    if top1:
        console.print(f"top-1 after training: {top1['samples'] - top1['differ']}/{top1['samples']} samples agree")
    if report["agree"]:
        keys = ("loss_rel", "grad_rel", "weight_rel", "bn_rel", "slot_rel")
        worst = max(r[k] for r in report["rows"] if r["ok"] is not None for k in keys if r[k] is not None)
        console.print(
            f"[green]AGREE[/green]: {'every step matches' if report['judged_steps'] == 'all' else 'step 0 matches'} "
            f"Keras (judged: {report['judged_steps']}); worst max relative error {worst:.2e}"
        )
    else:
        first, d = report["first_divergent_tensor"], report["diagnosis"] or {}
        where = (
            f"first divergent tensor at step {first['step']}: {first['kind']} {first['torch']} "
            f"(Keras {first['keras']}), max rel err {first['max_rel']:.3g}"
            if first
            else "the top-1 predictions differ after training"
        )
        console.print(f"[red]DISAGREE[/red]: {where}" + (f": likely cause: {d['cause']}" if d.get("cause") else ""))
