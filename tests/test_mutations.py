"""Each classic porting bug, planted in a copy of the converted torch twin, must fail the parity check
AND be located by `verify`: the right stage or ResidualUnit, the right layer, the right cause.

A suite that has never been seen failing proves nothing; this file is where it is seen failing.
Inputs are 32x32 (even at every stride-2 layer, where TF pads asymmetrically) and the weights hostile.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import make_twins
from torch import nn

from conversion.arrays import TOLERANCE, max_rel_err, nhwc_to_nchw, seeded_images
from conversion.verify import Cause, keras_floor_twin, verify_models
from torch_impl.padding import pad_same

TOL = TOLERANCE["float32"]


@pytest.fixture(scope="module")
def twins_softmax_512():
    """A 512-class softmax head: its Dense kernel is square, so a missing transpose passes shape checks."""
    return make_twins("float32", num_classes=512, classifier_activation="softmax")


@pytest.fixture(scope="module")
def twins_elu():
    """ELU instead of ReLU: after a ReLU every value is >= 0, so a zero-padded max-pool computes exactly
    what a -inf-padded one does and no output can show it; ELU's negative values can."""
    return make_twins("float32", activation="elu")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return seeded_images(2, 32, 32, seed=7)


@pytest.fixture(scope="module")
def keras_floors() -> dict[int, object]:
    """Each Keras model's floor twin, built once (it depends only on the Keras model, which no test changes)."""
    return {}


def _verify(keras_model, torch_model, images, keras_floors):
    if id(keras_model) not in keras_floors:  # (not setdefault: its default would be built on every call)
        keras_floors[id(keras_model)] = keras_floor_twin(keras_model)
    return verify_models(keras_model, torch_model, images, keras_floor=keras_floors[id(keras_model)])


