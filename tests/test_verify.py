"""`resnet34-parity verify`: the per-stage report, its JSON, exit codes, and the training-mode check."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from conversion.arrays import TOLERANCE, max_rel_err, nhwc_to_nchw, seeded_images
from conversion.cli import main
from conversion.files import load_torch, save_keras, save_torch
from conversion.structure import UNIT_COUNT
from conversion.verify import Cause, restored_batchnorm_statistics, verify_models
from conversion.verify.noise_floor import one_ulp_apart

STAGES = ["stem", *(f"unit_{i}" for i in range(UNIT_COUNT)), "pooled", "logits"]


@pytest.fixture(scope="module")
def twin_files(twins_f32, tmp_path_factory):
    """The float32 twins written once as .keras and .pt."""
    keras_model, torch_model = twins_f32
    folder = tmp_path_factory.mktemp("twin_files")
    return save_keras(keras_model, folder / "model.keras"), save_torch(torch_model, folder / "model.pt")


def _verify_json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["verify", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_default_verify_agrees_with_a_row_per_stage(capsys, dtype):
    code, report = _verify_json(capsys, "--size", "40", "33", "--batch", "2", "--dtype", dtype)
    assert code == 0 and report["agree"]
    assert report["first_divergent_unit"] is None and report["diagnosis"] is None
    assert [row["stage"] for row in report["stages"]] == [*STAGES, "output"]  # softmax head by default
    assert report["tolerance"] == TOLERANCE[dtype]
    for row in report["stages"]:
        assert row["torch"]["max_rel"] <= TOLERANCE[dtype], row
        assert row["torch"]["tolerance_to_pass"] == row["torch"]["max_rel"]
        # Every row carries its floor. In float32 a correct pair cannot exceed ~1 x its floor (the triangle inequality
        # over the exact float64 floor); in float64 the floor is one draw of one-ulp moves: within its multiple.
        limit = 1.0 + 1e-6 if dtype == "float32" else report["floor_multiple"]
        assert 0 < row["torch"]["noise_floor"] and row["torch"]["floor_ratio"] <= limit, row
        assert not row["torch"]["ill_conditioned"]
    assert report["training_check"]["ok"]


@pytest.mark.parametrize("size", [(32, 32), (17, 23)], ids=["32x32-unit15-sees-2-values", "17x23-odd-non-square"])
def test_small_sizes_agree_where_rounding_alone_exceeds_the_fixed_bound(capsys, size):
    """At 32x32 the last units are 1x1: each channel's batch variance is over 2 values, ill-conditioned in float32
    (measured on AVX-512 with oneDNN: 1.9e-5 against the fixed 1e-5 bound). Judged against its floor, the pair
    agrees, and the report says which BatchNorm is ill-conditioned instead of naming a porting bug."""
    code, report = _verify_json(capsys, "--size", *map(str, size))
    training = report["training_check"]
    assert code == 0 and report["agree"], (report["diagnosis"], training)
    assert report["floor_multiple"] == 2.0
    assert training["ok"] and training["cause"] is None
    assert training["floor_ratio"] <= 1.0 + 1e-6  # the triangle inequality's bound, float64 references ~1e-15
    for name in training["ill_conditioned"]:
        assert name.startswith(("unit_13", "unit_14", "unit_15")), training  # only where few values are averaged


def test_verify_reads_files_and_reports_the_unit_a_corrupted_file_breaks(capsys, twin_files, tmp_path):
    keras_file, torch_file = twin_files
    code, report = _verify_json(capsys, "--keras", str(keras_file), "--torch", str(torch_file), "--size", "32", "32")
    assert code == 0 and report["agree"], report["diagnosis"]

    state = torch.load(torch_file, weights_only=True)
    bn = "unit_9.main_layers.4"  # swap its running mean and variance, a classic converter slip
    state[f"{bn}.running_mean"], state[f"{bn}.running_var"] = state[f"{bn}.running_var"], state[f"{bn}.running_mean"]
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    code, report = _verify_json(capsys, "--keras", str(keras_file), "--torch", str(broken), "--size", "32", "32")
    assert code == 1 and not report["agree"]
    assert report["first_divergent_unit"] == 9
    assert report["diagnosis"]["cause_id"] == Cause.BN_MEAN_VARIANCE_SWAPPED.name


def test_dtype_float64_casts_a_files_weights_and_says_so(capsys, twin_files):
    """--dtype is never silently ignored: a float32 file compared in float64 is cast exactly, and the report says
    so; the float64 pair then agrees to float64 rounding."""
    code, report = _verify_json(capsys, "--keras", str(twin_files[0]), "--dtype", "float64", "--size", "33", "40")
    assert code == 0 and report["agree"], report["diagnosis"]
    assert report["dtype"] == "float64" and report["tolerance"] == TOLERANCE["float64"]
    assert report["cast"] == "the files' float32 weights cast to float64 for the comparison"
    assert max(row["torch"]["max_rel"] for row in report["stages"]) <= 1e-13
    assert report["source_check"]["ok"]  # the file's own model, cast too, against the rebuilt reference


def test_verify_prints_a_table_and_a_verdict(capsys):
    assert main(["verify", "--size", "32", "32", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "unit_15" in out and "AGREE" in out


def test_verify_with_only_a_torch_file_converts_it_to_keras(capsys, twin_files):
    code, report = _verify_json(capsys, "--torch", str(twin_files[1]), "--size", "32", "32")
    assert code == 0 and report["agree"]


def test_training_mode_updates_moving_statistics_like_keras(twins_f32):
    """One training-mode forward in each framework: the twin's moving means AND variances match Keras's
    (biased variance, ``moving * m + batch * (1 - m)``) to float32 rounding, while torch's own
    ``nn.BatchNorm2d`` differs by Bessel's correction n / (n - 1), n = N * H * W, and is named."""
    keras_model, torch_model = twins_f32
    images = seeded_images(2, 64, 64, seed=3)
    before = {name: tensor.clone() for name, tensor in torch_model.state_dict().items()}
    report = verify_models(keras_model, torch_model, images)
    assert report.training_check.ok, report.training_check
    assert report.training_check.max_rel <= 1e-5
    # The training-mode forward ran on the twin itself: its statistics, counters and eval mode are put back.
    assert all(torch.equal(before[name], tensor) for name, tensor in torch_model.state_dict().items())
    assert not any(module.training for module in torch_model.modules())

    keras_bn = keras_model.get_layer("unit_15").main_layers[4]
    old_var = np.array(keras_bn.moving_variance)
    with restored_batchnorm_statistics(keras_model):  # the session's shared model must stay as it was
        keras_model(images, training=True)
        keras_mean, keras_var = np.array(keras_bn.moving_mean), np.array(keras_bn.moving_variance)
    twin = copy.deepcopy(torch_model).train()
    with torch.no_grad():
        twin(torch.from_numpy(nhwc_to_nchw(images)))
    assert max_rel_err(twin.unit_15.main_layers[4].running_mean.numpy(), keras_mean) <= 1e-5
    assert max_rel_err(twin.unit_15.main_layers[4].running_var.numpy(), keras_var) <= 1e-5

    # torch's own BatchNorm2d in its place: the variance is off by Bessel's factor (n = 2 * 2 * 2 = 8 at
    # unit 15 for 64x64 images), and the check names the cause.
    plain = copy.deepcopy(torch_model)
    for bn_parent, index in [(plain.unit_15.main_layers, 4)]:
        old = bn_parent[index]
        swapped = torch.nn.BatchNorm2d(old.num_features, eps=old.eps, momentum=old.momentum)
        swapped.load_state_dict(old.state_dict())
        bn_parent[index] = swapped.eval()
    failing = verify_models(keras_model, plain, images)  # `plain` gets its statistics back afterwards
    assert not failing
    assert failing.training_check.first_divergent_layer == "unit_15.main_layers.4"
    assert failing.training_check.diagnosis.cause is Cause.BN_UNBIASED_VARIANCE
    assert failing.diagnosis.detail == "factor n/(n-1) = 8/7"
    plain.train()
    with torch.no_grad():
        plain(torch.from_numpy(nhwc_to_nchw(images)))
    n, k = 8, keras_bn.momentum
    expected = k * old_var + (keras_var - k * old_var) * n / (n - 1)
    assert max_rel_err(plain.unit_15.main_layers[4].running_var.numpy(), expected) <= 1e-5
    assert max_rel_err(plain.unit_15.main_layers[4].running_var.numpy(), keras_var) > 1e-4


