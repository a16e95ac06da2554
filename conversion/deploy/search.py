"""``--keep-float auto``: the smallest set of source stages (stem, unit_0 ... unit_15, head) to keep in float32 so
that the lowered file's top-1 flip rate on the given images is within the limit.

Deterministic: the stages are ranked once by the error each adds of its own in the file with nothing kept (ties in
forward order; a stage holding a float16 overflow first); they are added in that order until the flip rate is within
the limit, then each one added is tried without, in the same order, and dropped where the rate stays within it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conversion.deploy.check import DeployedModel, dataset_check, keras_logits, stage_errors
from conversion.deploy.lower import lower_onnx
from conversion.deploy.stage_map import HEAD_STAGES, KEEP_FLOAT_STAGES, keep_float_text
from conversion.errors import InputError

# Images the ranking's per-stage rows run on (the float64 floor twin runs on them too).
RANKING_IMAGES = 8


@dataclass(frozen=True)
class Trial:
    """One set of stages kept in float32 and the flip rate it gave."""

    kept_float: tuple[str, ...]
    flip_rate: float
    flips: int

    def to_json(self) -> dict[str, Any]:
        return {"kept_float": list(self.kept_float), "flip_rate": self.flip_rate, "flips": self.flips}


@dataclass(frozen=True)
class SearchResult:
    """The set found, its flip rate, whether it is within the limit, and every set tried in order."""

    kept_float: tuple[str, ...]
    flip_rate: float
    max_flip_rate: float
    reached: bool
    ranking: tuple[str, ...]
    tried: tuple[Trial, ...]
    images: int

    def to_json(self) -> dict[str, Any]:
        return {
            "kept_float": list(self.kept_float),
            "flip_rate": self.flip_rate,
            "max_flip_rate": self.max_flip_rate,
            "reached": self.reached,
            "ranking": list(self.ranking),
            "images": self.images,
            "tried": [trial.to_json() for trial in self.tried],
        }

    def message(self) -> str:
        kept = keep_float_text(self.kept_float)
        if self.reached:
            return f"kept in float32: {kept}; flip rate {self.flip_rate:.2%} on {self.images} images (limit " + (
                f"{self.max_flip_rate:.2%})"
            )
        return (
            f"the limit {self.max_flip_rate:.2%} was not reached: the best set tried, {kept}, flips "
            f"{self.flip_rate:.2%} of {self.images} images"
        )


def _ranking(deployed: DeployedModel, keras_model: Any, images: np.ndarray) -> tuple[str, ...]:
    """The --keep-float stages, most added error first (a float16 overflow's stage before all)."""
    rows, _, inf_first = stage_errors(deployed, keras_model, images[:RANKING_IMAGES])
    added = {stage: 0.0 for stage in KEEP_FLOAT_STAGES}
    for row in rows:
        name = "head" if row.stage in HEAD_STAGES else row.stage
        if name in added:
            added[name] = max(added[name], row.added if np.isfinite(row.added) else np.inf)
    if inf_first is not None:
        added["head" if inf_first in HEAD_STAGES else inf_first] = np.inf
    order = {stage: index for index, stage in enumerate(KEEP_FLOAT_STAGES)}
    return tuple(sorted(KEEP_FLOAT_STAGES, key=lambda stage: (-added[stage], order[stage])))


def search_keep_float(
    fp32: str | os.PathLike,
    keras_model: Any,
    precision: str,
    images: np.ndarray,
    max_flip_rate: float,
    *,
    calibration: np.ndarray | None = None,
    method: str = "minmax",
    on_trial: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """Search the stages to keep in float32 for a float32 ResNet-34 file ``fp32`` lowered to ``precision``.

    Args:
        fp32: the float32 ONNX file (any exporter).
        keras_model: its source in ``build_resnet34``'s layout: the top-1 classes every flip is counted against.
        precision: fp16 or int8.
        images: NHWC float32 images the flip rate is measured on.
        max_flip_rate: the flip rate to reach, 0 to 1.
        calibration, method: int8's calibration images and method.
        on_trial: called with each set tried, as it is measured.
    """
    if precision not in ("fp16", "int8"):
        raise InputError(f"--keep-float auto searches a fp16 or int8 file; received --precision {precision}")
    if not (0 <= max_flip_rate < 1):
        raise InputError(f"--max-flip-rate must be a rate in [0, 1); received {max_flip_rate}")
    reference = keras_logits(keras_model)
    source = np.concatenate([reference(images[i : i + 64]) for i in range(0, len(images), 64)])
    tried: dict[tuple[str, ...], Trial] = {}
    ranking: tuple[str, ...] = ()

    with tempfile.TemporaryDirectory(prefix="resnet34-keep-float-") as work:

        def measure(kept: Sequence[str]) -> Trial:
            nonlocal ranking
            key = tuple(stage for stage in KEEP_FLOAT_STAGES if stage in kept)
            if key not in tried:
                path = Path(work) / f"trial{len(tried)}.onnx"
                lower_onnx(fp32, path, precision, calibration=calibration, method=method, keep_float=key)
                deployed = DeployedModel(path)
                if not ranking:
                    ranking = _ranking(deployed, keras_model, images)
                check = dataset_check(None, deployed, images, source_logits=source)
                tried[key] = Trial(key, check.flip_rate, len(check.flips))
                if on_trial:
                    on_trial(tried[key])
            return tried[key]

        best = measure(())
        kept: list[str] = []
        for stage in ranking:
            if best.flip_rate <= max_flip_rate:
                break
            kept.append(stage)
            trial = measure(kept)
            if trial.flip_rate < best.flip_rate or trial.flip_rate <= max_flip_rate:
                best = trial
        if best.flip_rate <= max_flip_rate:
            for stage in [s for s in ranking if s in best.kept_float]:  # drop what the limit does not need
                fewer = [s for s in best.kept_float if s != stage]
                trial = measure(fewer)
                if trial.flip_rate <= max_flip_rate:
                    best = trial
    return SearchResult(
        best.kept_float,
        best.flip_rate,
        max_flip_rate,
        best.flip_rate <= max_flip_rate,
        ranking,
        tuple(tried.values()),
        int(images.shape[0]),
    )
