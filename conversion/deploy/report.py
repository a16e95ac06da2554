"""Typed results of a deployment check: what a lower-precision file predicts against its source, stage by stage and
over a dataset, and what arithmetic the runtime really ran. Light (no TensorFlow, torch or onnxruntime): ``verify``'s
report embeds them and reads them back from JSON.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from conversion.arrays import TOLERANCE

# The flip rate a fp16 or int8 file may have by default: top-1 agreement of at least 99.5% with its source. A fp32 file
# may have none.
DEFAULT_MAX_FLIP_RATE = 0.005


def default_max_flip_rate(precision: str) -> float:
    """The flip rate a file of ``precision`` may have when none is given."""
    return 0.0 if precision == "fp32" else DEFAULT_MAX_FLIP_RATE


# Flips listed in the printed report (the JSON lists every one).
PRINTED_FLIPS = 10


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, float) else value


@dataclass(frozen=True)
class Arithmetic:
    """The precision the runtime computed in, read from its optimized graph (not from the file's tensor types)."""

    precision: str  # what the file stores: fp32, fp16 or int8
    optimization: str  # the graph optimization the session ran with: "basic" or "all"
    compute: dict[str, int]  # "<op> in <dtype>" -> count, for convolutions and matrix products
    inserted_casts: int  # Casts the runtime inserted because it lacks a kernel for the stored type
    summary: str  # one line, for the report

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Arithmetic:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class StageError:
    """One stage of the deployed file against the source model (cumulative: each side runs on its own input)."""

    stage: str
    shape: tuple[int, ...]  # NHWC, as the source's stage gives it
    max_abs: float
    max_rel: float  # max |deployed - source| / max |source|
    noise_floor: float  # the float32 floor of this stage: what rounding in float32 alone gives here
    floor_ratio: float  # max_rel / noise_floor
    added: float  # max_rel minus the previous stage's: the error this stage adds of its own
    cosine: float  # cosine similarity of the two outputs (NaN where the deployed one is not finite)
    finite: bool  # the deployed stage's output holds no inf or NaN

    def to_json(self) -> dict[str, Any]:
        data = {k: _number(v) for k, v in dataclasses.asdict(self).items()}
        data["shape"] = list(self.shape)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageError:
        return cls(**{**data, "shape": tuple(data["shape"])})


@dataclass(frozen=True)
class Flip:
    """One image whose top-1 class differs between the source and the deployed model."""

    index: int
    source_class: int
    deployed_class: int
    source_margin: float  # the source's top-1 logit minus its second: how close it was to flipping itself

    def to_json(self) -> dict[str, Any]:
        return {k: _number(v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Accuracy:
    """Top-1 accuracy of each side against the labels."""

    source: float
    deployed: float
    labels: int


@dataclass(frozen=True)
class DatasetCheck:
    """Every image through the source and the deployed model: top-1 agreement, flips, accuracy, logit error."""

    images: int
    flips: tuple[Flip, ...]
    accuracy: Accuracy | None
    logit_error: dict[str, float]  # max / mean / p99 over images of max|deployed - source| / max|source| per image

    @property
    def top1_agreement(self) -> float:
        """The share of images whose top-1 class is the source's."""
        return 1.0 - self.flip_rate

    @property
    def flip_rate(self) -> float:
        """The share of images whose top-1 class differs from the source's."""
        return len(self.flips) / self.images if self.images else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "top1_agreement": self.top1_agreement,
            "flip_rate": self.flip_rate,
            "flips": [flip.to_json() for flip in self.flips],
            "accuracy": dataclasses.asdict(self.accuracy) if self.accuracy else None,
            "logit_error": {k: _number(v) for k, v in self.logit_error.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetCheck:
        return cls(
            data["images"],
            tuple(Flip(**flip) for flip in data["flips"]),
            Accuracy(**data["accuracy"]) if data.get("accuracy") else None,
            dict(data["logit_error"]),
        )


@dataclass
class DeploymentCheck:
    """A deployed file against its source: truthy when its flip rate is within ``max_flip_rate``."""

    file: str
    runtime: str  # "onnxruntime" or "litert"
    precision: str  # fp32, fp16 or int8 (what the file stores)
    kept_float: tuple[str, ...]  # stages the file keeps in float32 (from its metadata)
    arithmetic: Arithmetic
    stage_images: int  # images behind the per-stage rows
    stages_exposed: tuple[str, ...]  # stages whose tensors the runtime gave (every one for ONNX)
    loss_enters_at: str | None  # the stage that adds the largest error of its own, beyond its noise floor
    inf_first_at: str | None  # the first stage whose output holds inf or NaN
    probe_drift: float | None  # logits max rel err between the session that exposes the stages and the deployed one
    dataset: DatasetCheck
    max_flip_rate: float = 0.0
    stages: tuple[StageError, ...] = ()
    floor_multiple: float = 2.0  # a fp32 file must stay within this many floors at every stage

    @property
    def reduced(self) -> bool:
        """Whether the file stores less than float32 (its stages are then not held to the float32 floor)."""
        return self.precision != "fp32"

    @property
    def ok(self) -> bool:
        """The flip rate over the images is within ``max_flip_rate``; a fp32 file also stays within its float32
        noise floor at every stage (float32 arithmetic is all it may differ by)."""
        within = all(s.floor_ratio <= self.floor_multiple or s.max_rel <= TOLERANCE["float32"] for s in self.stages)
        return self.dataset.flip_rate <= self.max_flip_rate and (self.reduced or within)

    def __bool__(self) -> bool:
        return self.ok

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "runtime": self.runtime,
            "precision": self.precision,
            "kept_float": list(self.kept_float),
            "arithmetic": self.arithmetic.to_json(),
            "stage_images": self.stage_images,
            "stages_exposed": list(self.stages_exposed),
            "loss_enters_at": self.loss_enters_at,
            "inf_first_at": self.inf_first_at,
            "probe_drift": _number(self.probe_drift),
            "max_flip_rate": self.max_flip_rate,
            "ok": self.ok,
            "dataset": self.dataset.to_json(),
            "stages": [stage.to_json() for stage in self.stages],
            "floor_multiple": self.floor_multiple,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeploymentCheck:
        return cls(
            file=data["file"],
            runtime=data["runtime"],
            precision=data["precision"],
            kept_float=tuple(data["kept_float"]),
            arithmetic=Arithmetic.from_json(data["arithmetic"]),
            stage_images=data["stage_images"],
            stages_exposed=tuple(data["stages_exposed"]),
            loss_enters_at=data["loss_enters_at"],
            inf_first_at=data["inf_first_at"],
            probe_drift=data["probe_drift"],
            dataset=DatasetCheck.from_json(data["dataset"]),
            max_flip_rate=data["max_flip_rate"],
            stages=tuple(StageError.from_json(stage) for stage in data.get("stages", ())),
            floor_multiple=data.get("floor_multiple", 2.0),
        )

    def summary_json(self) -> dict[str, Any]:
        """The keys ``verify --json`` carries at its top level: loss_enters_at, top1_agreement, flips, accuracy."""
        dataset = self.dataset.to_json()
        return {
            "loss_enters_at": self.loss_enters_at,
            "inf_first_at": self.inf_first_at,
            "deployed_stages": [stage.to_json() for stage in self.stages],
            "top1_agreement": dataset["top1_agreement"],
            "flips": dataset["flips"],
            "accuracy": dataset["accuracy"],
        }

    def lines(self) -> list[str]:
        """The report's lines under the per-stage table (rich markup)."""
        d = self.dataset
        kept = f", stages kept in float32: {', '.join(self.kept_float)}" if self.kept_float else ""
        lines = [
            f"{self.runtime} file {self.file}: stores {self.precision}{kept}",
            f"arithmetic: {self.arithmetic.summary}",
        ]
        if self.stage_images and self.stages_exposed:
            where = self.loss_enters_at or "nowhere (every stage within its float32 noise floor)"
            lines.append(f"per-stage rows on {self.stage_images} images; the loss enters at: {where}")
        if self.inf_first_at:
            line = f"[red]inf/NaN first appears at {self.inf_first_at}[/red] (float16 overflow, tensors stored in fp16)"
            if math.isfinite(d.logit_error["max"]):
                line += f"; {self.runtime}'s own run stayed finite: it keeps float32 between the nodes it fuses"
            lines.append(line)
        if self.probe_drift:
            lines.append(
                f"exposing the stage tensors changed the logits by {self.probe_drift:.2e} (max rel err): the runtime "
                "fuses less when intermediate tensors are outputs"
            )
        error = d.logit_error
        lines.append(
            f"over {d.images} images: top-1 agreement {d.top1_agreement:.2%} ({len(d.flips)} flips); logits max rel "
            f"err max {error['max']:.3g}, mean {error['mean']:.3g}, p99 {error['p99']:.3g}"
        )
        if d.accuracy:
            lines.append(
                f"accuracy on {d.accuracy.labels} labels: source {d.accuracy.source:.2%}, deployed "
                f"{d.accuracy.deployed:.2%}"
            )
        for flip in d.flips[:PRINTED_FLIPS]:
            lines.append(
                f"  flip: image {flip.index}: source class {flip.source_class} (margin {flip.source_margin:.3g}) -> "
                f"{flip.deployed_class}"
            )
        if len(d.flips) > PRINTED_FLIPS:
            lines.append(f"  ... and {len(d.flips) - PRINTED_FLIPS} more (--json lists every flip)")
        return lines

    def verdict(self) -> str:
        """The last line: whether the deployed file predicts the source's top-1 within the allowed flip rate."""
        d = self.dataset
        rate = f"flip rate {d.flip_rate:.2%} (limit {self.max_flip_rate:.2%})"
        if self.ok:
            return f"[green]AGREE[/green]: the {self.precision} file predicts the source's top-1 class; {rate}"
        where = f"; the loss enters at {self.loss_enters_at}" if self.loss_enters_at else ""
        return (
            f"[red]DISAGREE[/red]: the {self.precision} file flips {len(d.flips)} of {d.images} images; {rate}{where}"
        )


def finite_or_none(value: float) -> float | None:
    """A float for JSON, None where not finite (LiteRT's inf outputs)."""
    return value if math.isfinite(value) else None
