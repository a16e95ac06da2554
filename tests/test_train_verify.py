"""Training parity: Keras's train_on_batch and the torch twin's training step agree tensor by tensor, and each
classic training-port bug, planted on the torch side, is caught AND named by `verify --train`'s report.

Each required optimizer is run once (float64, hostile weights, batch 4 of 45x38, a schedule each) for
TRAIN_STEPS steps; its first Keras steps are kept and replayed against the planted bugs, so a mutation costs
only its torch steps. The reference fixture is module-scoped and indirect: pytest groups the tests by
optimizer, so one recorded run is alive at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import pytest
import torch
from conftest import make_twins
from torch import nn

from conversion import training
from conversion.cli import main
from conversion.errors import InputError
from conversion.verify import (
    TRAIN_TOLERANCE,
    Cause,
    KerasRun,
    Sources,
    TrainingChoice,
    TrainingOptions,
    TrainingReport,
    verify_training,
)
from conversion.verify.sources import train_sources

# The full acceptance runs are 10 steps (RESNET34_PARITY_TRAIN_STEPS=10: ~4 s a step here); the default keeps
# this file inside the suite's time budget and still covers a moving schedule and momentum across steps.
TRAIN_STEPS = int(os.environ.get("RESNET34_PARITY_TRAIN_STEPS", "2"))
BATCH, SIZE = 4, (45, 38)  # odd, non-square
WD = 1e-4
CLIPNORM = 0.05  # small enough that Keras rescales most gradients at every step here

schedules = keras.optimizers.schedules
OPTIMIZERS: dict[str, Callable[[], keras.optimizers.Optimizer]] = {
    "sgd-nesterov": lambda: keras.optimizers.SGD(
        schedules.ExponentialDecay(0.002, decay_steps=1, decay_rate=0.9), momentum=0.9, nesterov=True, weight_decay=WD
    ),
    "adam-weight-decay": lambda: keras.optimizers.Adam(schedules.CosineDecay(1e-3, decay_steps=10), weight_decay=WD),
    "adamw": lambda: keras.optimizers.AdamW(
        schedules.PiecewiseConstantDecay([0, 4], [1e-3, 5e-4, 2.5e-4]), weight_decay=4e-3
    ),
    "rmsprop-centered-momentum": lambda: keras.optimizers.RMSprop(
        schedules.ExponentialDecay(1e-3, decay_steps=1, decay_rate=0.9), momentum=0.9, centered=True, clipnorm=CLIPNORM
    ),
}
COMPILED = "adam-weight-decay"  # this run takes its optimizer and (categorical) loss from model.compile
KEEP = {"sgd-nesterov": 2, "adamw": 1, "rmsprop-centered-momentum": 1}  # Keras steps replayed by the mutations


@pytest.fixture(scope="module")
def twins64():
    """float64 twins with the book's softmax head and hostile weights; the torch one is kept pristine."""
    keras_model, torch_model = make_twins("float64", classifier_activation="softmax")
    return keras_model, torch_model, keras_model.get_weights()


@pytest.fixture(scope="module")
def batches() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    return rng.standard_normal((TRAIN_STEPS, BATCH, *SIZE, 3)), rng.integers(0, 10, (TRAIN_STEPS, BATCH))


@pytest.fixture(scope="module")
def reference(twins64, batches) -> Callable[[str], tuple[TrainingReport, KerasRun]]:
    """reference(name): that optimizer's full run (its report) and its first Keras steps, for the mutants.

    Each optimizer runs once; only the latest run's Keras steps are kept (each is ~0.5 GB in float64), so the
    mutation tests below come first, grouped by the run they replay.
    """
    reports: dict[str, TrainingReport] = {}
    latest: dict[str, KerasRun] = {}

    def get(name: str, replay: bool = True) -> tuple[TrainingReport, KerasRun | None]:
        if name not in reports or (replay and name not in latest):
            latest.clear()
            keras_model, torch_model, initial = twins64
            keras_model.set_weights(initial)
            record = KerasRun(None, None, None)
            chosen = {"keras_optimizer": OPTIMIZERS[name]()}
            if name == COMPILED:  # a compiled model trains with its own optimizer and loss
                keras_model.compile(optimizer=chosen.pop("keras_optimizer"), loss="categorical_crossentropy")
            reports[name] = verify_training(
                keras_model,
                copy.deepcopy(torch_model),
                *batches,
                TrainingOptions(**chosen),
                record=record,
                keep_steps=KEEP.get(name, 0),
            )
            keras_model.set_weights(initial)
            latest[name] = record
        return reports[name], latest.get(name)

    return get


# --- planted training-port bugs ----------------------------------------------------------------------


def _keras_rates(run: KerasRun) -> list[float]:
    return [step.learning_rate for step in run.steps]


def _scheduled(opt: torch.optim.Optimizer, run: KerasRun) -> torch.optim.lr_scheduler.LambdaLR:
    """A torch scheduler giving torch's optimizer Keras's own rates (so only the planted convention differs)."""
    rates = _keras_rates(run)
    base = opt.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: rates[min(k, len(rates) - 1)] / base)


