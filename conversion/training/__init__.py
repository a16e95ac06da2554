"""Keras's training rules in torch: optimizers (``optimizers``) and crossentropy losses (``losses``).

Names are imported on first use (PEP 562), so importing the package costs nothing until they are needed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "optimizers": (
        "SUPPORTED_KERAS_OPTIMIZERS",
        "SUPPORTED_SCHEDULES",
        "SUPPORTED_TORCH_OPTIMIZERS",
        "KerasRule",
        "KerasRuleOptimizer",
        "keras_optimizer",
        "keras_rule",
        "nadam_u_product",
        "optimizer_state_to_keras",
        "optimizer_state_to_torch",
        "torch_optimizer",
    ),
    "losses": (
        "CASE_CLIPPED",
        "CASE_DOUBLE_SOFTMAX",
        "CASE_LOGITS",
        "CASE_LOGITS_BEHIND_SOFTMAX",
        "CASE_TF_CLIPPED",
        "SUPPORTED_LOSSES",
        "TorchLoss",
        "forward_with_logits",
        "keras_loss_with_dtype",
        "torch_loss",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
