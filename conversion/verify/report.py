"""Typed reports of ``verify`` and ``verify --train``: truthy when the implementations agree, JSON both ways, and
the one module that prints them.

A report's fields are what the printers read; ``to_json()`` gives the plain dict that ``--json`` prints, and
``from_json()`` reads it back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from conversion.structure import UNIT_COUNT
from conversion.verify.causes import Cause


def _number(value: Any) -> Any:
    """Floats as JSON numbers, inf and nan included (``json.dump(allow_nan=True)`` writes them)."""
    return float(value) if isinstance(value, float) else value


@dataclass(frozen=True)
class Diagnosis:
    """Why two implementations diverge: the bug that reproduces it, and the numbers that show it."""

    cause: Cause
    detail: str = ""  # this instance's specifics: the padding, the epsilon, Bessel's n/(n-1), ...
    evidence: str = ""  # what was measured to name it
    stage: str | None = None  # inference: stem, unit_0 ... unit_15, pooled, logits, output
    layer: str | None = None  # inference: the layer inside the stage (main_layers.1, stem_pool, ...)
    also: tuple[Cause, ...] = ()  # other causes not distinguishable from ``cause`` beyond the noise floor

    @property
    def message(self) -> str:
        """One line: the cause, its numbers, and any cause it cannot be told from."""
        text = self.cause.message + (f" ({self.detail})" if self.detail else "")
        if self.also:
            others = "; or ".join(c.message for c in self.also)
            text += f"; or {others} (not distinguishable beyond the noise floor)"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "cause": self.message,
            "cause_id": self.cause.name,
            "also": [c.name for c in self.also],
            "detail": self.detail,
            "evidence": self.evidence,
            "stage": self.stage,
            "layer": self.layer,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Diagnosis | None:
        if data is None:
            return None
        return cls(
            Cause[data["cause_id"]],
            data.get("detail", ""),
            data.get("evidence", ""),
            data.get("stage"),
            data.get("layer"),
            tuple(Cause[name] for name in data.get("also", ())),
        )


# --- verify ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageComparison:
    """One implementation against the Keras reference at one stage."""

    max_abs: float
    max_rel: float  # max |x - keras| / max |keras|
    cosine: float
    noise_floor: float  # floor_keras + floor_other: what rounding alone gives here
    floor_ratio: float  # max_rel / noise_floor
    ill_conditioned: bool  # the floor itself exceeds the absolute bound
    local_max_rel: float | None  # the stage fed Keras's own input; None where not computed (ONNX)
    local_noise_floor: float | None  # measured only where the local error exceeds the bound
    local_floor_ratio: float | None
    ok: bool

    @property
    def tolerance_to_pass(self) -> float:
        """The smallest absolute bound under which this stage would pass."""
        return self.max_rel

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: _number(v) for k, v in dataclasses.asdict(self).items()},
            "tolerance_to_pass": self.tolerance_to_pass,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageComparison:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class StageRow:
    """One stage: its output shape and each implementation's comparison."""

    stage: str
    shape: tuple[int, ...]
    torch: StageComparison | None = None
    onnx: StageComparison | None = None

    def comparisons(self) -> dict[str, StageComparison]:
        """{"torch": ..., "onnx": ...} for those compared here."""
        return {name: c for name, c in (("torch", self.torch), ("onnx", self.onnx)) if c is not None}

    def to_json(self) -> dict[str, Any]:
        comparisons = {name: c.to_json() for name, c in self.comparisons().items()}
        return {"stage": self.stage, "shape": list(self.shape), **comparisons}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageRow:
        parts = {k: StageComparison.from_json(data[k]) for k in ("torch", "onnx") if k in data}
        return cls(data["stage"], tuple(data["shape"]), **parts)