class _DecoupledSGD(torch.optim.SGD):
    """torch's SGD with Keras's decoupled decay done by hand first: only the momentum convention is torch's."""

    def __init__(self, params, decay: float, **options) -> None:
        super().__init__(params, **options)
        self.decay = decay

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(1 - group["lr"] * self.decay)
        return super().step(closure)


class _ClipByValue:
    """``clip_grad_value_`` before the (otherwise correct) optimizer's step."""

    def __init__(self, inner: torch.optim.Optimizer, params: list[torch.Tensor], value: float) -> None:
        self.inner, self.params, self.value = inner, params, value
        self.state = inner.state

    def step(self) -> None:
        nn.utils.clip_grad_value_(self.params, self.value)
        self.inner.step()


def _f32(x: float) -> float:
    return float(np.float32(x))  # Keras on TensorFlow rounds these hyperparameters through float32


def _plain_batchnorm(model: nn.Module, run: KerasRun) -> dict:
    """Swap every BatchNorm for torch's own nn.BatchNorm2d with the same state (unbiased running variance)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d) and type(child) is not nn.BatchNorm2d:
                plain = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum).to(child.weight)
                plain.load_state_dict(child.state_dict())
                setattr(module, child_name, plain)
    return {}


def _inverted_momentum(model: nn.Module, run: KerasRun) -> dict:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.99  # Keras's momentum given to torch unconverted
    return {}


def _eval_mode(model: nn.Module, run: KerasRun) -> dict:
    model.eval()
    model.train = lambda mode=True: model  # the training loop's model.train() is lost
    return {}


def _torch_adamw(model: nn.Module, run: KerasRun) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=_keras_rates(run)[0], eps=1e-8, weight_decay=_f32(4e-3))
    return {"torch_optimizer": opt, "torch_scheduler": _scheduled(opt, run)}


def _coupled_weight_decay(model: nn.Module, run: KerasRun) -> dict:
    opt = torch.optim.SGD(
        model.parameters(), lr=_keras_rates(run)[0], momentum=_f32(0.9), nesterov=True, weight_decay=_f32(WD)
    )
    return {"torch_optimizer": opt, "torch_scheduler": _scheduled(opt, run)}


def _torch_momentum_convention(model: nn.Module, run: KerasRun) -> dict:
    opt = _DecoupledSGD(model.parameters(), _f32(WD), lr=_keras_rates(run)[0], momentum=_f32(0.9), nesterov=True)
    return {"torch_optimizer": opt, "torch_scheduler": _scheduled(opt, run)}


def _clip_by_value(model: nn.Module, run: KerasRun) -> dict:
    unclipped = type(run.optimizer).from_config(run.optimizer.get_config() | {"clipnorm": None})
    params = list(model.parameters())
    return {"torch_optimizer": _ClipByValue(training.torch_optimizer(unclipped, model), params, CLIPNORM)}


def _double_softmax(model: nn.Module, run: KerasRun) -> dict:
    return {"torch_loss": nn.CrossEntropyLoss()}  # applied to the softmax output


def _summed_loss(model: nn.Module, run: KerasRun) -> dict:
    right = training.torch_loss(run.loss, output_activation="softmax")
    return {"torch_loss": dataclasses.replace(right, reduction="sum")}


@dataclass(frozen=True)
class Mutation:
    id: str
    reference: str  # the optimizer run it replays
    plant: Callable[[nn.Module, KerasRun], dict]  # -> the torch side's TrainingOptions
    steps: int
    step: int  # where it must first diverge
    kinds: tuple[str, ...]  # the first divergent tensor's kind
    torch_path: str | None  # and its torch name (None: any)
    cause: Cause  # the cause that must be named


MUTATIONS = [  # grouped by the run they replay: one run's Keras steps are kept at a time
    Mutation("bn-unbiased-running-variance", "sgd-nesterov", _plain_batchnorm, 1, 0,
             ("batchnorm statistic",), "stem_bn.running_var", Cause.BN_UNBIASED_VARIANCE),
    Mutation("bn-momentum-unconverted", "sgd-nesterov", _inverted_momentum, 1, 0,
             ("batchnorm statistic",), "stem_bn.running_mean", Cause.BN_MOMENTUM_UNCONVERTED),
    Mutation("model-left-in-eval-mode", "sgd-nesterov", _eval_mode, 1, 0,
             ("batchnorm statistic",), "stem_bn.running_mean", Cause.EVAL_MODE),
    Mutation("sgd-weight-decay-coupled", "sgd-nesterov", _coupled_weight_decay, 1, 0,
             ("weight",), "stem_conv.weight", Cause.WEIGHT_DECAY_COUPLED),
    Mutation("crossentropy-on-softmax-output", "sgd-nesterov", _double_softmax, 1, 0,
             ("loss",), "loss", Cause.LOSS_DOUBLE_SOFTMAX),
    Mutation("loss-summed-not-averaged", "sgd-nesterov", _summed_loss, 1, 0,
             ("loss",), "loss", Cause.LOSS_SUMMED),
    Mutation("sgd-momentum-torch-convention-under-schedule", "sgd-nesterov", _torch_momentum_convention, 2, 1,
             ("weight",), "stem_conv.weight", Cause.SGD_MOMENTUM_TORCH_CONVENTION),
    Mutation("adam-torch-epsilon", "adamw", _torch_adamw, 1, 0,
             ("optimizer slot", "weight"), None, Cause.ADAM_EPSILON_TORCH),
    Mutation("clip-by-value-not-norm", "rmsprop-centered-momentum", _clip_by_value, 1, 0,
             ("optimizer slot", "weight"), None, Cause.CLIP_BY_VALUE),
]  # fmt: skip


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.id for m in MUTATIONS])
def test_planted_training_bug_is_caught_and_named(mutation, reference, twins64, batches):
    _, run = reference(mutation.reference)
    keras_model, twin, _ = twins64
    mutant = copy.deepcopy(twin)
    with torch.no_grad():
        torch_side = mutation.plant(mutant, run)
    images, labels = batches
    report = verify_training(
        keras_model, mutant, images[: mutation.steps], labels[: mutation.steps], TrainingOptions(**torch_side),
        reference=run,
    )  # fmt: skip
    assert not report
    first = report.first_divergent_tensor
    assert report.first_divergent_step == first.step == mutation.step, first
    assert first.kind in mutation.kinds, first
    if mutation.torch_path:
        assert first.torch == mutation.torch_path, first
    assert first.keras and first.max_rel > TRAIN_TOLERANCE["float64"]
    assert first.floor_ratio > report.floor_multiple  # beyond rounding, not only beyond the bound
    assert report.diagnosis.cause is mutation.cause and not report.diagnosis.also, report.diagnosis


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_float64_twins_train_alike_step_by_step(name, reference):
    report, _ = reference(name, replay=False)
    assert report, (report.first_divergent_tensor, report.diagnosis)
    assert report.first_divergent_step is None and report.first_divergent_tensor is None
    assert len(report.rows) == TRAIN_STEPS
    assert report.tolerance == TRAIN_TOLERANCE["float64"] == 1e-10
    for kind, worst in report.worst.items():
        assert worst is not None and worst <= 1e-10, (kind, worst)
    for kind, ratio in report.worst_floor_ratio.items():  # measured <= 14.8 over many draws; the limit is 64
        assert ratio is not None and ratio <= report.floor_multiple, (kind, ratio)
    assert report.top1_after_training.agree
    assert "computed in float64" in report.loss  # Keras's loss made in the model's dtype, not floatx
    if name == COMPILED:
        assert report.keras_optimizer.startswith("Keras Adam(learning_rate=CosineDecay")
        assert report.loss.startswith("categorical_crossentropy")
    assert len({row.learning_rate for row in report.rows}) > 1  # the schedule moves


# --- the command ---------------------------------------------------------------------------------------


def test_verify_train_command_float32(capsys):
    """The default twins (hostile weights) in float32: every step judged against its floor (each side's own
    float64 run), and the pair stays within it even where float32 runs separate; top-1 agrees after training."""
    argv = [
        "--train",
        "--dtype",
        "float32",
        "--optimizer",
        "adamw",
        "--steps",
        "2",
        "--size",
        "25",
        "19",
        "--batch",
        "3",
    ]
    assert main(["verify", *argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "float32" and report["batch"] == 3 and report["size"] == [25, 19]
    assert report["keras_optimizer"].startswith("Keras AdamW(learning_rate=CosineDecay")
    assert [row["step"] for row in report["rows"]] == [0, 1]
    assert report["first_divergent_step"] is None and report["first_divergent_tensor"] is None
    assert report["judged_steps"] == "all" and report["floor_multiple"] == 2.0
    for row in report["rows"]:
        assert row["ok"] is True
        # By the triangle inequality a correct pair cannot exceed ~1 x its exact float32 floor (measured <= 1.00).
        assert all(ratio <= 1.0 + 1e-6 for ratio in row["floor_ratio"].values()), row["floor_ratio"]
    assert report["top1_after_training"]["agree"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--steps", "0"), "--steps must be a positive integer"),
        (("--onnx", "x.onnx"), "an ONNX file has none"),
        (("--learning-rate", "-1"), "--learning-rate must be a finite positive number"),
    ],
)
def test_verify_train_bad_input_is_a_user_error(argv, message):
    steps = int(argv[1]) if argv[0] == "--steps" else 10
    sources = Sources(onnx="x.onnx") if argv[0] == "--onnx" else Sources()
    learning_rate = float(argv[1]) if argv[0] == "--learning-rate" else None
    with pytest.raises(InputError, match=message):
        train_sources(sources, TrainingChoice(learning_rate=learning_rate, steps=steps))
