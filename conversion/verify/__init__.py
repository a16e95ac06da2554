"""Prove two implementations agree, and say why not: ``verify`` (inference, stage by stage) and ``verify --train``
(training, step by step), every difference judged against its noise floor.

Names are imported on first use (PEP 562): importing the package, or its ``defaults``, loads neither TensorFlow nor
torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "causes": ("Cause",),
    "defaults": (
        "DEFAULT_BATCH",
        "DEFAULT_SIZE",
        "DEFAULT_TRAIN_BATCH",
        "DEFAULT_TRAIN_SIZE",
        "DEFAULT_TRAIN_STEPS",
        "DEFAULT_LEARNING_RATE",
        "DEFAULT_WEIGHT_DECAY",
        "TRAIN_OPTIMIZERS",
    ),
    "inference": ("source_check", "training_check", "verify_models"),
    "noise_floor": ("FLOOR_MULTIPLE", "Judgement", "judge", "keras_floor_twin", "torch_floor_twin"),
    "report": (
        "BatchNormCheck",
        "Diagnosis",
        "DivergentTensor",
        "SourceCheck",
        "StageComparison",
        "StageRow",
        "Top1",
        "TrainingReport",
        "TrainingStep",
        "VerifyReport",
        "print_training_report",
        "print_verify_report",
    ),
    "requests": ("Sources", "TrainingChoice", "check_request"),
    "sources": ("train_sources", "verify_sources"),
    "stages": ("restored_batchnorm_statistics",),
    "training_sides": ("KerasRun", "KerasStep"),
    "training_steps": ("TRAIN_TOLERANCE", "TrainingOptions", "default_optimizer", "verify_training"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
