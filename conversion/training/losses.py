"""Keras's crossentropy losses in torch: which computation Keras does for a head, a backend and a dtype.

With the book's softmax head Keras does not compute ``nn.CrossEntropyLoss``: on TensorFlow the softmax output
carries ``_keras_logits`` and the loss uses the logits behind it; on JAX and torch it clips the probabilities to
[1e-7, 1 - 1e-7]. Keras computes a loss in floatx (float32) unless the loss was made with ``dtype=``. Each case is
reproduced and named (``TorchLoss.case``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any

import keras
import torch
from torch import nn

from conversion.errors import ConversionError

SUPPORTED_LOSSES = ("sparse_categorical_crossentropy", "categorical_crossentropy")

CASE_LOGITS = "log-softmax cross-entropy of the output (it is logits)"

CASE_LOGITS_BEHIND_SOFTMAX = "log-softmax cross-entropy of the logits behind the softmax (TensorFlow's _keras_logits)"

CASE_DOUBLE_SOFTMAX = "log-softmax cross-entropy of the softmax output (a double softmax, as Keras computes here)"

CASE_TF_CLIPPED = "TensorFlow's crossentropy of probabilities clipped to [eps, 1 - eps]"

CASE_CLIPPED = "crossentropy of probabilities normalised, then clipped to [eps, 1 - eps] (JAX/torch backends)"


@dataclasses.dataclass(frozen=True)
class TorchLoss:
    """A Keras crossentropy loss reproduced in torch; call it as ``loss(output, target, logits=None)``.

    Which computation Keras does depends on the backend, the head and whether the model's output reaches
    the loss in the loss's own dtype (Keras first casts ``y_pred`` to the loss dtype, and on TensorFlow that
    cast drops the softmax's ``_keras_logits``: a float64 model with a default float32 loss gets clipped
    probabilities, not the logits). ``case(output_dtype)`` and ``describe(output_dtype)`` say which.

    Attributes:
        name: "sparse_categorical_crossentropy" or "categorical_crossentropy".
        from_logits: the loss's ``from_logits``.
        output_activation: the model head's activation: "softmax" or None (logits).
        backend: the Keras backend whose computation is reproduced.
        dtype: the Keras loss dtype (floatx unless the loss was made with ``dtype=``): the loss is computed
            in it, so a float64 comparison needs a float64 Keras loss (see ``keras_loss_with_dtype``).
        reduction: "sum_over_batch_size" (the mean over samples) or "sum".
        epsilon: ``keras.config.epsilon()`` when made (the clip bound).
        report_dtype: floatx when made: ``train_on_batch``/``fit`` report the loss cast to it (Keras's
            CompileLoss), so their reported loss of a float64 model is float32-rounded unless floatx is float64;
            the gradients are not affected.
    """

    name: str
    from_logits: bool
    output_activation: str | None
    backend: str
    dtype: torch.dtype
    reduction: str
    epsilon: float
    report_dtype: torch.dtype

    def case(self, output_dtype: torch.dtype | str | None = None) -> str:
        """Which computation Keras does for a model output of ``output_dtype`` (default: the loss dtype)."""
        same_dtype = output_dtype is None or _torch_dtype(output_dtype) == self.dtype
        if self.output_activation == "softmax" and self.backend == "tensorflow" and same_dtype:
            return CASE_LOGITS_BEHIND_SOFTMAX
        if self.from_logits:
            return CASE_DOUBLE_SOFTMAX if self.output_activation == "softmax" else CASE_LOGITS
        return CASE_TF_CLIPPED if self.backend == "tensorflow" else CASE_CLIPPED

    def describe(self, output_dtype: torch.dtype | str | None = None) -> str:
        """One line: the loss, the case in use and the dtype it is computed in."""
        return (
            f"{self.name}(from_logits={self.from_logits}) on a {self.output_activation or 'logits'} head, "
            f"{self.backend} backend, computed in {str(self.dtype).removeprefix('torch.')}, "
            f"{self.reduction}{' (float32 mean: Keras torch backend)' if self.backend == 'torch' else ''}: "
            f"{self.case(output_dtype)}"
        )

    def __call__(
        self, output: torch.Tensor, target: torch.Tensor, *, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The reduced loss, in ``self.dtype``.

        Args:
            output: the model's output (probabilities with a softmax head, else logits).
            target: class indices (N,) or (N, 1) for the sparse loss; one-hot or soft labels (N, C) otherwise.
            logits: the input of the head's softmax (see ``forward_with_logits``); required in the case
                ``CASE_LOGITS_BEHIND_SOFTMAX``, ignored otherwise.
        """
        case = self.case(output.dtype)
        if case == CASE_LOGITS_BEHIND_SOFTMAX:
            if logits is None:
                raise ConversionError(
                    "this loss uses the logits behind the softmax (TensorFlow); pass logits= "
                    "(from conversion.training.forward_with_logits)"
                )
            scores = logits.to(self.dtype)
        else:
            scores = output.to(self.dtype)  # Keras casts y_pred to the loss dtype first
        sparse = self.name == "sparse_categorical_crossentropy"
        if sparse:
            labels = target.reshape(target.shape[:-1]) if target.dim() == scores.dim() else target
            labels = labels.long()
        else:
            labels = target.to(self.dtype)
        if case in (CASE_LOGITS, CASE_LOGITS_BEHIND_SOFTMAX, CASE_DOUBLE_SOFTMAX):
            log_prob = torch.log_softmax(scores, dim=-1)
        elif case == CASE_TF_CLIPPED and sparse:
            # clip, log, then sparse softmax cross-entropy of those logs: -log(p_y / sum(p)), p clipped
            log_prob = torch.log_softmax(torch.log(torch.clamp(scores, self.epsilon, 1 - self.epsilon)), dim=-1)
        else:  # normalise, clip, log (TensorFlow's dense loss, and every loss on JAX/torch)
            normalised = scores / scores.sum(dim=-1, keepdim=True)
            log_prob = torch.log(torch.clamp(normalised, self.epsilon, 1.0 - self.epsilon))
        if sparse:
            per_sample = -log_prob.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        else:
            per_sample = -(labels * log_prob).sum(dim=-1)
        total = per_sample.sum()
        if self.reduction == "sum":
            return total
        dtype = self.dtype
        if self.backend == "torch":
            # Keras's torch backend: divide_no_nan's result_type(torch.float64, torch.float64, float) is "float32"
            # (torch dtypes are not in Keras's lattice), so the mean is float32(sum) / n in float32.
            total, dtype = total.to(torch.float32), torch.float32
        return total / torch.tensor(float(per_sample.numel()), dtype=dtype, device=total.device)


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, keras.backend.standardize_dtype(dtype))


