"""Keras's optimizers in torch, exactly, and back where an exact equivalent exists.

What Keras 3 (TensorFlow backend) computes, read from its source and reproduced here:

- ``optimizer.apply(grads)``: clip the gradients (``clipnorm`` per variable, ``global_clipnorm`` over all,
  or ``clipvalue``), then decoupled weight decay on every variable ``w -= w * wd * lr`` (nothing excluded
  unless ``exclude_from_weight_decay`` was called), then the update rule, then ``iterations += 1``. The
  learning rate is the schedule at ``iterations`` before the increment; Adam's step is ``iterations + 1``.
- Update rules (``m``, ``v``: Keras's slots; torch keeps other quantities, see docs/pitfalls.md):
  SGD ``m = momentum*m - lr*g; w += m`` (nesterov ``w += momentum*m - lr*g``);
  Adam ``m += (g - m)*(1 - b1); v += (g*g - v)*(1 - b2); w -= m*alpha / (sqrt(v) + eps)`` with
  ``alpha = lr*sqrt(1 - b2^t) / (1 - b1^t)``; RMSprop ``v = rho*v + (1 - rho)*g*g``,
  ``w -= lr*g / sqrt(v + eps)`` (eps inside the root; centered subtracts ``avg_g^2``; momentum
  accumulates the increment);
  Nadam ``m``, ``v`` as Adam's, ``u_t = b1*(1 - 0.5*0.96^t)``, ``P_t = u_1*...*u_t`` (``_u_product``, one
  variable for all, updated once per apply before the update steps), ``m_hat = u_{t+1}*m / (1 - P_t*u_{t+1})
  + (1 - u_t)*g / (1 - P_t)``, ``w -= m_hat*lr / (sqrt(v / (1 - b2^t)) + eps)``;
  Adamax ``m`` as Adam's, ``u = max(b2*u, |g|)`` (slot ``norm``), ``w -= lr*m / ((1 - b1^t)*(u + eps))``;
  Adagrad ``s += g*g`` (slot ``accumulator``, starting at ``initial_accumulator_value``),
  ``w -= lr*g / sqrt(s + eps)``; Adadelta ``a = rho*a + (1 - rho)*g*g``,
  ``d = -sqrt(b + eps)*g / sqrt(a + eps)``, ``b = rho*b + (1 - rho)*d*d``, ``w += lr*d`` (slots
  ``accumulated_grad``, ``accumulated_delta_var``); Lion ``w -= lr*sign(b1*m + (1 - b1)*g)`` then
  ``m = b2*m + (1 - b2)*g``.
- Roundings: ``ops.cast(python_float, "float64")`` goes through float32 on TensorFlow, so SGD's momentum,
  the betas of Adam and Adamax inside ``b^t``, Nadam's and Lion's betas everywhere (``1 - b1`` too, computed
  from the float32 number), Nadam's 0.96 in its update step, Adagrad's initial accumulator (a Constant
  initializer) and ``weight_decay`` are float32 numbers even for float64 variables; the constant learning
  rate lives in a floatx (float32) variable; a schedule computes in float32 (the dtype of its Python
  initial rate) with TensorFlow's own pow/cos, which are not correctly rounded in float32 (1 ulp off torch's
  in ~4% of arguments). Every other Python hyperparameter (Adam's and Adamax's ``1 - b1``, Adamax's ``b2``,
  ``eps``, ``rho``, RMSprop's momentum, Nadam's ``b1`` and 0.96 in ``_u_product``, clip thresholds) enters
  exactly in the variable's dtype.

So that the torch side agrees to rounding (~1e-13 in float64 after 10 steps), ``KerasRuleOptimizer``
computes each step's SCALARS (learning rate, Adam's ``alpha``, Nadam's ``u_t`` and ``_u_product``...) with
``keras.ops`` exactly as Keras does, and does all tensor work in torch with Keras's operation order (the rules
added with Nadam take a correctly rounded sqrt, as TensorFlow's, where torch's CPU one is not). Keras must
therefore be importable while it steps, and only the TensorFlow backend's roundings are reproduced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import keras
import numpy as np
import torch
from keras import ops
from torch import nn

from conversion.errors import ConversionError
from conversion.weights import TensorPair

SUPPORTED_KERAS_OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Nadam", "Adamax", "Adagrad", "Adadelta", "Lion")

SUPPORTED_SCHEDULES = ("constant", "ExponentialDecay", "PiecewiseConstantDecay", "CosineDecay")

SUPPORTED_TORCH_OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "NAdam", "Adamax", "Adagrad", "Adadelta")

_KERAS_OPTIMIZER_CLASSES = {
    keras.optimizers.SGD: "SGD",
    keras.optimizers.Adam: "Adam",
    keras.optimizers.AdamW: "AdamW",
    keras.optimizers.RMSprop: "RMSprop",
    keras.optimizers.Nadam: "Nadam",
    keras.optimizers.Adamax: "Adamax",
    keras.optimizers.Adagrad: "Adagrad",
    keras.optimizers.Adadelta: "Adadelta",
    keras.optimizers.Lion: "Lion",
}

_SCHEDULE_CLASSES = {
    keras.optimizers.schedules.ExponentialDecay: "ExponentialDecay",
    keras.optimizers.schedules.PiecewiseConstantDecay: "PiecewiseConstantDecay",
    keras.optimizers.schedules.CosineDecay: "CosineDecay",
}


@dataclasses.dataclass(frozen=True)
class KerasRule:
    """The update rule of one Keras optimizer, as plain numbers (what ``KerasRuleOptimizer`` computes).

    Attributes:
        optimizer: one of ``SUPPORTED_KERAS_OPTIMIZERS`` (Keras's class name).
        learning_rate: the constant rate as Keras stores it (a float32-exact number), or None with a schedule.
        learning_rate_dtype: dtype of Keras's learning-rate variable (floatx when it was made).
        schedule: the Keras schedule (evaluated by Keras at each step), or None.
        momentum, nesterov: SGD and RMSprop.
        beta_1, beta_2, epsilon, amsgrad: Adam and AdamW (beta_1, beta_2, epsilon: Nadam and Adamax too;
            beta_1, beta_2: Lion; epsilon: RMSprop, Adagrad and Adadelta).
        rho, centered: RMSprop (rho: Adadelta too).
        initial_accumulator_value: Adagrad.
        weight_decay: decoupled weight decay or None.
        clipnorm, clipvalue, global_clipnorm: Keras's clipping options (None when unset).
        iterations_dtype: dtype of Keras's iteration counter (int64 on TensorFlow).
    """

    optimizer: str
    learning_rate: float | None
    learning_rate_dtype: str
    schedule: keras.optimizers.schedules.LearningRateSchedule | None = None
    momentum: float = 0.0
    nesterov: bool = False
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    amsgrad: bool = False
    rho: float = 0.9
    centered: bool = False
    initial_accumulator_value: float = 0.1
    weight_decay: float | None = None
    clipnorm: float | None = None
    clipvalue: float | None = None
    global_clipnorm: float | None = None
    iterations_dtype: str = "int64"

    @property
    def slots(self) -> tuple[str, ...]:
        """Keras's slot-variable names for this rule, in Keras's creation order."""
        if self.optimizer == "SGD":
            return ("momentum",) if self.momentum != 0 else ()
        if self.optimizer in ("Adam", "AdamW"):
            return ("momentum", "velocity", "velocity_hat") if self.amsgrad else ("momentum", "velocity")
        if self.optimizer in _FIXED_SLOTS:
            return _FIXED_SLOTS[self.optimizer]
        return (
            ("velocity",)
            + (("momentum",) if self.momentum > 0 else ())
            + (("average_gradient",) if self.centered else ())
        )

    def describe(self) -> str:
        """One line: the optimizer, its options and its schedule."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown = {
            "SGD": ("momentum", "nesterov"),
            "Adam": ("beta_1", "beta_2", "epsilon", "amsgrad"),
            "AdamW": ("beta_1", "beta_2", "epsilon", "amsgrad"),
            "RMSprop": ("rho", "momentum", "epsilon", "centered"),
            "Nadam": ("beta_1", "beta_2", "epsilon"),
            "Adamax": ("beta_1", "beta_2", "epsilon"),
            "Adagrad": ("initial_accumulator_value", "epsilon"),
            "Adadelta": ("rho", "epsilon"),
            "Lion": ("beta_1", "beta_2"),
        }[self.optimizer] + ("weight_decay", "clipnorm", "clipvalue", "global_clipnorm")
        options = ", ".join(f"{k}={fields[k]}" for k in shown if fields[k] is not None)
        rate = (
            f"{type(self.schedule).__name__}({self.schedule.get_config()})"
            if self.schedule is not None
            else repr(self.learning_rate)
        )
        return f"Keras {self.optimizer}(learning_rate={rate}, {options})"


