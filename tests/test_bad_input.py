"""Bad input gets one line on stderr naming what was expected, exit 2, no traceback, and no output file.

Most cases call the CLI's `main` in-process (a subprocess costs ~6 s of TensorFlow import); one real
process per command proves the process-level contract: the exit code, and exactly one line on stderr.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conversion.arrays import check_images
from conversion.cli import main
from conversion.errors import InputError
from conversion.files import save_keras, save_torch


@pytest.fixture(scope="module")
def files(twins_f32, tmp_path_factory) -> dict[str, Path]:
    """Good files of the float32 twins, and bad ones derived from them."""
    keras_model, torch_model = twins_f32
    folder = tmp_path_factory.mktemp("bad_input")
    good_pt = save_torch(torch_model, folder / "good.pt")
    paths = {"keras": save_keras(keras_model, folder / "good.keras"), "pt": good_pt}

    paths["truncated_pt"] = folder / "truncated.pt"
    paths["truncated_pt"].write_bytes(good_pt.read_bytes()[: good_pt.stat().st_size // 2])
    paths["corrupt_keras"] = folder / "corrupt.keras"
    paths["corrupt_keras"].write_bytes(np.random.default_rng(0).bytes(4096))

    state = torch_model.state_dict()
    nan_state = {k: v.clone() for k, v in state.items()}
    nan_state["unit_4.main_layers.1.running_var"][3] = float("nan")
    paths["nan_pt"] = folder / "nan.pt"
    torch.save(nan_state, paths["nan_pt"])

    # torchvision's resnet18 naming and a 1000-class head (built by hand: no torchvision needed).
    resnet18 = {
        "conv1.weight": torch.zeros(64, 3, 7, 7),
        "bn1.weight": torch.ones(64),
        "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3),
        "fc.weight": torch.zeros(1000, 512),
        "fc.bias": torch.zeros(1000),
    }
    paths["resnet18_pt"] = folder / "resnet18.pt"
    torch.save(resnet18, paths["resnet18_pt"])

    # Our architecture, 1000 classes: valid alone, but not the partner of a 10-class Keras model.
    wide = dict(state)
    wide["classifier.weight"], wide["classifier.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    paths["wide_pt"] = folder / "wide.pt"
    torch.save(wide, paths["wide_pt"])

    paths["list_pt"] = folder / "list.pt"
    torch.save([1, 2, 3], paths["list_pt"])
    return paths


def _images(folder: Path, name: str, array: np.ndarray) -> str:
    path = folder / f"{name}.npy"
    np.save(path, array, allow_pickle=True)
    return str(path)


def _assert_one_line_error(capsys, code: int, *expected: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for phrase in expected:
        assert phrase in err, err


BAD_IMAGES = [
    ("rank_3", np.zeros((3, 32, 32), np.float32), "rank 4"),
    ("nchw", np.zeros((1, 3, 32, 32), np.float32), "looks like NCHW"),
    ("one_channel", np.zeros((1, 32, 32, 1), np.float32), "3 channels"),
    ("uint8", np.zeros((1, 32, 32, 3), np.uint8), "float32 or float64"),
    ("float64_for_float32_model", np.zeros((1, 32, 32, 3), np.float64), "float32 images"),
    ("nan", np.full((1, 32, 32, 3), np.nan, np.float32), "NaN/Inf"),
    ("inf", np.full((1, 32, 32, 3), np.inf, np.float32), "NaN/Inf"),
    ("empty_batch", np.zeros((0, 32, 32, 3), np.float32), "at least 1 image"),
]


@pytest.mark.parametrize(("name", "array", "expected"), BAD_IMAGES, ids=[case[0] for case in BAD_IMAGES])
def test_check_images_names_what_was_expected(name, array, expected):
    with pytest.raises(InputError, match=re.escape(expected)) as error:
        check_images(array, channels=3, dtype="float32")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("name", "array", "expected"),
    [
        ("nchw", np.zeros((1, 3, 32, 32), np.float32), "looks like NCHW"),
        ("nan", np.full((1, 32, 32, 3), np.nan, np.float32), "NaN/Inf"),
        ("pickled_objects", np.array([{"not": "images"}], dtype=object), "not a readable .npy"),
    ],
)
def test_verify_refuses_bad_images(capsys, tmp_path, files, name, array, expected):
    code = main(["verify", "--keras", str(files["keras"]), "--images", _images(tmp_path, name, array)])
    _assert_one_line_error(capsys, code, expected)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--torch", "{missing}"], "no such file"),
        (["--torch", "{truncated_pt}"], "not a readable .pt state_dict"),
        (["--keras", "{corrupt_keras}"], "not a .keras archive"),
        (["--torch", "{nan_pt}"], "unit_4.main_layers.1.running_var holds NaN"),
        (
            ["--torch", "{resnet18_pt}"],
            "not a ResNet-34 state_dict: ResNet-34's 'bn1.bias' is absent (177 tensors missing",
        ),
        (
            ["--keras", "{keras}", "--torch", "{wide_pt}"],
            "classifier: the Keras model has 10 classes, the torch one 1000",
        ),
        (["--torch", "{list_pt}"], "expected a state_dict"),
        (["--torch", "{keras}"], "expected a .pt, .pth, .ckpt, .bin or .safetensors file"),
        (["--onnx", "{missing}"], "--onnx needs --keras or --torch"),
        (["--keras", "{pt}"], "expected a .keras, .weights.h5 or .h5 file"),
        (["--torch", "weights.npz"], "expected a .pt, .pth, .ckpt, .bin or .safetensors file"),
    ],
    ids=[
        "missing",
        "truncated-pt",
        "corrupt-keras",
        "nan-weights",
        "resnet18",
        "1000-class-head",
        "list-pickle",
        "keras-file-as-pt",
        "onnx-alone",
        "pt-file-as-keras",
        "unknown-extension",
    ],
)
def test_bad_weight_files(capsys, files, tmp_path, args, expected):
    paths = {**{k: str(v) for k, v in files.items()}, "missing": str(tmp_path / "missing.pt")}
    code = main(["verify", *[a.format(**paths) for a in args]])
    _assert_one_line_error(capsys, code, expected)


def test_wrong_image_size_for_a_fixed_size_model(capsys, tmp_path, twins_f32):
    import keras_impl

    model = keras_impl.build_resnet34(input_shape=(64, 64, 3))
    path = save_keras(model, tmp_path / "fixed.keras")
    code = main(["verify", "--keras", str(path), "--size", "32", "32"])
    _assert_one_line_error(capsys, code, "takes 64x64 images")


@pytest.mark.parametrize("args", [["--size", "0", "0"], ["--batch", "-1"], ["--dtype", "int8"], ["--bogus"]])
def test_bad_options(capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", *args])
    _assert_one_line_error(capsys, exit_info.value.code)


class _Marker:
    """Unpickling this would create a file: the proof that pickled code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def commands(tmp_path_factory) -> dict[str, tuple[subprocess.Popen, Path]]:
    """Every command given bad input in a real process, all started at once (each waits ~6 s on imports).

    TF_ENABLE_ONEDNN_OPTS=1 makes TensorFlow log its start-up lines on any x86 CPU (it does so unasked on CPUs
    with AVX-512 VNNI): the one-line contract must hold where those lines appear.
    """
    folder = tmp_path_factory.mktemp("processes")
    evil = folder / "evil.pt"
    evil.write_bytes(pickle.dumps({"stem_conv.weight": _Marker(str(folder / "pwned"))}))
    np.save(folder / "nchw.npy", np.zeros((1, 3, 32, 32), np.float32))
    argv = {
        "convert-pickle": ["convert", str(evil), str(folder / "out.keras")],
        "verify-nchw-images": ["verify", "--images", str(folder / "nchw.npy")],
        "export-onnx-missing-file": ["export-onnx", str(folder / "missing.keras"), str(folder / "out.onnx")],
        "verify-train-zero-steps": ["verify", "--train", "--steps", "0"],
    }
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1"}
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "conversion", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, args in argv.items()
    }
    yield {name: (process, folder) for name, process in started.items()}
    for process in started.values():
        process.kill()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("convert-pickle", "refused: not a plain tensor state_dict"),
        ("verify-nchw-images", "looks like NCHW"),
        ("export-onnx-missing-file", "no such file"),
        ("verify-train-zero-steps", "--steps must be a positive integer"),
    ],
)
def test_every_command_prints_one_stderr_line_for_bad_input_even_where_tensorflow_logs(commands, name, expected):
    """Exit 2, exactly one line on stderr (no traceback, none of TensorFlow's start-up lines), nothing written."""
    process, folder = commands[name]
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    assert expected in stderr and "Traceback" not in stderr, stderr
    assert not stdout.strip(), stdout
    assert not list(folder.glob("out*")) and not list(folder.glob(".out*")), list(folder.iterdir())


def test_a_malicious_pickle_never_runs(commands):
    process, folder = commands["convert-pickle"]
    process.communicate(timeout=300)
    assert process.returncode == 2
    assert not (folder / "pwned").exists(), "pickled code ran"