class _NhwcReadAsNchw(nn.Module):
    """Feeds the stem an NHWC buffer reinterpreted as NCHW (reshape where a transpose was needed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).reshape(x.shape)


class _ZeroPaddedMaxPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.max_pool2d(pad_same(x, 3, 2, value=0.0), 3, 2)


def _symmetric_padding(model: nn.Module) -> None:
    conv = model.unit_7.main_layers[0]  # the first 3x3/2 conv of the 256-filter stage
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=2, padding=1, bias=False)
    plain.weight = conv.weight
    model.unit_7.main_layers[0] = plain


def _swap_mean_and_variance(model: nn.Module) -> None:
    bn = model.unit_9.main_layers[4]
    mean = bn.running_mean.clone()
    bn.running_mean.copy_(bn.running_var)
    bn.running_var.copy_(mean)


def _swap_kernel_h_and_w(model: nn.Module) -> None:
    conv = model.unit_12.main_layers[3]
    conv.weight.copy_(conv.weight.transpose(2, 3).contiguous())


@dataclass(frozen=True)
class Mutation:
    id: str
    twins: str  # fixture name
    plant: Callable[[nn.Module], None]
    stage: str  # where verify must place the origin
    unit: int | None
    layer: str | None
    cause: Cause  # what the diagnosis must name
    forward_parity_fails: bool = True  # (j) shows only in training mode


MUTATIONS = [
    Mutation(
        "a-symmetric-padding-on-strided-conv",
        "twins_f32",
        _symmetric_padding,
        "unit_7",
        7,
        "main_layers.0",
        Cause.SYMMETRIC_PADDING,
    ),
    Mutation(
        "b-zero-padded-max-pool",
        "twins_elu",
        lambda m: setattr(m, "stem_pool", _ZeroPaddedMaxPool()),
        "stem",
        None,
        "stem_pool",
        Cause.MAX_POOL_ZERO_PADDING,
    ),
    Mutation(
        "c-batchnorm-epsilon-1e-5",
        "twins_f32",
        lambda m: setattr(m.unit_5.main_layers[1], "eps", 1e-5),
        "unit_5",
        5,
        "main_layers.1",
        Cause.BN_EPSILON,
    ),
    Mutation(
        "d-running-mean-and-variance-swapped",
        "twins_f32",
        _swap_mean_and_variance,
        "unit_9",
        9,
        "main_layers.4",
        Cause.BN_MEAN_VARIANCE_SWAPPED,
    ),
    Mutation(
        "e-conv-kernel-h-and-w-swapped",
        "twins_f32",
        _swap_kernel_h_and_w,
        "unit_12",
        12,
        "main_layers.3",
        Cause.KERNEL_HW_SWAPPED,
    ),
    Mutation(
        "f-dense-kernel-not-transposed",
        "twins_softmax_512",
        lambda m: m.classifier.weight.copy_(m.classifier.weight.T.contiguous()),
        "logits",
        None,
        "classifier",
        Cause.DENSE_NOT_TRANSPOSED,
    ),
    Mutation(
        "g-projection-without-batchnorm",
        "twins_f32",
        lambda m: setattr(m.unit_3, "skip_layers", nn.ModuleList([m.unit_3.skip_layers[0]])),
        "unit_3",
        3,
        "skip_layers",
        Cause.LAYER_MISSING,
    ),
    Mutation(
        "h-nhwc-input-fed-as-nchw",
        "twins_f32",
        lambda m: setattr(m, "stem_conv", nn.Sequential(_NhwcReadAsNchw(), m.stem_conv)),
        "stem",
        None,
        "stem_conv",
        Cause.LAYOUT_MIXUP,
    ),
    Mutation(
        "i-softmax-applied-twice",
        "twins_softmax_512",
        lambda m: setattr(m.classifier, "activation", nn.Sequential(nn.Softmax(-1), nn.Softmax(-1))),
        "output",
        None,
        "classifier",
        Cause.ACTIVATION_TWICE,
    ),
    Mutation(
        "i-softmax-missing",
        "twins_softmax_512",
        lambda m: setattr(m.classifier, "activation", nn.Identity()),
        "output",
        None,
        "classifier",
        Cause.ACTIVATION_MISSING,
    ),
    Mutation(
        "j-batchnorm-momentum-inverted",
        "twins_f32",
        lambda m: setattr(m.unit_10.main_layers[1], "momentum", 0.99),
        "unit_10",
        10,
        "main_layers.1",
        Cause.BN_MOMENTUM_UNCONVERTED,
        forward_parity_fails=False,
    ),
]


def _final_outputs(keras_model, torch_model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        torch_out = torch_model(torch.from_numpy(nhwc_to_nchw(images))).numpy()
    return np.asarray(keras_model(images)), torch_out


@pytest.mark.parametrize("twins", ["twins_f32", "twins_softmax_512", "twins_elu"])
def test_unmutated_twins_pass(twins, images, keras_floors, request):
    keras_model, torch_model = request.getfixturevalue(twins)
    report = _verify(keras_model, torch_model, images, keras_floors)
    assert report, report.diagnosis
    assert report.first_divergent_unit is None and report.first_divergent_stage is None


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.id for m in MUTATIONS])
def test_planted_bug_fails_parity_and_verify_locates_it(mutation: Mutation, images, keras_floors, request):
    keras_model, twin = request.getfixturevalue(mutation.twins)
    mutant = copy.deepcopy(twin)
    with torch.no_grad():
        mutation.plant(mutant)

    keras_out, mutant_out = _final_outputs(keras_model, mutant, images)
    if mutation.forward_parity_fails:
        # The parity check (max relative error of the outputs <= 1e-5) fails, by orders of magnitude.
        assert max_rel_err(mutant_out, keras_out) > 100 * TOL
    else:
        # Eval-mode outputs still agree: only the training-mode check can catch it.
        assert max_rel_err(mutant_out, keras_out) <= TOL

    report = _verify(keras_model, mutant, images, keras_floors)
    assert not report
    if mutation.forward_parity_fails:  # the stage where it enters is beyond its floor, by orders of magnitude
        row = next(row.torch for row in report.stages if row.stage == mutation.stage)
        assert row.local_floor_ratio > 100 * report.floor_multiple, row
    else:
        assert report.training_check.floor_ratio > 100 * report.floor_multiple, report.training_check
    assert report.first_divergent_stage == mutation.stage
    assert report.first_divergent_unit == mutation.unit
    assert report.diagnosis.layer == mutation.layer
    assert report.diagnosis.cause is mutation.cause, report.diagnosis