# The slots of the rules whose slots do not depend on their options, in Keras's creation order.
_FIXED_SLOTS = {
    "Nadam": ("momentum", "velocity"),
    "Adamax": ("momentum", "norm"),
    "Adagrad": ("accumulator",),
    "Adadelta": ("accumulated_grad", "accumulated_delta_var"),
    "Lion": ("momentum",),
}

# Keras's slot lists: the attribute each optimizer's update_step indexes with _get_variable_index.
_SLOT_ATTRIBUTES = {
    "SGD": {"momentum": "momentums"},
    "Adam": {"momentum": "_momentums", "velocity": "_velocities", "velocity_hat": "_velocity_hats"},
    "AdamW": {"momentum": "_momentums", "velocity": "_velocities", "velocity_hat": "_velocity_hats"},
    "RMSprop": {"velocity": "_velocities", "momentum": "_momentums", "average_gradient": "_average_gradients"},
    "Nadam": {"momentum": "_momentums", "velocity": "_velocities"},
    "Adamax": {"momentum": "_m", "norm": "_u"},
    "Adagrad": {"accumulator": "_accumulators"},
    "Adadelta": {"accumulated_grad": "_accumulated_grads", "accumulated_delta_var": "_accumulated_delta_vars"},
    "Lion": {"momentum": "_momentums"},
}