_LOSS_FUNCTIONS = {
    keras.losses.sparse_categorical_crossentropy: "sparse_categorical_crossentropy",
    keras.losses.categorical_crossentropy: "categorical_crossentropy",
}

_LOSS_CLASSES = {
    keras.losses.SparseCategoricalCrossentropy: "sparse_categorical_crossentropy",
    keras.losses.CategoricalCrossentropy: "categorical_crossentropy",
}

_NAME_ALIASES = {
    "sparse_categorical_crossentropy": "sparse_categorical_crossentropy",
    "SparseCategoricalCrossentropy": "sparse_categorical_crossentropy",
    "categorical_crossentropy": "categorical_crossentropy",
    "CategoricalCrossentropy": "categorical_crossentropy",
}

_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def _loss_settings(keras_loss: object) -> tuple[str, dict[str, Any], str, str]:
    """(name, fn kwargs, dtype, reduction) of a Keras crossentropy given by name, function, class or instance."""
    supported = f"supported: {', '.join(SUPPORTED_LOSSES)} (by name, function, class or instance)"
    if isinstance(keras_loss, str):
        if keras_loss not in _NAME_ALIASES:
            raise ConversionError(f"loss {keras_loss!r} has no torch translation; {supported}")
        keras_loss = _NAME_ALIASES[keras_loss]
        return keras_loss, {}, keras.config.floatx(), "sum_over_batch_size"
    if isinstance(keras_loss, Hashable) and keras_loss in _LOSS_FUNCTIONS:
        return _LOSS_FUNCTIONS[keras_loss], {}, keras.config.floatx(), "sum_over_batch_size"
    if isinstance(keras_loss, type) and keras_loss in _LOSS_CLASSES:
        keras_loss = keras_loss()
    if type(keras_loss) in _LOSS_CLASSES:
        return _LOSS_CLASSES[type(keras_loss)], dict(keras_loss._fn_kwargs), keras_loss.dtype, keras_loss.reduction
    wrapped = getattr(keras_loss, "fn", None)  # compile() wraps a loss function in a LossFunctionWrapper
    if isinstance(keras_loss, keras.losses.Loss) and isinstance(wrapped, Hashable) and wrapped in _LOSS_FUNCTIONS:
        return _LOSS_FUNCTIONS[keras_loss.fn], dict(keras_loss._fn_kwargs), keras_loss.dtype, keras_loss.reduction
    raise ConversionError(
        f"loss {getattr(keras_loss, '__name__', type(keras_loss).__name__)} has no torch translation; {supported}"
    )