def test_files_round_trip_through_verify_loaders(twin_files, twins_f32):
    loaded = load_torch(twin_files[1], classifier_activation=None)
    for key, value in twins_f32[1].state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_ulp_apart_is_nextafter_bit_for_bit(dtype):
    """The floor twins' weights and images: the bit arithmetic gives np.nextafter's values, at the edges too
    (zeros, subnormals, the largest finite values, infinities, NaN), on any layout."""
    info = np.finfo(dtype)
    edges = [0.0, -0.0, info.smallest_subnormal, -info.smallest_subnormal, info.tiny, -info.tiny, info.max,
             -info.max, np.inf, -np.inf, np.nan, 1.0, -1.0, 0.5, -2.0]  # fmt: skip
    values = np.concatenate([np.repeat(np.array(edges, dtype), 16), seeded_images(1, 9, 7, dtype=dtype).ravel()])
    ints = np.int32 if dtype == "float32" else np.int64
    for array in (values, values.reshape(-1, 3)[:, ::2], values[:1].reshape(())):  # flat, strided, 0-d
        for seed in range(3):
            up = np.random.default_rng(seed).integers(0, 2, array.shape, dtype=np.uint8).view(bool)
            with np.errstate(over="ignore"):
                expected = np.nextafter(array, np.where(up, np.inf, -np.inf).astype(dtype))
            moved = one_ulp_apart(array, np.random.default_rng(seed))
            assert moved.dtype == array.dtype and moved.shape == array.shape
            assert np.array_equal(moved.view(ints), expected.view(ints)), (array, moved, expected)