def _number(owner: str, name: str, value: object, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConversionError(
            f"{owner} {name} must be a Python number for an exact translation. Received: {name}={value!r}"
        )
    return value


def keras_rule(keras_optimizer: keras.optimizers.Optimizer) -> KerasRule:
    """Read a Keras optimizer into a ``KerasRule``, or raise ConversionError naming what is supported."""
    kind = _KERAS_OPTIMIZER_CLASSES.get(type(keras_optimizer))
    if kind is None:
        raise ConversionError(
            f"optimizer {type(keras_optimizer).__name__} has no torch translation; supported: "
            f"keras.optimizers {', '.join(SUPPORTED_KERAS_OPTIMIZERS)}"
        )
    if keras.backend.backend() != "tensorflow":
        raise ConversionError(
            f"Keras backend {keras.backend.backend()!r}: only the tensorflow backend's roundings are reproduced"
        )
    owner = f"Keras {kind}"
    for option, unsupported in (
        ("use_ema", keras_optimizer.use_ema),
        ("loss_scale_factor", keras_optimizer.loss_scale_factor is not None),
        ("gradient_accumulation_steps", bool(keras_optimizer.gradient_accumulation_steps)),
        (
            "exclude_from_weight_decay",
            bool(getattr(keras_optimizer, "_exclude_from_weight_decay", None))
            or getattr(keras_optimizer, "_exclude_from_weight_decay_pattern", None) is not None,
        ),
    ):
        if unsupported:
            raise ConversionError(
                f"{owner} option {option} has no torch translation; supported: learning-rate schedules "
                f"({', '.join(SUPPORTED_SCHEDULES)}), weight_decay, clipnorm, clipvalue, global_clipnorm"
            )

    schedule = keras_optimizer._learning_rate
    if isinstance(schedule, keras.Variable):
        learning_rate = float(keras.ops.convert_to_numpy(schedule))
        learning_rate_dtype = keras.backend.standardize_dtype(schedule.dtype)
        schedule = None
    elif type(schedule) in _SCHEDULE_CLASSES:
        learning_rate, learning_rate_dtype = None, keras.backend.floatx()
    else:
        raise ConversionError(
            f"{owner} learning rate {type(schedule).__name__} has no torch translation; supported: "
            f"{', '.join(SUPPORTED_SCHEDULES)} (keras.optimizers.schedules)"
        )

    def num(name: str, allow_none: bool = False) -> float | None:
        return _number(owner, name, getattr(keras_optimizer, name), allow_none)

    common = dict(
        optimizer=kind,
        learning_rate=learning_rate,
        learning_rate_dtype=learning_rate_dtype,
        schedule=schedule,
        weight_decay=num("weight_decay", allow_none=True),
        # Keras clips only when the option is truthy and positive.
        clipnorm=num("clipnorm", True) if keras_optimizer.clipnorm and keras_optimizer.clipnorm > 0 else None,
        clipvalue=num("clipvalue", True) if keras_optimizer.clipvalue and keras_optimizer.clipvalue > 0 else None,
        global_clipnorm=(
            num("global_clipnorm", True)
            if keras_optimizer.global_clipnorm and keras_optimizer.global_clipnorm > 0
            else None
        ),
        iterations_dtype=keras.backend.standardize_dtype(keras_optimizer.iterations.dtype),
    )
    if kind == "SGD":
        return KerasRule(**common, momentum=num("momentum"), nesterov=bool(keras_optimizer.nesterov))
    if kind in ("Adam", "AdamW"):
        return KerasRule(
            **common,
            beta_1=num("beta_1"),
            beta_2=num("beta_2"),
            epsilon=num("epsilon"),
            amsgrad=bool(keras_optimizer.amsgrad),
        )
    if kind in ("Nadam", "Adamax"):
        return KerasRule(**common, beta_1=num("beta_1"), beta_2=num("beta_2"), epsilon=num("epsilon"))
    if kind == "Lion":
        return KerasRule(**common, beta_1=num("beta_1"), beta_2=num("beta_2"))
    if kind == "Adagrad":
        return KerasRule(**common, initial_accumulator_value=num("initial_accumulator_value"), epsilon=num("epsilon"))
    if kind == "Adadelta":
        return KerasRule(**common, rho=num("rho"), epsilon=num("epsilon"))
    return KerasRule(
        **common,
        rho=num("rho"),
        momentum=num("momentum"),
        epsilon=num("epsilon"),
        centered=bool(keras_optimizer.centered),
    )


def _through_float32(value: float) -> float:
    """What ``ops.cast(value, dtype)`` of a Python float gives on TensorFlow: the float32 nearest to it."""
    return value if isinstance(value, int) else float(np.float32(value))


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """A correctly rounded square root, as TensorFlow's and numpy's.

    torch's CPU sqrt is not (torch 2.14.1 with MKL: 1 ulp off in ~1% of float64 and ~17% of float32 elements);
    on a GPU torch's sqrt is correctly rounded.
    """
    return _sqrt_(x.clone())


def _sqrt_(x: torch.Tensor) -> torch.Tensor:
    """``_sqrt`` in place."""
    if x.device.type == "cpu":
        np.sqrt(x.numpy(), out=x.numpy())
        return x
    return x.sqrt_()


_SCRATCH: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _scratch(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two buffers shaped like ``p``, shared by every update of that size: an update written as expressions makes
    a fresh temporary per operation, and for 21M parameters those allocations are most of the step's time (SGD
    with Nesterov momentum, float64: 0.17 s -> 0.04 s a step here). The same operations in the same order, so
    the same bits."""
    key = (p.numel(), p.dtype, p.device)
    if key not in _SCRATCH:
        _SCRATCH[key] = tuple(torch.empty(p.numel(), dtype=p.dtype, device=p.device) for _ in range(2))
    a, b = _SCRATCH[key]
    return a.view(p.shape), b.view(p.shape)


def _next_u_product(u_product: float, beta_1: float, iterations: int, dtype: str) -> float:
    """Nadam's ``_u_product`` after one more apply: Keras's own expression, on keras.ops, in ``dtype``.

    Keras multiplies by the Python ``beta_1`` and 0.96 here (exact in ``dtype``), where its update step casts
    both through float32: the two disagree in float64, and both are reproduced.
    """
    u = ops.convert_to_tensor(np.asarray(u_product, dtype))
    step = ops.cast(ops.convert_to_tensor(iterations + 1, "int64"), dtype)
    return float(ops.convert_to_numpy(ops.multiply(u, beta_1) * (1.0 - 0.5 * ops.power(0.96, step))))


def nadam_u_product(beta_1: float, iterations: int, dtype: str) -> float:
    """Keras Nadam's ``_u_product`` after ``iterations`` applies with gradients, in ``dtype`` (1 before any)."""
    u_product = 1.0
    for iteration in range(iterations):
        u_product = _next_u_product(u_product, beta_1, iteration, dtype)
    return u_product


class KerasRuleOptimizer(torch.optim.Optimizer):
    """A torch optimizer whose ``step()`` is a Keras 3 optimizer's ``apply`` (TensorFlow backend), exactly.

    Per-parameter state uses Keras's slot names (``KerasRule.slots``: ``momentum``, ``velocity``, ``norm``,
    ``accumulator``...); ``iterations`` is Keras's iteration counter (global, like Keras's, saved in
    ``state_dict()["keras_iterations"]``). Nadam's ``u_product`` is Keras's ``_u_product`` (global too, in the
    dtype of the first parameter as Keras's is in its first variable's; ``state_dict()["keras_u_product"]``).
    With a constant rate, ``param_groups[g]["lr"]`` is the rate; like Keras's variable it is rounded to
    ``rule.learning_rate_dtype`` when used. Parameters without a gradient are skipped (no clipping share, no
    decay), as Keras filters them; the counter still advances.

    Build it with ``torch_optimizer(keras_optimizer, torch_model)``.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], rule: KerasRule) -> None:
        self.rule = rule
        self.iterations = 0
        self.u_product = 1.0
        self._constants: dict[tuple[float, torch.dtype, torch.device], torch.Tensor] = {}
        defaults = {
            f.name: getattr(rule, f.name)
            for f in dataclasses.fields(rule)
            if f.name not in ("schedule", "learning_rate_dtype", "iterations_dtype")
        }
        defaults["lr"] = defaults.pop("learning_rate")
        super().__init__(params, defaults)

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``keras_iterations`` (and Nadam's ``keras_u_product``)."""
        state = super().state_dict()
        state["keras_iterations"] = self.iterations
        if self.rule.optimizer == "Nadam":
            state["keras_u_product"] = self.u_product
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch's state dict, ``keras_iterations`` and Nadam's ``keras_u_product``."""
        state_dict = dict(state_dict)
        self.iterations = int(state_dict.pop("keras_iterations", 0))
        self.u_product = float(state_dict.pop("keras_u_product", 1.0))
        super().load_state_dict(state_dict)

    def _u_product_dtype(self) -> str:
        """Keras makes ``_u_product`` in its first variable's dtype; here, the first parameter's."""
        return str(self.param_groups[0]["params"][0].dtype).removeprefix("torch.")

    def learning_rate(self, group: dict[str, Any] | None = None) -> np.generic:
        """The rate Keras uses at the current ``iterations`` (a numpy scalar of Keras's dtype)."""
        if self.rule.schedule is not None:
            step = ops.convert_to_tensor(self.iterations, dtype=self.rule.iterations_dtype)
            return ops.convert_to_numpy(self.rule.schedule(step))[()]
        lr = (group or self.param_groups[0])["lr"]
        return np.asarray(float(lr), dtype=self.rule.learning_rate_dtype)[()]

    def _step_scalars(self, lr: np.generic, dtype: torch.dtype) -> dict[str, float]:
        """This step's scalars in one variable dtype, computed with keras.ops as Keras's update_step does."""
        rule, keras_dtype = self.rule, str(dtype).removeprefix("torch.")
        lr_t = ops.cast(ops.convert_to_tensor(lr), keras_dtype)
        scalars = {"lr": lr_t}

        def step(offset: int) -> object:
            return ops.cast(ops.convert_to_tensor(self.iterations + offset, rule.iterations_dtype), keras_dtype)

        # ops.cast of a Python float goes through float32: Keras casts exactly these hyperparameters.
        if rule.optimizer in ("Adam", "AdamW"):
            beta_1_power = ops.power(ops.cast(rule.beta_1, keras_dtype), step(1))
            beta_2_power = ops.power(ops.cast(rule.beta_2, keras_dtype), step(1))
            scalars["alpha"] = lr_t * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        elif rule.optimizer == "Adamax":
            scalars["one_minus_beta_1_power"] = 1 - ops.power(ops.cast(rule.beta_1, keras_dtype), step(1))
        elif rule.optimizer == "Nadam":
            decay = ops.cast(0.96, keras_dtype)
            beta_1, beta_2 = ops.cast(rule.beta_1, keras_dtype), ops.cast(rule.beta_2, keras_dtype)
            u_t = beta_1 * (1.0 - 0.5 * (ops.power(decay, step(1))))
            u_t_1 = beta_1 * (1.0 - 0.5 * (ops.power(decay, step(2))))
            u_product = ops.convert_to_tensor(np.asarray(self.u_product, self._u_product_dtype()))
            u_product_t = ops.cast(u_product, keras_dtype)
            scalars.update(
                one_minus_beta_1=1 - beta_1,
                one_minus_beta_2=1 - beta_2,
                u_t_1=u_t_1,
                one_minus_u_product_t_1=1 - u_product_t * u_t_1,
                one_minus_u_t=1 - u_t,
                one_minus_u_product_t=1 - u_product_t,
                one_minus_beta_2_power=1 - ops.power(beta_2, step(1)),
            )
        elif rule.optimizer == "Lion":
            beta_1, beta_2 = ops.cast(rule.beta_1, keras_dtype), ops.cast(rule.beta_2, keras_dtype)
            scalars.update(beta_1=beta_1, one_minus_beta_1=1.0 - beta_1, beta_2=beta_2, one_minus_beta_2=1.0 - beta_2)
        return {name: float(ops.convert_to_numpy(value)) for name, value in scalars.items()}

    def _clipped(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        rule = self.rule
        if rule.clipnorm is not None:  # tf.clip_by_norm, per variable
            clipped = []
            for g in grads:
                c = self._const(rule.clipnorm, g)
                l2sum = (g * g).sum()
                positive = l2sum > 0
                l2norm = torch.where(positive, torch.sqrt(torch.where(positive, l2sum, torch.ones_like(l2sum))), l2sum)
                clipped.append((g * c) / torch.maximum(l2norm, c))
            return clipped
        if rule.global_clipnorm is not None:  # keras clip_by_global_norm
            norm = torch.sqrt(torch.stack([(g * g).sum() for g in grads]).sum())
            c, inverse_c = self._const(rule.global_clipnorm, norm), self._const(1.0 / rule.global_clipnorm, norm)
            scale = c * torch.minimum(1.0 / norm, inverse_c) + (norm - norm)  # NaN for a non-finite norm
            return [g * scale for g in grads]
        if rule.clipvalue is not None:
            bounds = [self._const(rule.clipvalue, g) for g in grads]
            return [torch.clamp(g, -bound, bound) for g, bound in zip(grads, bounds, strict=True)]
        return grads

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One Keras ``apply``: clip, decoupled weight decay, update rule, ``iterations += 1``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if entries:
            if self.rule.optimizer == "Nadam":  # Keras updates it once per apply, before any update step
                self.u_product = _next_u_product(
                    self.u_product, self.rule.beta_1, self.iterations, self._u_product_dtype()
                )
            grads = self._clipped([p.grad for p, _ in entries])
            scalars: dict[tuple[int, torch.dtype, torch.device], dict[str, torch.Tensor]] = {}

            def scalars_for(p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
                key = (id(group), p.dtype, p.device)
                if key not in scalars:
                    values = self._step_scalars(self.learning_rate(group), p.dtype)
                    scalars[key] = {k: torch.tensor(v, dtype=p.dtype, device=p.device) for k, v in values.items()}
                return scalars[key]

            if self.rule.weight_decay is not None:  # all variables decay before any update, as in Keras
                for p, group in entries:
                    wd = self._const(_through_float32(self.rule.weight_decay), p)
                    scratch, _ = _scratch(p)
                    p.sub_(torch.mul(p, wd, out=scratch).mul_(scalars_for(p, group)["lr"]))  # p -= p * wd * lr
            update = {
                "SGD": self._sgd,
                "Adam": self._adam,
                "AdamW": self._adam,
                "RMSprop": self._rmsprop,
                "Nadam": self._nadam,
                "Adamax": self._adamax,
                "Adagrad": self._adagrad,
                "Adadelta": self._adadelta,
                "Lion": self._lion,
            }
            for (p, group), g in zip(entries, grads, strict=True):
                state = self.state[p]
                for slot in self.rule.slots:
                    if slot not in state:
                        state[slot] = torch.full_like(
                            p, initial_slot_value(self.rule, slot), memory_format=torch.preserve_format
                        )
                update[self.rule.optimizer](p, g.to(p.dtype), state, scalars_for(p, group))
        self.iterations += 1
        return loss

    def _const(self, value: float, like: torch.Tensor) -> torch.Tensor:
        """``value`` as a 0-d tensor of ``like``'s dtype and device (cached: hyperparameters do not change)."""
        key = (value, like.dtype, like.device)
        if key not in self._constants:
            self._constants[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
        return self._constants[key]

    # The four optimizers verify's default runs and the tests train with write into ``_scratch`` buffers (the
    # expression each replaces is in its comment); the others make temporaries.

    def _sgd(self, p: torch.Tensor, g: torch.Tensor, state: dict, scalars: dict[str, torch.Tensor]) -> None:
        lr = scalars["lr"]
        a, b = _scratch(p)
        if self.rule.momentum == 0:
            p.sub_(torch.mul(g, lr, out=a))  # p -= g * lr
            return
        m = state["momentum"]
        momentum = self._const(_through_float32(self.rule.momentum), p)
        torch.mul(g, lr, out=b)
        torch.sub(torch.mul(m, momentum, out=a), b, out=m)  # m = m * momentum - g * lr
        if self.rule.nesterov:
            p.add_(torch.mul(m, momentum, out=a).sub_(b))  # p += m * momentum - g * lr
        else:
            p.add_(m)

    def _adam(self, p: torch.Tensor, g: torch.Tensor, state: dict, scalars: dict[str, torch.Tensor]) -> None:
        rule = self.rule
        m, v = state["momentum"], state["velocity"]
        a, b = _scratch(p)
        m.add_(torch.sub(g, m, out=a).mul_(self._const(1 - rule.beta_1, p)))  # m += (g - m) * (1 - beta_1)
        v.add_(torch.mul(g, g, out=a).sub_(v).mul_(self._const(1 - rule.beta_2, p)))  # v += (g*g - v) * (1 - beta_2)
        if rule.amsgrad:
            v_hat = state["velocity_hat"]
            torch.maximum(v_hat, v, out=v_hat)
            v = v_hat
        # p -= (m * alpha) / (sqrt(v) + epsilon)
        p.sub_(torch.mul(m, scalars["alpha"], out=a).div_(torch.sqrt(v, out=b).add_(self._const(rule.epsilon, p))))

    def _rmsprop(self, p: torch.Tensor, g: torch.Tensor, state: dict, scalars: dict[str, torch.Tensor]) -> None:
        rule = self.rule
        rho, one_minus_rho = self._const(rule.rho, p), self._const(1 - rule.rho, p)
        velocity = state["velocity"]
        a, b = _scratch(p)
        # velocity = rho * velocity + (1 - rho) * (g * g)
        torch.add(torch.mul(velocity, rho, out=a), torch.mul(g, g, out=b).mul_(one_minus_rho), out=velocity)
        if rule.centered:
            average = state["average_gradient"]
            # average = rho * average + (1 - rho) * g
            torch.add(torch.mul(average, rho, out=a), torch.mul(g, one_minus_rho, out=b), out=average)
            # denominator = velocity - average * average + epsilon
            denominator = torch.sub(velocity, torch.mul(average, average, out=b), out=a)
        else:
            denominator = a.copy_(velocity)  # then + epsilon
        denominator.add_(self._const(rule.epsilon, p))
        increment = torch.mul(g, scalars["lr"], out=b).div_(denominator.sqrt_())  # (lr * g) / sqrt(denominator)
        if rule.momentum > 0:
            momentum = state["momentum"]
            # momentum = momentum_coefficient * momentum + increment
            torch.add(torch.mul(momentum, self._const(rule.momentum, p), out=a), increment, out=momentum)
            p.sub_(momentum)
        else:
            p.sub_(increment)

    def _nadam(self, p: torch.Tensor, g: torch.Tensor, state: dict, scalars: dict[str, torch.Tensor]) -> None:
        """Keras's Nadam.update_step on one parameter."""
        m, v = state["momentum"], state["velocity"]
        a, b = _scratch(p)
        m.add_(torch.sub(g, m, out=a).mul_(scalars["one_minus_beta_1"]))  # m += (g - m) * (1 - beta_1)
        v.add_(torch.mul(g, g, out=a).sub_(v).mul_(scalars["one_minus_beta_2"]))  # v += (g*g - v) * (1 - beta_2)
        # m_hat = (u_t_1 * m) / (1 - u_product_t_1) + ((1 - u_t) * g) / (1 - u_product_t)
        m_hat = torch.mul(m, scalars["u_t_1"], out=a).div_(scalars["one_minus_u_product_t_1"])
        m_hat.add_(torch.mul(g, scalars["one_minus_u_t"], out=b).div_(scalars["one_minus_u_product_t"]))
        v_hat = torch.div(v, scalars["one_minus_beta_2_power"], out=b)
        # p -= (m_hat * lr) / (sqrt(v_hat) + epsilon)
        p.sub_(m_hat.mul_(scalars["lr"]).div_(_sqrt_(v_hat).add_(self._const(self.rule.epsilon, p))))

    def _adamax(self, p: torch.Tensor, g: torch.Tensor, state: dict, scalars: dict[str, torch.Tensor]) -> None:
        """Keras's Adamax.update_step on one parameter."""
        rule = self.rule
        m, u = state["momentum"], state["norm"]
        m.add_((g - m) * self._const(1 - rule.beta_1, p))
        u.copy_(torch.maximum(self._const(rule.beta_2, p) * u, torch.abs(g)))
        p.sub_((scalars["lr"] * m) / (scalars["one_minus_beta_1_power"] * (u + self._const(rule.epsilon, p))))

    def _adagrad(self, p: torch.Tensor, g: torch.Tensor, state: dict, scalars: dict[str, torch.Tensor]) -> None:
        """Keras's Adagrad.update_step on one parameter."""
        accumulator = state["accumulator"]
        accumulator.add_(g * g)
        p.sub_((scalars["lr"] * g) / _sqrt(accumulator + self._const(self.rule.epsilon, p)))

    def _adadelta(self, p: torch.Tensor, g: torch.Tensor, state: dict, scalars: dict[str, torch.Tensor]) -> None:
        """Keras's Adadelta.update_step on one parameter."""
        rule = self.rule
        rho, one_minus_rho = self._const(rule.rho, p), self._const(1 - rule.rho, p)
        epsilon = self._const(rule.epsilon, p)
        accumulated_grad, accumulated_delta = state["accumulated_grad"], state["accumulated_delta_var"]
        accumulated_grad.copy_(rho * accumulated_grad + one_minus_rho * (g * g))
        delta = -((_sqrt(accumulated_delta + epsilon) * g) / _sqrt(accumulated_grad + epsilon))
        accumulated_delta.copy_(rho * accumulated_delta + one_minus_rho * (delta * delta))
        p.add_(scalars["lr"] * delta)

    def _lion(self, p: torch.Tensor, g: torch.Tensor, state: dict, scalars: dict[str, torch.Tensor]) -> None:
        """Keras's Lion.update_step on one parameter."""
        m = state["momentum"]
        p.sub_(scalars["lr"] * torch.sign(m * scalars["beta_1"] + g * scalars["one_minus_beta_1"]))
        m.copy_(m * scalars["beta_2"] + g * scalars["one_minus_beta_2"])


def initial_slot_value(rule: KerasRule, slot: str) -> float:
    """The value Keras starts a slot at: 0, or Adagrad's ``initial_accumulator_value`` (cast through float32)."""
    if rule.optimizer == "Adagrad" and slot == "accumulator":
        return _through_float32(rule.initial_accumulator_value)  # keras.initializers.Constant uses ops.cast
    return 0.0


def torch_optimizer(keras_optimizer: keras.optimizers.Optimizer, torch_model: nn.Module) -> KerasRuleOptimizer:
    """A torch optimizer over ``torch_model``'s trainable parameters that steps exactly like ``keras_optimizer``.

    It starts fresh (``iterations`` 0, slots as Keras starts them); to continue a Keras run, call
    ``optimizer_state_to_torch``.

    Args:
        keras_optimizer: a ``keras.optimizers`` SGD, Adam, AdamW, RMSprop, Nadam, Adamax, Adagrad, Adadelta or
            Lion, with a constant rate or an ExponentialDecay, PiecewiseConstantDecay or CosineDecay schedule,
            and any of weight_decay, clipnorm, clipvalue, global_clipnorm.
        torch_model: the torch twin (its parameters with ``requires_grad`` are optimised).

    Returns:
        A ``KerasRuleOptimizer``.

    Raises:
        ConversionError: another optimizer or schedule, ``use_ema``, ``loss_scale_factor``,
            gradient accumulation, ``exclude_from_weight_decay``, or a backend other than TensorFlow.
    """
    rule = keras_rule(keras_optimizer)
    params = [p for p in torch_model.parameters() if p.requires_grad]
    if not params:
        raise ConversionError("the torch model has no trainable parameters to optimise")
    return KerasRuleOptimizer(params, rule)


def _slot_plan(
    keras_optimizer: keras.optimizers.Optimizer, torch_opt: KerasRuleOptimizer, pairs: Sequence[TensorPair]
) -> list[tuple[TensorPair, str, keras.Variable]]:
    """(pair, slot name, Keras slot variable) for every trainable pair, checked on both sides."""
    if not isinstance(torch_opt, KerasRuleOptimizer):
        raise ConversionError(
            "expected the torch optimizer from conversion.training.torch_optimizer. "
            f"Received: {type(torch_opt).__name__}"
        )
    rule = keras_rule(keras_optimizer)
    if (rule.optimizer, rule.slots) != (torch_opt.rule.optimizer, torch_opt.rule.slots):
        raise ConversionError(
            f"optimizers differ: Keras {rule.optimizer} with slots {rule.slots}, torch follows "
            f"{torch_opt.rule.optimizer} with slots {torch_opt.rule.slots}"
        )
    if not keras_optimizer.built:
        raise ConversionError(
            "the Keras optimizer is not built: call keras_optimizer.build(keras_model.trainable_variables) first"
        )
    torch_params = {id(p) for group in torch_opt.param_groups for p in group["params"]}
    plan = []
    for pair in pairs:
        if not pair.keras_variable.trainable:
            continue  # BatchNorm moving statistics: not optimizer variables
        if id(pair.torch_tensor) not in torch_params:
            raise ConversionError(f"{pair.path}: the torch tensor is not a parameter of the torch optimizer")
        try:
            index = keras_optimizer._get_variable_index(pair.keras_variable)
        except KeyError:
            raise ConversionError(
                f"{pair.path}: Keras variable {pair.keras_variable.path} is not one the Keras optimizer was built on"
            ) from None
        for slot in rule.slots:
            variable = getattr(keras_optimizer, _SLOT_ATTRIBUTES[rule.optimizer][slot])[index]
            expected_name = f"{pair.keras_variable.path.replace('/', '_')}_{slot}"
            if variable is None or variable.name != expected_name:
                raise ConversionError(
                    f"{pair.path}: Keras slot {slot} is {getattr(variable, 'name', None)}, expected {expected_name}"
                )
            plan.append((pair, slot, variable))
    return plan


def optimizer_state_to_torch(
    keras_optimizer: keras.optimizers.Optimizer, torch_opt: KerasRuleOptimizer, pairs: Sequence[TensorPair]
) -> None:
    """Copy a built Keras optimizer's state into ``torch_opt``: slots (layout changed), ``iterations``, constant rate
    (and Nadam's ``_u_product``).

    Args:
        keras_optimizer: the Keras optimizer, built on the Keras model's trainable variables.
        torch_opt: the ``KerasRuleOptimizer`` over the torch twin (from ``torch_optimizer``).
        pairs: ``conversion.weights.paired_tensors(keras_model, torch_model)``; non-trainable ones are skipped.

    Raises:
        ConversionError: different optimizers, an unbuilt Keras optimizer, or a pair either side does not know.
    """
    plan = _slot_plan(keras_optimizer, torch_opt, pairs)
    with torch.no_grad():
        for pair, slot, variable in plan:
            value = np.ascontiguousarray(pair.to_torch(keras.ops.convert_to_numpy(variable)))
            target = pair.torch_tensor
            if str(value.dtype) != str(target.dtype).removeprefix("torch."):
                raise ConversionError(f"{pair.path}: slot {slot} is {value.dtype} in Keras, {target.dtype} in torch")
            torch_opt.state[target][slot] = torch.from_numpy(value).to(target.device)
    torch_opt.iterations = int(keras.ops.convert_to_numpy(keras_optimizer.iterations))
    if torch_opt.rule.optimizer == "Nadam":
        torch_opt.u_product = float(keras.ops.convert_to_numpy(keras_optimizer._u_product))
    if torch_opt.rule.schedule is None and isinstance(keras_optimizer._learning_rate, keras.Variable):
        for group in torch_opt.param_groups:
            group["lr"] = float(keras.ops.convert_to_numpy(keras_optimizer._learning_rate))


def optimizer_state_to_keras(
    torch_opt: KerasRuleOptimizer, keras_optimizer: keras.optimizers.Optimizer, pairs: Sequence[TensorPair]
) -> None:
    """Copy ``torch_opt``'s state into a built Keras optimizer: slots, ``iterations``, constant rate (and Nadam's
    ``_u_product``).

    Slots the torch side has not created yet (no step taken) are written as Keras starts them (zeros, or
    Adagrad's initial accumulator value).

    Args:
        torch_opt: the ``KerasRuleOptimizer`` over the torch twin.
        keras_optimizer: the Keras optimizer, built on the Keras model's trainable variables.
        pairs: ``conversion.weights.paired_tensors(keras_model, torch_model)``.

    Raises:
        ConversionError: as ``optimizer_state_to_torch``.
    """
    plan = _slot_plan(keras_optimizer, torch_opt, pairs)
    for pair, slot, variable in plan:
        state = torch_opt.state.get(pair.torch_tensor, {})
        value = state.get(slot)
        array = (
            np.full(
                tuple(variable.shape),
                initial_slot_value(torch_opt.rule, slot),
                keras.backend.standardize_dtype(variable.dtype),
            )
            if value is None
            else pair.to_keras(value.detach().cpu().numpy())
        )
        variable.assign(array)
    keras_optimizer.iterations.assign(torch_opt.iterations)
    if torch_opt.rule.optimizer == "Nadam":
        keras_optimizer._u_product.assign(torch_opt.u_product)
    if torch_opt.rule.schedule is None and isinstance(keras_optimizer._learning_rate, keras.Variable):
        keras_optimizer._learning_rate.assign(float(torch_opt.param_groups[0]["lr"]))


_TORCH_OPTIMIZER_CLASSES = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.NAdam,
    torch.optim.Adamax,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
)

# torch options that choose an implementation, not the arithmetic rule.
_IMPLEMENTATION_OPTIONS = ("foreach", "fused", "capturable", "differentiable")


def keras_optimizer(
    torch_opt: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
) -> keras.optimizers.Optimizer:
    """The Keras optimizer whose update equals ``torch_opt``'s (in exact arithmetic), or ConversionError.

    Equivalences (torch -> Keras): SGD(momentum, nesterov) -> SGD; SGD(weight_decay) WITHOUT momentum ->
    SGD(weight_decay) (``w - lr*(g + wd*w)`` is Keras's decay-then-step); Adam(eps=0, amsgrad) -> Adam(epsilon=0);
    AdamW(eps=0) and Adam(decoupled_weight_decay=True, eps=0) -> AdamW(epsilon=0); RMSprop(eps=0, momentum,
    centered) -> RMSprop(epsilon=0); NAdam(momentum_decay=1, eps, decoupled weight decay) -> Nadam(epsilon=eps,
    weight_decay); Adamax(eps=0) -> Adamax(epsilon=0); Adagrad(eps=0, lr_decay=0, initial_accumulator_value) ->
    Adagrad(epsilon=0, initial_accumulator_value); Adadelta(rho, eps) -> Adadelta(rho, epsilon=eps). Anything else
    has no Keras equivalent and is refused, naming the parameter: torch's ``eps`` (Adam: ``sqrt(v_hat) + eps`` is
    ``sqrt(v) + eps*sqrt(1 - b2^t)`` in Keras's form, a step-dependent epsilon; RMSprop and Adagrad: eps outside
    the root, Keras's inside; Adamax: eps inside the max, Keras's outside), NAdam's ``momentum_decay`` (torch's
    momentum schedule is ``0.96^(t*momentum_decay)``, Keras's ``0.96^t``), Adagrad's ``lr_decay``, coupled
    ``weight_decay`` (L2 inside the moments), ``dampening``, ``maximize``, several param groups, and any
    ``scheduler`` (with SGD momentum torch's velocity keeps the old rate, so no Keras schedule matches).

    Keras on TensorFlow keeps the rate in a float32 variable and casts SGD's momentum, the betas of Adam and
    Adamax (in ``b^t``) and of Nadam (all but its ``_u_product``), Nadam's constant 0.96, Adagrad's initial
    accumulator and weight decay through float32: with float64 weights the two agree to rounding only when those
    hyperparameters are float32 numbers (0.5, 0.875, 2**-6...); otherwise they differ by ~1e-8 relative, and
    NAdam always does (0.96 is not a float32 number).

    Args:
        torch_opt: a ``torch.optim`` SGD, Adam, AdamW, RMSprop, NAdam, Adamax, Adagrad or Adadelta.
        scheduler: the torch lr scheduler driving it, if any (refused: see above).

    Returns:
        A new, unbuilt ``keras.optimizers`` optimizer.
    """
    kind = type(torch_opt).__name__
    if type(torch_opt) not in _TORCH_OPTIMIZER_CLASSES:
        raise ConversionError(
            f"torch optimizer {kind} has no Keras translation; supported: torch.optim "
            f"{', '.join(SUPPORTED_TORCH_OPTIMIZERS)}"
        )
    settings = [
        {k: v for k, v in group.items() if k not in ("params", "initial_lr")} for group in torch_opt.param_groups
    ]
    if any(s != settings[0] for s in settings[1:]):
        raise ConversionError(
            f"torch {kind} param groups with different settings have no Keras equivalent (one optimizer)"
        )
    group = settings[0]

    def refuse(parameter: str, why: str) -> ConversionError:
        return ConversionError(f"torch {kind} {parameter} has no Keras equivalent: {why}")

    def number(value: object) -> float:
        return float(value.item()) if isinstance(value, torch.Tensor) else float(value)

    if group.get("maximize", False):
        raise refuse("maximize=True", "Keras optimizers only minimise")
    momentum = number(group.get("momentum", 0.0))
    if scheduler is not None:
        if kind == "SGD" and momentum != 0:
            raise refuse(
                f"momentum={momentum} with an lr scheduler",
                "torch's velocity b = m*b + g is scaled by the CURRENT lr, Keras's m = m*momentum - lr*g keeps "
                "each step's own lr, so the two differ as soon as the rate changes",
            )
        raise refuse(f"scheduler {type(scheduler).__name__}", "only a constant torch lr is translated")
    lr = number(group["lr"])
    weight_decay = number(group.get("weight_decay", 0.0))
    if kind == "SGD":
        if number(group.get("dampening", 0.0)) != 0:
            raise refuse("dampening", "Keras's SGD momentum has no dampening")
        if weight_decay != 0 and momentum != 0:
            raise refuse(
                f"weight_decay={weight_decay} with momentum",
                "torch adds wd*w to the gradient (coupled L2, carried in the velocity); Keras decays decoupled",
            )
        return keras.optimizers.SGD(
            learning_rate=lr,
            momentum=momentum,
            nesterov=bool(group["nesterov"]),
            weight_decay=weight_decay or None,
        )
    eps = number(group["eps"])
    if kind in ("Adam", "AdamW"):
        if eps != 0:
            raise refuse(
                f"eps={eps}",
                "torch divides by sqrt(v/(1 - b2^t)) + eps, Keras by sqrt(v) + epsilon with the bias correction in "
                "the step size; they match only for eps=0 (Keras epsilon=0.0)",
            )
        decoupled = kind == "AdamW" or bool(group.get("decoupled_weight_decay", False))
        if weight_decay != 0 and not decoupled:
            raise refuse(f"weight_decay={weight_decay}", "torch's Adam adds wd*w to the gradient (coupled L2)")
        beta_1, beta_2 = (number(b) for b in group["betas"])
        options = dict(learning_rate=lr, beta_1=beta_1, beta_2=beta_2, epsilon=0.0, amsgrad=bool(group["amsgrad"]))
        if weight_decay != 0:
            return keras.optimizers.AdamW(weight_decay=weight_decay, **options)
        return keras.optimizers.Adam(**options)
    if kind == "Adadelta":  # the same rule, epsilon inside both roots
        if weight_decay != 0:
            raise refuse(f"weight_decay={weight_decay}", "torch's Adadelta adds wd*w to the gradient (coupled L2)")
        return keras.optimizers.Adadelta(learning_rate=lr, rho=number(group["rho"]), epsilon=eps)
    if kind == "NAdam":
        momentum_decay = number(group["momentum_decay"])
        if momentum_decay != 1:
            raise refuse(
                f"momentum_decay={momentum_decay}",
                "torch's momentum schedule is beta1*(1 - 0.5*0.96^(t*momentum_decay)), Keras's "
                "beta_1*(1 - 0.5*0.96^t); they match only for momentum_decay=1",
            )
        if weight_decay != 0 and not group["decoupled_weight_decay"]:
            raise refuse(
                f"weight_decay={weight_decay}",
                "torch's NAdam adds wd*w to the gradient (coupled L2) unless decoupled_weight_decay=True",
            )
        beta_1, beta_2 = (number(b) for b in group["betas"])
        return keras.optimizers.Nadam(
            learning_rate=lr, beta_1=beta_1, beta_2=beta_2, epsilon=eps, weight_decay=weight_decay or None
        )
    if kind == "Adamax":
        if eps != 0:
            raise refuse(
                f"eps={eps}",
                "torch takes max(b2*u, |g| + eps) and divides by it, Keras takes max(b2*u, |g|) and divides by it "
                "+ epsilon; they match only for eps=0",
            )
        if weight_decay != 0:
            raise refuse(f"weight_decay={weight_decay}", "torch's Adamax adds wd*w to the gradient (coupled L2)")
        beta_1, beta_2 = (number(b) for b in group["betas"])
        return keras.optimizers.Adamax(learning_rate=lr, beta_1=beta_1, beta_2=beta_2, epsilon=0.0)
    if kind == "Adagrad":
        if eps != 0:
            raise refuse(
                f"eps={eps}", "torch divides by sqrt(s) + eps, Keras by sqrt(s + epsilon); they match only for eps=0"
            )
        lr_decay = number(group["lr_decay"])
        if lr_decay != 0:
            raise refuse(
                f"lr_decay={lr_decay}",
                "torch's rate lr/(1 + (t - 1)*lr_decay) is Keras's InverseTimeDecay, which computes it in float32 "
                "and is not translated",
            )
        if weight_decay != 0:
            raise refuse(f"weight_decay={weight_decay}", "torch's Adagrad adds wd*w to the gradient (coupled L2)")
        return keras.optimizers.Adagrad(
            learning_rate=lr, initial_accumulator_value=number(group["initial_accumulator_value"]), epsilon=0.0
        )
    if eps != 0:
        raise refuse(
            f"eps={eps}", "torch divides by sqrt(v) + eps, Keras by sqrt(v + epsilon); they match only for eps=0"
        )
    if weight_decay != 0:
        raise refuse(f"weight_decay={weight_decay}", "torch's RMSprop adds wd*w to the gradient (coupled L2)")
    return keras.optimizers.RMSprop(
        learning_rate=lr,
        rho=number(group["alpha"]),
        momentum=momentum,
        epsilon=0.0,
        centered=bool(group["centered"]),
    )