def torch_loss(keras_loss: object, *, output_activation: str | None, backend: str | None = None) -> TorchLoss:
    """The torch computation of a Keras crossentropy loss, for a head with ``output_activation``.

    Args:
        keras_loss: "sparse_categorical_crossentropy" or "categorical_crossentropy" (or the class names),
            ``keras.losses`` functions of those names, their classes, or instances (``from_logits``,
            ``dtype`` and ``reduction`` are read from an instance).
        output_activation: the model head's activation: "softmax", or None / "linear" for logits.
        backend: the Keras backend to reproduce; None takes ``keras.backend.backend()``.

    Returns:
        A ``TorchLoss``: call it as ``loss(output, target, logits=...)``; ``describe()`` says which case is used.

    Raises:
        ConversionError: another loss, ``label_smoothing``, ``ignore_class``, ``axis`` other than -1,
            a reduction other than sum_over_batch_size/mean/sum, or another head activation.
    """
    name, kwargs, dtype, reduction = _loss_settings(keras_loss)
    from_logits = bool(kwargs.pop("from_logits", False))
    for option, default in (("label_smoothing", 0.0), ("ignore_class", None), ("axis", -1)):
        if kwargs.get(option, default) != default:
            raise ConversionError(
                f"{name} option {option}={kwargs[option]!r} has no torch translation; supported: "
                f"from_logits, dtype, reduction (sum_over_batch_size, mean, sum), {option}={default!r}"
            )
    if reduction in _MEAN_REDUCTIONS:
        reduction = "sum_over_batch_size"
    elif reduction != "sum":
        raise ConversionError(
            f"{name} reduction {reduction!r} has no translation; supported: sum_over_batch_size, mean, sum"
        )
    activation = None if output_activation in (None, "linear") else output_activation
    if activation not in (None, "softmax"):
        raise ConversionError(
            f"head activation {output_activation!r} with {name} has no translation; supported: softmax, None (logits)"
        )
    backend = backend or keras.backend.backend()
    if backend not in ("tensorflow", "jax", "torch"):
        raise ConversionError(f"Keras backend {backend!r} has no translation; supported: tensorflow, jax, torch")
    return TorchLoss(
        name=name,
        from_logits=from_logits,
        output_activation=activation,
        backend=backend,
        dtype=_torch_dtype(dtype),
        reduction=reduction,
        epsilon=float(keras.config.epsilon()),
        report_dtype=_torch_dtype(keras.config.floatx()),
    )


def keras_loss_with_dtype(keras_loss: object, dtype: str) -> keras.losses.Loss:
    """A new Keras loss instance like ``keras_loss`` (name, class or instance) computing in ``dtype``.

    A float64 model needs this for a float64 comparison: Keras computes a loss in floatx (float32) unless the
    loss was made with ``dtype=``.
    """
    name, kwargs, _, reduction = _loss_settings(keras_loss)
    cls = {v: k for k, v in _LOSS_CLASSES.items()}[name]
    return cls(**kwargs, reduction=reduction, dtype=dtype)


def forward_with_logits(torch_model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``torch_model`` and return (output, the input of the softmax that produced it, or None).

    With a softmax head on TensorFlow, Keras's loss takes the logits behind the softmax: pass the second
    value as ``logits=`` to a ``TorchLoss``. None when the output does not come from an ``nn.Softmax``.
    """
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def remember(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured.append((args[0], output))

    handles = [m.register_forward_hook(remember) for m in torch_model.modules() if isinstance(m, nn.Softmax)]
    try:
        output = torch_model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    logits = next((x for x, y in reversed(captured) if y is output), None)
    return output, logits
