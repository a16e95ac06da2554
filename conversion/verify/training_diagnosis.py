"""Why a training step diverges: the classic training-port bugs, each recomputed from Keras's state before the step.

BatchNorm updates with torch's conventions, the loss summed or doubly softmaxed, the optimizer step with
torch's optimizer, coupled weight decay, clipping by value... Each hypothesis is named only where its
signature stands out of the tensor's noise floor and it reproduces torch's tensor (``noise_floor.explains``);
hypotheses that rounding cannot tell apart are named together. Otherwise the cause is ``Cause.UNKNOWN``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import torch
from torch import nn

from conversion import training
from conversion.errors import ConversionError
from conversion.verify.causes import Cause
from conversion.verify.noise_floor import Evidence, explains, judge
from conversion.verify.report import Diagnosis
from conversion.verify.training_sides import (
    KerasStep,
    TorchStep,
    as_array,
    as_numpy,
    distance,
    max_abs_diff,
    rel,
    scale,
    slot_variables,
)
from conversion.weights import TensorPair

# A hypothesis: the bug, what it predicts for each tensor seen, and this instance's detail.
Hypothesis = tuple[Cause, list[Evidence], str]


def best_explanation(hypotheses: list[Hypothesis], evidence: str) -> Diagnosis | None:
    """The hypothesis that explains what was seen and leaves the least; None if none does.

    Where others explain it too and leave no more than that plus the noise floor, rounding cannot tell them
    apart: they are named beside it (``Diagnosis.also``)."""
    explaining = sorted(
        (sum(max_abs_diff(e.got, e.candidate) / scale(e.expected) for e in candidates), index)
        for index, (_, candidates, _) in enumerate(hypotheses)
        if explains(*candidates)
    )
    if not explaining:
        return None
    best, index = explaining[0]
    cause, candidates, detail = hypotheses[index]
    margin = sum(e.multiple * e.noise_floor for e in candidates)
    ties = (hypotheses[i][0] for left, i in explaining[1:] if left <= best + margin)
    also = tuple(dict.fromkeys(other for other in ties if other is not cause))
    return Diagnosis(cause, detail, evidence, also=also)


def batchnorm_layers(keras_model: keras.Model) -> dict[str, keras.layers.BatchNormalization]:
    """keras variable path of a moving statistic -> its BatchNormalization layer."""
    layers = {}
    for layer in keras_model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layers[layer.moving_mean.path] = layers[layer.moving_variance.path] = layer
    return layers


@dataclass
class TrainingDiagnosisContext:
    """What the diagnosis of a training divergence needs: both sides at the step, and every tensor's floor."""

    keras_model: keras.Model
    optimizer: keras.optimizers.Optimizer
    keras_loss: keras.losses.Loss
    head: str | None
    pairs: list[TensorPair]
    bn_layers: dict[str, keras.layers.BatchNormalization]
    prev: KerasStep
    now: KerasStep
    t: TorchStep
    t_floor: TorchStep
    tensors: dict[str, torch.Tensor]
    labels: np.ndarray
    tolerance: float
    multiple: float  # FLOOR_MULTIPLE of the compared dtype
    floors: dict[tuple[str, str], float]  # (kind, torch name) -> the noise floor it was judged against
    failing: set[tuple[str, str]]  # (kind, torch name) of the tensors beyond their floor and bound at this step


def _diagnose_batchnorm(c: TrainingDiagnosisContext, torch_path: str) -> Diagnosis:
    pair = {p.path: p for p in c.pairs}[torch_path]
    layer = c.bn_layers[pair.keras_variable.path]
    module = pair.path.rpartition(".")[0]
    n = c.t.values_per_channel.get(module)
    mean_path, var_path = layer.moving_mean.path, layer.moving_variance.path
    old_mean, old_var = c.prev.state[mean_path], c.prev.state[var_path]
    new_mean, new_var = c.now.state[mean_path], c.now.state[var_path]
    got_mean = c.tensors[f"{module}.running_mean"].detach().cpu().numpy()
    got_var = c.tensors[f"{module}.running_var"].detach().cpu().numpy()
    floor_mean = c.floors[("batchnorm statistic", f"{module}.running_mean")]
    floor_var = c.floors[("batchnorm statistic", f"{module}.running_var")]
    k = float(layer.momentum)
    batch_mean, batch_var = (new_mean - k * old_mean) / (1 - k), (new_var - k * old_var) / (1 - k)
    predictions = {
        Cause.EVAL_MODE: ((old_mean, old_var), ""),
        Cause.BN_MOMENTUM_UNCONVERTED: (
            (k * batch_mean + (1 - k) * old_mean, k * batch_var + (1 - k) * old_var),
            f"torch got {k:g}, the weight Keras gives the OLD statistic",
        ),
    }
    if n and n > 1:
        predictions[Cause.BN_UNBIASED_VARIANCE] = (
            (new_mean, k * old_var + (1 - k) * batch_var * n / (n - 1)),
            f"factor n/(n-1) = {n}/{n - 1}",
        )
    hypotheses = [
        (
            cause,
            [
                Evidence(got_mean, new_mean, m, floor_mean, c.multiple),
                Evidence(got_var, new_var, v, floor_var, c.multiple),
            ],
            detail,
        )
        for cause, ((m, v), detail) in predictions.items()
    ]
    found = best_explanation(hypotheses, f"recomputing {module}'s update with this convention reproduces torch's")
    return found or Diagnosis(
        Cause.UNKNOWN,
        "BatchNorm moving statistics updated differently",
        f"no convention reproduces {module}'s statistics (mean: {rel(got_mean, new_mean):.3g} against a floor of "
        f"{floor_mean:.2g}; variance: {rel(got_var, new_var):.3g} against {floor_var:.2g})",
    )


