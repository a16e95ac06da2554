"""The porting bugs the diagnoses recognise: one bug, one name, one message, shared by inference and training.

A diagnosis names a ``Cause`` only where the bug's signature stands out of the noise floor; its ``detail`` carries
the numbers of this instance (the padding, the epsilon, Bessel's n / (n - 1), the batch size).
"""

from __future__ import annotations

import enum


class Cause(enum.Enum):
    """A classic porting bug, or what is known where none reproduces the divergence."""

    # layers, at inference
    SYMMETRIC_PADDING = (
        "symmetric padding where TF 'same' pads asymmetrically (a strided conv ported with padding=k//2)"
    )
    KERNEL_HW_SWAPPED = "conv kernel with H and W swapped (HWIO -> OIHW transposed as (3, 2, 1, 0))"
    LAYOUT_MIXUP = "layout mix-up: NHWC images fed as NCHW (reshaped, not transposed)"
    BN_EPSILON = "BatchNorm epsilon 1e-5 (PyTorch's default) instead of Keras's"
    BN_MEAN_VARIANCE_SWAPPED = "BatchNorm running mean and variance swapped"
    DENSE_NOT_TRANSPOSED = "Dense kernel not transposed ((in, out) copied as (out, in))"
    MAX_POOL_ZERO_PADDING = "max-pool padded with zeros instead of -inf"
    LAYER_MISSING = "a layer is missing (e.g. a projection without its BatchNorm)"
    SHAPE_DIFFERS = "a layer's output shape differs"
    ACTIVATION_TWICE = "classifier activation applied twice"
    ACTIVATION_MISSING = "classifier activation missing"
    # BatchNorm statistics, in training mode (both the inference check and verify --train)
    BN_MOMENTUM_UNCONVERTED = "BatchNorm momentum passed unconverted (torch momentum must be 1 - Keras momentum)"
    BN_UNBIASED_VARIANCE = (
        "running variance updated with the unbiased batch variance (torch's nn.BatchNorm2d); Keras stores the "
        "biased one"
    )
    EVAL_MODE = (
        "torch model left in eval mode while training (frozen BatchNorm: moving statistics never updated and the "
        "forward normalises with them; call model.train())"
    )
    # the loss
    FORWARD_DIFFERS = "the training-mode forward differs (torch's output is not Keras's y_pred)"
    LOSS_DOUBLE_SOFTMAX = "nn.CrossEntropyLoss applied to the softmax output (a double softmax)"
    LOSS_SUMMED = "loss summed over the batch instead of averaged (reduction='sum')"
    LOSS_IN_FLOAT32 = "loss computed in float32 (Keras computes it in the loss's dtype)"
    LOGITS_AS_PROBABILITIES = "logits taken as probabilities (from_logits=False on a logits head)"
    # gradients
    GRADIENTS_SCALED = "gradients scaled by a constant"
    GRADIENTS_DIFFER = "the gradients differ (see the gradient rows)"
    # the optimizer
    CLIP_BY_VALUE = "gradients clipped by value (clip_grad_value_ / clipvalue) where Keras clips by norm"
    CLIP_GLOBAL_NORM = (
        "gradients clipped by their global norm (clip_grad_norm_ over all parameters) where Keras clips each "
        "variable's norm (clipnorm)"
    )
    CLIP_PER_VARIABLE = "gradients clipped per variable where Keras clips the global norm (global_clipnorm)"
    CLIPPING_MISSING = "gradient clipping missing"
    WEIGHT_DECAY_COUPLED = (
        "weight decay coupled (torch's weight_decay adds wd*w to the gradient, L2) where Keras decays decoupled "
        "(w -= w*wd*lr)"
    )
    WEIGHT_DECAY_MISSING = "weight decay missing"
    SGD_MOMENTUM_TORCH_CONVENTION = (
        "SGD momentum in torch's convention (b = momentum*b + g; w -= lr*b): under a changing learning rate the "
        "velocity keeps the old rate; Keras's m = momentum*m - lr*g does not"
    )
    ADAM_EPSILON_TORCH = (
        "Adam epsilon in torch's form and value (torch.optim.Adam: m_hat / (sqrt(v_hat) + 1e-8)); Keras divides by "
        "sqrt(v) + epsilon with the bias correction folded into the step size"
    )
    ADAM_EPSILON_FORM = (
        "Adam epsilon in torch's form (m_hat / (sqrt(v_hat) + eps)); Keras divides by sqrt(v) + epsilon with the "
        "bias correction folded into the step size"
    )
    ADAM_COUPLED_WEIGHT_DECAY = (
        "torch.optim.Adam's weight_decay (L2, coupled) and torch's epsilon; Keras decays decoupled"
    )
    RMSPROP_EPSILON_OUTSIDE_ROOT = (
        "RMSprop epsilon outside the square root (torch: sqrt(v) + eps); Keras: sqrt(v + epsilon)"
    )
    LEARNING_RATE_DIFFERS = "learning rate differs"
    # no porting bug reproduces it
    UNKNOWN = "beyond the noise floor, cause unknown"

    @property
    def message(self) -> str:
        """The one-line description of this bug."""
        return self.value