@dataclass(frozen=True)
class BatchNormCheck:
    """One training-mode forward in each: are the BatchNorm moving statistics updated alike?"""

    ok: bool
    skipped: str | None = None  # why it did not run (a single value per channel)
    first_divergent_layer: str | None = None
    max_rel: float | None = None  # the worst error over every paired BatchNorm
    noise_floor: float | None = None  # of the statistic with the worst ratio
    floor_ratio: float | None = None
    ill_conditioned: tuple[str, ...] = ()  # BatchNorms whose floor exceeds the bound (few values averaged)
    diagnosis: Diagnosis | None = None

    def to_json(self) -> dict[str, Any]:
        data = {k: _number(v) for k, v in dataclasses.asdict(self).items() if k not in ("diagnosis", "ill_conditioned")}
        return {
            **data,
            "ill_conditioned": list(self.ill_conditioned),
            "cause": self.diagnosis.message if self.diagnosis else None,
            "diagnosis": self.diagnosis.to_json() if self.diagnosis else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> BatchNormCheck | None:
        if data is None:
            return None
        fields = {f.name for f in dataclasses.fields(cls)} - {"diagnosis", "ill_conditioned"}
        return cls(
            **{k: data[k] for k in fields},
            ill_conditioned=tuple(data["ill_conditioned"]),
            diagnosis=Diagnosis.from_json(data["diagnosis"]),
        )


@dataclass(frozen=True)
class SourceCheck:
    """The user's own Keras model (its own code) against the rebuilt reference."""

    max_rel: float
    tolerance: float
    ok: bool


@dataclass
class VerifyReport:
    """``verify``'s result: truthy when every implementation agrees with Keras at every stage."""

    agree: bool
    dtype: str
    tolerance: float  # the absolute bound
    floor_multiple: float  # how many noise floors rounding may reach
    batch: int
    size: tuple[int, int]
    stages: list[StageRow]
    first_divergent_stage: str | None
    diagnosis: Diagnosis | None
    training_check: BatchNormCheck | None
    source_check: SourceCheck | None = None
    cast: str | None = None  # what was cast for --dtype, if anything

    reference = "keras"
    metric = "max |x - keras| / max |keras| per stage"

    def __bool__(self) -> bool:
        return self.agree

    @property
    def compared(self) -> list[str]:
        return sorted({name for row in self.stages for name in row.comparisons()})

    @property
    def first_divergent_unit(self) -> int | None:
        stage = self.first_divergent_stage
        return int(stage.split("_")[1]) if stage and stage.startswith("unit_") else None

    @property
    def noise_floor_method(self) -> str:
        if self.dtype == "float32":
            return "each side against its float64 twin (same weights and images in float64)"
        return "each side against its twin with every weight and image element one ulp apart"

    def to_json(self) -> dict[str, Any]:
        return {
            "agree": self.agree,
            "reference": self.reference,
            "compared": self.compared,
            "dtype": self.dtype,
            "tolerance": self.tolerance,
            "floor_multiple": self.floor_multiple,
            "metric": self.metric,
            "noise_floor_method": self.noise_floor_method,
            "batch": self.batch,
            "size": list(self.size),
            "cast": self.cast,
            "first_divergent_stage": self.first_divergent_stage,
            "first_divergent_unit": self.first_divergent_unit,
            "diagnosis": self.diagnosis.to_json() if self.diagnosis else None,
            "training_check": self.training_check.to_json() if self.training_check else None,
            "source_check": dataclasses.asdict(self.source_check) if self.source_check else None,
            "stages": [row.to_json() for row in self.stages],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VerifyReport:
        source = data.get("source_check")
        return cls(
            agree=data["agree"],
            dtype=data["dtype"],
            tolerance=data["tolerance"],
            floor_multiple=data["floor_multiple"],
            batch=data["batch"],
            size=tuple(data["size"]),
            stages=[StageRow.from_json(row) for row in data["stages"]],
            first_divergent_stage=data["first_divergent_stage"],
            diagnosis=Diagnosis.from_json(data["diagnosis"]),
            training_check=BatchNormCheck.from_json(data["training_check"]),
            source_check=SourceCheck(**source) if source else None,
            cast=data.get("cast"),
        )


# --- verify --train ---------------------------------------------------------------------------------------

TENSOR_KINDS = ("batchnorm statistic", "loss", "gradient", "optimizer slot", "weight")  # a step's causal order


@dataclass(frozen=True)
class TrainingStep:
    """One step: each tensor kind's worst error, and its ratio to the noise floor."""

    step: int
    learning_rate: float | None
    keras_loss: float
    torch_loss: float
    loss_rel: float
    grad_rel: float
    weight_rel: float
    bn_rel: float
    slot_rel: float | None  # None when the torch optimizer keeps no Keras-comparable slots
    noise_floor: dict[str, float]  # per kind: the floor of the tensor with the worst ratio
    floor_ratio: dict[str, float]  # per kind: that worst ratio
    ill_conditioned: tuple[str, ...]  # tensors whose floor alone exceeds the bound
    ok: bool

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {**{k: _number(v) for k, v in data.items()}, "ill_conditioned": list(self.ill_conditioned)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingStep:
        values = {f.name: data[f.name] for f in dataclasses.fields(cls)}
        return cls(**(values | {"ill_conditioned": tuple(values["ill_conditioned"])}))


@dataclass(frozen=True)
class DivergentTensor:
    """The first tensor beyond its noise floor and the bound, in the step's causal order."""

    step: int
    kind: str  # one of TENSOR_KINDS
    torch: str  # its torch name ("loss"; "path [slot]" for an optimizer slot)
    keras: str
    max_rel: float
    noise_floor: float
    floor_ratio: float


@dataclass(frozen=True)
class Top1:
    """Inference-mode top-1 of every sample after training, in both."""

    agree: bool
    samples: int
    differ: int
    differ_beyond_floor: int  # differing samples that neither side's floor twin flips too


@dataclass
class TrainingReport:
    """``verify --train``'s result: truthy when every tensor of every step agrees within its floor."""

    agree: bool
    dtype: str
    tolerance: float
    floor_multiple: float
    batch: int
    size: tuple[int, int]
    keras_optimizer: str
    torch_optimizer: str
    loss: str
    rows: list[TrainingStep]
    top1_after_training: Top1 | None
    first_divergent_tensor: DivergentTensor | None
    diagnosis: Diagnosis | None
    cast: str | None = None

    reference = "keras"
    judged_steps = "all"
    metric = "max |torch - keras| / max |keras| per tensor (the loss: |torch - keras| / |keras|), worst per step"
    keras_gradients = "read from train_on_batch (run eagerly): the gradients train_step hands to apply_gradients"

    def __bool__(self) -> bool:
        return self.agree

    @property
    def steps(self) -> int:
        return len(self.rows)

    @property
    def first_divergent_step(self) -> int | None:
        return None if self.first_divergent_tensor is None else self.first_divergent_tensor.step

    @property
    def noise_floor_method(self) -> str:
        if self.dtype == "float32":
            return "each side against its own float64 run (same weights and images in float64)"
        return "each side against its own run with every weight and image element one ulp apart"

    @property
    def worst(self) -> dict[str, float | None]:
        """Per tensor kind, the worst error over every step."""
        columns = {
            "loss": "loss_rel",
            "gradient": "grad_rel",
            "weight": "weight_rel",
            "batchnorm statistic": "bn_rel",
            "optimizer slot": "slot_rel",
        }
        values = {kind: [getattr(r, key) for r in self.rows] for kind, key in columns.items()}
        return {kind: max((x for x in v if x is not None), default=None) for kind, v in values.items()}

    @property
    def worst_floor_ratio(self) -> dict[str, float | None]:
        """Per tensor kind, the worst ratio to the noise floor over every step."""
        return {
            kind: max((r.floor_ratio[kind] for r in self.rows if kind in r.floor_ratio), default=None)
            for kind in TENSOR_KINDS
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "agree": self.agree,
            "reference": self.reference,
            "dtype": self.dtype,
            "tolerance": self.tolerance,
            "floor_multiple": self.floor_multiple,
            "metric": self.metric,
            "noise_floor_method": self.noise_floor_method,
            "judged_steps": self.judged_steps,
            "batch": self.batch,
            "size": list(self.size),
            "steps": self.steps,
            "cast": self.cast,
            "keras_optimizer": self.keras_optimizer,
            "torch_optimizer": self.torch_optimizer,
            "loss": self.loss,
            "keras_gradients": self.keras_gradients,
            "rows": [row.to_json() for row in self.rows],
            "worst": self.worst,
            "worst_floor_ratio": self.worst_floor_ratio,
            "top1_after_training": dataclasses.asdict(self.top1_after_training) if self.top1_after_training else None,
            "first_divergent_step": self.first_divergent_step,
            "first_divergent_tensor": (
                {k: _number(v) for k, v in dataclasses.asdict(self.first_divergent_tensor).items()}
                if self.first_divergent_tensor
                else None
            ),
            "diagnosis": self.diagnosis.to_json() if self.diagnosis else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingReport:
        top1, first = data.get("top1_after_training"), data.get("first_divergent_tensor")
        return cls(
            agree=data["agree"],
            dtype=data["dtype"],
            tolerance=data["tolerance"],
            floor_multiple=data["floor_multiple"],
            batch=data["batch"],
            size=tuple(data["size"]),
            keras_optimizer=data["keras_optimizer"],
            torch_optimizer=data["torch_optimizer"],
            loss=data["loss"],
            rows=[TrainingStep.from_json(row) for row in data["rows"]],
            top1_after_training=Top1(**top1) if top1 else None,
            first_divergent_tensor=DivergentTensor(**first) if first else None,
            diagnosis=Diagnosis.from_json(data["diagnosis"]),
            cast=data.get("cast"),
        )


# --- printing --------------------------------------------------------------------------------------------

_WIDTH = 120  # wide enough for every column, also where stdout is not a terminal (rich would use 80)


def _console() -> object:
    from rich.console import Console  # imported only to print

    console = Console()
    return Console(width=max(console.width, _WIDTH)) if not console.is_terminal else console


def print_verify_report(report: VerifyReport) -> None:
    """The per-stage table and the verdict, on stdout."""
    from rich.table import Table

    cast = f", {report.cast}" if report.cast else ""
    table = Table(
        title=f"Per-stage error against Keras ({report.dtype}{cast}; bound {report.tolerance:g} or "
        f"{report.floor_multiple:g} x the noise floor; batch {report.batch}, {report.size[0]}x{report.size[1]})"
    )
    for column in ("stage", "vs", "max abs", "max rel", "floor", "ratio", "1 - cos", "local rel", ""):
        table.add_column(column, justify="left" if column in ("stage", "vs") else "right")
    for row in report.stages:
        for who, c in row.comparisons().items():
            verdict = "ok" if c.ok else "[red]DIVERGES[/red]"
            if c.ill_conditioned:
                verdict += " [yellow](ill-conditioned)[/yellow]"
            table.add_row(
                row.stage,
                who,
                f"{c.max_abs:.2e}",
                f"{c.max_rel:.2e}",
                f"{c.noise_floor:.1e}",
                f"{c.floor_ratio:.2g}",
                f"{1 - c.cosine:.2e}",
                "" if c.local_max_rel is None else f"{c.local_max_rel:.2e}",
                verdict,
            )
    console = _console()
    console.print(table)
    source = report.source_check
    if source:
        verdict = "ok" if source.ok else "[red]differs[/red]"
        console.print(f"the file's own model against its rebuilt twin: max rel err {source.max_rel:.2e} ({verdict})")
    check = report.training_check
    if check and check.skipped:
        console.print(f"training-mode BatchNorm update: skipped ({check.skipped})")
    elif check and check.ok:
        ill = f"; ill-conditioned, rounding alone over the bound: {', '.join(check.ill_conditioned)}"
        console.print(
            f"training-mode BatchNorm update: ok (worst max rel err {check.max_rel:.2e}; worst ratio to the noise "
            f"floor {check.floor_ratio:.2g}{ill if check.ill_conditioned else ''})"
        )
    elif check:
        cause = check.diagnosis.message if check.diagnosis else ""
        console.print(f"training-mode BatchNorm update: [red]differs[/red] at {check.first_divergent_layer}: {cause}")
    if report:
        worst = max(c.max_rel for row in report.stages for c in row.comparisons().values())
        ratio = max(c.floor_ratio for row in report.stages for c in row.comparisons().values())
        console.print(
            f"[green]AGREE[/green]: {', '.join(report.compared)} match Keras at every stage; worst max relative "
            f"error {worst:.2e} (bound {report.tolerance:g}), worst ratio to the noise floor {ratio:.2g} (limit "
            f"{report.floor_multiple:g})"
        )
        return
    d, unit = report.diagnosis, report.first_divergent_unit
    where = report.first_divergent_stage or (check.first_divergent_layer if check else None)
    console.print(
        f"[red]DISAGREE[/red]: first divergent stage {where}"
        + (f" (ResidualUnit {unit})" if unit is not None else "")
        + (f", layer {d.layer}" if d and d.layer else "")
        + (f": likely cause: {d.message}" if d else "")
    )


def _kind_cell(row: TrainingStep, value: float | None, kind: str) -> str:
    """'error (ratio x)' for one tensor kind of one step."""
    if value is None:
        return "n/a"
    ratio = row.floor_ratio.get(kind)
    return f"{value:.1e} ({ratio:.2g}x)" if ratio is not None and math.isfinite(ratio) else f"{value:.1e}"


def print_training_report(report: TrainingReport) -> None:
    """The step-by-step table and the verdict, on stdout."""
    from rich.table import Table

    cast = f", {report.cast}" if report.cast else ""
    table = Table(
        title=f"Training step by step against Keras ({report.dtype}{cast}; bound {report.tolerance:g} or "
        f"{report.floor_multiple:g} x the noise floor; batch {report.batch}, {report.size[0]}x{report.size[1]}): "
        "max rel err (its ratio to the noise floor)",
        caption=f"{report.keras_optimizer} | loss: {report.loss}",
    )
    for column in ("step", "lr", "keras loss", "loss", "grads", "weights", "BN stats", "slots", ""):
        table.add_column(column, justify="right")
    for r in report.rows:
        verdict = "ok" if r.ok else "[red]DIVERGES[/red]"
        if r.ill_conditioned:
            verdict += f" [yellow]({len(r.ill_conditioned)} ill-conditioned)[/yellow]"
        table.add_row(
            str(r.step),
            f"{r.learning_rate:.4g}" if r.learning_rate is not None else "",
            f"{r.keras_loss:.8g}",
            _kind_cell(r, r.loss_rel, "loss"),
            _kind_cell(r, r.grad_rel, "gradient"),
            _kind_cell(r, r.weight_rel, "weight"),
            _kind_cell(r, r.bn_rel, "batchnorm statistic"),
            _kind_cell(r, r.slot_rel, "optimizer slot"),
            verdict,
        )
    console = _console()
    console.print(table)
    top1 = report.top1_after_training
    if top1:
        flipped = top1.differ - top1.differ_beyond_floor
        console.print(
            f"top-1 after training: {top1.samples - top1.differ}/{top1.samples} samples agree"
            + (f" ({flipped} of the others flip in a floor twin too: rounding)" if flipped else "")
        )
    if report:
        worst = max((v for v in report.worst.values() if v is not None), default=0.0)
        ratio = max((v for v in report.worst_floor_ratio.values() if v is not None), default=0.0)
        console.print(
            f"[green]AGREE[/green]: every step matches Keras; worst max relative error {worst:.2e} (bound "
            f"{report.tolerance:g}), worst ratio to the noise floor {ratio:.2g} (limit {report.floor_multiple:g})"
        )
        return
    first, d = report.first_divergent_tensor, report.diagnosis
    where = (
        f"first divergent tensor at step {first.step}: {first.kind} {first.torch} (Keras {first.keras}), max rel err "
        f"{first.max_rel:.3g}, {first.floor_ratio:.3g} x its noise floor {first.noise_floor:.2g}"
        if first
        else "the top-1 predictions differ after training, beyond what rounding flips"
    )
    console.print(f"[red]DISAGREE[/red]: {where}" + (f": likely cause: {d.message}" if d else ""))


def unit_names() -> list[str]:
    """stem, unit_0 ... unit_15, pooled, logits: the stages every report has (output too with a head activation)."""
    return ["stem", *(f"unit_{i}" for i in range(UNIT_COUNT)), "pooled", "logits"]