def _crossentropy_hypotheses(
    keras_loss: keras.losses.Loss, y_pred: np.ndarray, labels: np.ndarray, head: str | None, keras_value: float
) -> list[tuple[Cause, float, str]]:
    """Loss values of the classic loss-porting bugs, recomputed from Keras's own y_pred."""
    n = y_pred.shape[0]
    scores = np.asarray(y_pred, np.float64)
    onehot = labels if labels.ndim == 2 else np.eye(scores.shape[-1])[labels]
    shifted = scores - scores.max(axis=-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    ce_of_scores = float(-(onehot * log_softmax).sum(axis=-1).mean())
    out = [
        (Cause.LOSS_SUMMED, keras_value * n, f"the batch has {n} samples"),
        (Cause.LOSS_IN_FLOAT32, float(np.float32(keras_value)), ""),
    ]
    if head == "softmax":
        out.append((Cause.LOSS_DOUBLE_SOFTMAX, ce_of_scores, ""))
        out.append((Cause.LOSS_DOUBLE_SOFTMAX, ce_of_scores * n, f"and summed over the {n} samples"))
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            as_probs = float(-(onehot * np.log(np.clip(scores, 1e-7, 1 - 1e-7))).sum(axis=-1).mean())
        out.append((Cause.LOGITS_AS_PROBABILITIES, as_probs, ""))
    return out


def _diagnose_loss(c: TrainingDiagnosisContext) -> Diagnosis:
    now, t = c.now, c.t
    output_floor = now.floor.get(("y_pred",), 0.0) + distance(t.output, c.t_floor.output) / scale(now.y_pred)
    forward = judge(rel(t.output, now.y_pred), output_floor, c.tolerance, c.multiple)
    if not forward.ok:
        return Diagnosis(
            Cause.FORWARD_DIFFERS,
            f"output max rel err {forward.error:.3g}, {forward.floor_ratio:.3g} x its noise floor",
            "run `resnet34-parity verify` on these weights",
        )
    floor = c.floors[("loss", "loss")]
    got, expected = np.float64(t.loss), np.float64(now.loss)
    hypotheses = [
        (cause, [Evidence(got, expected, np.float64(value), floor, c.multiple)], detail)
        for cause, value, detail in _crossentropy_hypotheses(c.keras_loss, now.y_pred, c.labels, c.head, now.loss)
    ]
    found = best_explanation(hypotheses, f"recomputed from Keras's y_pred: {t.loss:.10g} (torch) vs {now.loss:.10g}")
    return found or Diagnosis(
        Cause.UNKNOWN,
        "the loss differs on the same output: compare the loss function",
        f"{t.loss!r} vs {now.loss!r} (noise floor {floor:.2g})",
    )


def _diagnose_gradients(c: TrainingDiagnosisContext, torch_path: str) -> Diagnosis:
    by_path = {p.path: p for p in c.pairs}
    keras_grads = {p: by_path[p].to_torch(c.now.grads[by_path[p].keras_variable.path]) for p in c.t.grads}
    dot = sum(
        float((torch.from_numpy(np.ascontiguousarray(k)) * c.t.grads[p].cpu()).sum()) for p, k in keras_grads.items()
    )
    norm = sum(float((k.astype(np.float64) ** 2).sum()) for k in keras_grads.values())
    factor = dot / norm if norm else math.nan
    if math.isfinite(factor):
        evidence = [
            Evidence(as_array(c.t.grads[p]), k, factor * k, c.floors[("gradient", p)], c.multiple)
            for p, k in keras_grads.items()
        ]
        if explains(*evidence):
            batch = len(c.labels)
            why = ": the batch size (the loss summed, not averaged)" if abs(factor - batch) < 1e-6 * batch else ""
            return Diagnosis(
                Cause.GRADIENTS_SCALED, f"{factor:.6g}{why}", "every torch gradient is a constant multiple of Keras's"
            )
    return Diagnosis(
        Cause.UNKNOWN,
        "the gradients differ while the loss agrees: the backward differs (a custom autograd function, a detached "
        "tensor, or a layer whose training-mode forward differs)",
        f"first differing gradient: {torch_path}",
    )


# --- the optimizer ------------------------------------------------------------------------------------


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
    if isinstance(proxy, keras.optimizers.Nadam):  # its momentum-schedule product is state too, a function of the step
        proxy._u_product.assign(training.nadam_u_product(proxy.beta_1, iteration, variable.dtype))
    for (_, slot), slot_variable in slot_variables(proxy, [variable]).items():
        if slot in slots:
            slot_variable.assign(slots[slot])
    proxy.apply_gradients([(keras.ops.convert_to_tensor(g), variable)])
    return as_numpy(variable)


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


@dataclass
class _OptimizerStep:
    """One variable at one step: what Keras started from and what it was given."""

    w: np.ndarray
    g: np.ndarray
    slots: dict[str, np.ndarray]
    step: int
    lr: float
    lr_prev: float | None
    global_norm: float


def _optimizer_hypotheses(
    optimizer: keras.optimizers.Optimizer, s: _OptimizerStep
) -> list[tuple[Cause, Callable[[], np.ndarray], str]]:
    """Weights after this step under each classic optimizer-porting bug (computed lazily), with each one's detail."""
    kind = type(optimizer).__name__
    w, g, slots, step, lr = s.w, s.g, s.slots, s.step, s.lr
    wd = optimizer.weight_decay or 0.0
    clipped = _clip(optimizer, g, s.global_norm)
    decayed = w - w * wd * lr

    def keras_step(gradient: np.ndarray, **overrides: object) -> Callable[[], np.ndarray]:
        return lambda: _keras_rule_step(optimizer, w, gradient, slots, step, **overrides)

    try:
        kept = training.keras_rule(optimizer).slots
    except ConversionError:
        kept = ()
    # Keras's own step recomputed needs every slot it keeps; a run records only some (Adagrad's accumulator...).
    restorable = step == 0 or all(slot in slots for slot in kept)

    def torch_step(cls: type, start: np.ndarray, state: dict, **options: object) -> Callable[[], np.ndarray]:
        return lambda: _torch_rule_step(cls, start, clipped, state, **options)

    h: list[tuple[Cause, Callable[[], np.ndarray], str]] = []
    clip = optimizer.clipnorm or optimizer.global_clipnorm
    if clip and restorable:
        which = "clipnorm" if optimizer.clipnorm else "global_clipnorm"
        h.append(
            (Cause.CLIP_BY_VALUE, keras_step(np.clip(g, -clip, clip)), f"clipvalue={clip:g} where Keras has {which}")
        )
        if optimizer.clipnorm:
            h.append((Cause.CLIP_GLOBAL_NORM, keras_step(g * clip / max(s.global_norm, clip)), ""))
        else:
            own_norm = float(np.sqrt((g * g).sum()))
            h.append((Cause.CLIP_PER_VARIABLE, keras_step(g * clip / max(own_norm, clip)), ""))
    if (optimizer.clipvalue or clip) and restorable:
        h.append((Cause.CLIPPING_MISSING, keras_step(g), ""))
    if wd and restorable:
        h.append((Cause.WEIGHT_DECAY_COUPLED, keras_step(clipped + wd * w, weight_decay=0.0), f"wd={wd:g}"))
        h.append((Cause.WEIGHT_DECAY_MISSING, keras_step(clipped, weight_decay=0.0), ""))
    if kind == "SGD" and optimizer.momentum:
        buffer = {} if step == 0 or not s.lr_prev else {"momentum_buffer": -slots["momentum"] / s.lr_prev}
        options = dict(lr=lr, momentum=optimizer.momentum, nesterov=optimizer.nesterov)
        h.append((Cause.SGD_MOMENTUM_TORCH_CONVENTION, torch_step(torch.optim.SGD, decayed, buffer, **options), ""))
    if kind in ("Adam", "AdamW"):
        state = {"step": torch.tensor(float(step)), "exp_avg": slots["momentum"], "exp_avg_sq": slots["velocity"]}
        if optimizer.amsgrad:
            state["max_exp_avg_sq"] = slots["velocity_hat"]
        options = dict(lr=lr, betas=(optimizer.beta_1, optimizer.beta_2), amsgrad=optimizer.amsgrad)
        h.append(
            (
                Cause.ADAM_EPSILON_TORCH,
                torch_step(torch.optim.AdamW, w, state, eps=1e-8, weight_decay=wd, **options),
                f"Keras's epsilon is {optimizer.epsilon:g}",
            )
        )
        h.append(
            (
                Cause.ADAM_EPSILON_FORM,
                torch_step(torch.optim.AdamW, w, state, eps=optimizer.epsilon, weight_decay=wd, **options),
                f"eps={optimizer.epsilon:g}",
            )
        )
        if wd:
            adam = torch_step(torch.optim.Adam, w, state, eps=1e-8, weight_decay=wd, **options)
            h.append((Cause.ADAM_COUPLED_WEIGHT_DECAY, adam, f"wd={wd:g}"))
    if kind == "RMSprop":
        # torch creates all of its state at once: give it all (Keras's slots start at zero too)
        state = {"step": torch.tensor(float(step)), "square_avg": slots["velocity"]}
        if optimizer.centered:
            state["grad_avg"] = slots["average_gradient"]
        if optimizer.momentum:
            state["momentum_buffer"] = slots["momentum"] / s.lr_prev if step > 0 and s.lr_prev else 0 * w
        options = dict(lr=lr, alpha=optimizer.rho, momentum=optimizer.momentum, centered=optimizer.centered)
        for eps in dict.fromkeys((optimizer.epsilon, 1e-8)):  # Keras's value in torch's place, and torch's default
            rmsprop = torch_step(torch.optim.RMSprop, decayed, state, eps=eps, **options)
            h.append((Cause.RMSPROP_EPSILON_OUTSIDE_ROOT, rmsprop, f"eps={eps:g}"))
    return h


def _diagnose_optimizer(c: TrainingDiagnosisContext, pair: TensorPair, torch_weight: np.ndarray) -> Diagnosis:
    path, now, prev = pair.keras_variable.path, c.now, c.prev
    floor = c.floors[("weight", pair.path)]
    w, got, expected = prev.state[path], torch_weight, now.state[path]
    global_norm = float(np.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in now.grads.values())))
    step = _OptimizerStep(
        w=w,
        g=now.grads[path],
        slots={slot: value for (owner, slot), value in prev.slots.items() if owner == path},
        step=now.step,
        lr=now.learning_rate,
        lr_prev=prev.learning_rate,
        global_norm=global_norm,
    )
    hypotheses: list[Hypothesis] = [
        (cause, [Evidence(got, expected, compute(), floor, c.multiple)], detail)
        for cause, compute, detail in _optimizer_hypotheses(c.optimizer, step)
    ]
    delta_keras, delta_torch = expected - w, got - w
    norm = float((delta_keras * delta_keras).sum())
    if norm > 0:  # the same update, scaled: another learning rate
        factor = float((delta_torch * delta_keras).sum()) / norm
        if abs(factor - 1) > 1e-6:
            hypotheses.append(
                (
                    Cause.LEARNING_RATE_DIFFERS,
                    [Evidence(got, expected, w + factor * delta_keras, floor, c.multiple)],
                    f"torch's step is {factor:.4g} x Keras's (Keras used {now.learning_rate:.6g} at step {now.step})",
                )
            )
    found = best_explanation(hypotheses, f"recomputing step {now.step} of {pair.path} with this bug reproduces torch's")
    return found or Diagnosis(
        Cause.UNKNOWN,
        "the optimizer update differs while the gradients agree: compare the update rule, epsilon, weight decay, "
        f"clipping and the learning rate (Keras used {now.learning_rate:.6g} at step {now.step})",
        f"no known optimizer-porting bug reproduces torch's weights ({rel(got, expected):.3g} against a floor of "
        f"{floor:.2g})",
    )


def diagnose(kind: str, torch_path: str, c: TrainingDiagnosisContext) -> Diagnosis:
    """The likely cause of the first divergent tensor (its kind and torch name), by recomputing the classic bugs."""
    if kind == "batchnorm statistic":
        return _diagnose_batchnorm(c, torch_path)
    if kind == "loss":
        return _diagnose_loss(c)
    if kind == "gradient":
        return _diagnose_gradients(c, torch_path)
    path = torch_path.split(" ")[0]  # an optimizer slot: "path [slot]"
    if ("gradient", path) in c.failing:
        return Diagnosis(Cause.GRADIENTS_DIFFER, "", f"{path}'s gradient differs too")
    pair = {p.path: p for p in c.pairs}[path]
    return _diagnose_optimizer(c, pair, pair.to_keras(c.tensors[path].detach().cpu().numpy()))
