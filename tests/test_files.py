"""Weight files and `resnet34-parity convert`: .keras, .weights.h5, .pt and .safetensors.

Every hop of a conversion must reproduce every weight BIT FOR BIT; a failed conversion must leave no file
(and no temporary file) behind; a pickle is never executed (torch.load(weights_only=True)).

The CLI runs in-process through `conversion.cli.main` (a subprocess costs ~6 s of TensorFlow import);
tests/test_bad_input.py runs the one real subprocess that proves exit code and no traceback for a pickle.
"""

from __future__ import annotations

import keras_impl  # noqa: F401  (first: TensorFlow then loads locally and quietly, see docs/pitfalls.md)

# isort: split
import pickle
from pathlib import Path

import keras
import numpy as np
import pytest
import torch

from conversion import files
from conversion.arrays import TOLERANCE, max_rel_err, nhwc_to_nchw, seeded_images
from conversion.cli import main
from conversion.errors import WeightFileError


def _bits(array) -> tuple[str, tuple, bytes]:
    array = np.ascontiguousarray(array)
    return array.dtype.str, array.shape, array.tobytes()


def _keras_bits(model) -> list[tuple]:
    # by order: Keras names the layers inside a unit by a global counter, so paths differ between twins
    return [(v.name, *_bits(keras.ops.convert_to_numpy(v))) for v in model.weights]


def _torch_bits(module) -> dict[str, tuple]:
    return {
        k: _bits(v.detach().numpy()) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory, twins_f32, twins_f64) -> dict[str, Path]:
    """The float32 twins as .keras and the float64 twins as .safetensors: the starts of the two routes."""
    folder = tmp_path_factory.mktemp("sources")
    return {
        "float32": files.save_keras(twins_f32[0], folder / "twins_f32.keras"),
        "float64": files.save_torch(twins_f64[1], folder / "twins_f64.safetensors"),
    }


def _convert(capsys, src: Path, dst: Path) -> None:
    # The twins have a logits head; .pt and .weights.h5 do not record it, so it is given every time.
    code = main(["convert", str(src), str(dst), "--classifier-activation", "none"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == f"wrote {dst}" and captured.err == ""
    assert dst.is_file()


# The float32 route reads and writes each format, Keras -> torch and torch -> Keras twice each; the float64
# route (shorter: each Keras hop builds a model, ~1.5 s) shows files keep float64 float64 both ways.
ROUTES = {
    "float32": [".keras", ".pt", ".weights.h5", ".safetensors", ".keras"],
    "float64": [".safetensors", ".keras", ".pt"],
}


@pytest.mark.parametrize(
    "dtype",
    ["float32", "float64"],
    ids=["float32-keras-pt-h5-safetensors-keras", "float64-safetensors-keras-pt"],
)
def test_convert_through_every_format_is_bit_exact(capsys, tmp_path, sources, twins_f32, twins_f64, dtype):
    keras_model, torch_model = {"float32": twins_f32, "float64": twins_f64}[dtype]
    expected_torch = _torch_bits(torch_model)
    src, unchecked = sources[dtype], []
    for hop, suffix in enumerate(ROUTES[dtype][1:], start=1):
        dst = tmp_path / f"hop{hop}{suffix}"
        _convert(capsys, src, dst)
        unchecked.append(f"{src.name} -> {dst.name}")
        # A torch file is checked directly (cheap). A Keras file in the middle of the route is checked
        # through the torch file converted from it (building a Keras model to look costs ~1.5 s); the
        # last file is loaded and checked whatever its kind.
        if files.file_kind(dst) == "torch":
            assert _torch_bits(files.load_torch(dst, classifier_activation=None)) == expected_torch, unchecked
            unchecked = []
        src = dst
    final = files.load_model(src, classifier_activation=None)
    if unchecked:
        assert _keras_bits(final) == _keras_bits(keras_model), unchecked
    # The end of the route computes what the start did (same weights, same head): the same logits. A .keras
    # built from torch takes any size, as torch does. Keras against Keras is the same computation; torch
    # against Keras is bounded as in test_model_parity.py.
    images = seeded_images(1, 224, 224, seed=6, dtype=dtype)
    reference = keras.ops.convert_to_numpy(keras_model(images, training=False))
    if files.file_kind(src) == "keras":
        assert final.input_shape == (None, None, None, 3)
        logits = keras.ops.convert_to_numpy(final(images, training=False))
    else:
        with torch.no_grad():
            logits = final(torch.from_numpy(nhwc_to_nchw(images))).numpy()
    assert logits.dtype == np.dtype(dtype)
    assert max_rel_err(logits, reference) <= TOLERANCE[dtype]


def test_keras_file_reloads_without_custom_objects_and_reproduces_outputs(sources, twins_f32):
    keras_model, _ = twins_f32
    reloaded = keras.saving.load_model(sources["float32"])  # no custom_objects: ResidualUnit is registered
    assert [type(layer) for layer in reloaded.layers] == [type(layer) for layer in keras_model.layers]
    assert reloaded.get_layer("unit_3").get_config() == keras_model.get_layer("unit_3").get_config()
    assert _keras_bits(reloaded) == _keras_bits(keras_model)
    images = seeded_images(2, 40, 24, seed=8)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(reloaded(images, training=False)),
        keras.ops.convert_to_numpy(keras_model(images, training=False)),
    )  # same weights, same graph, same kernels: identical bits


def test_a_loaded_model_must_hold_every_stored_array_exactly_once(twins_f32, tmp_path):
    """What load_keras checks after Keras has read a file: the stored arrays and the model's variables are the same
    multiset (dtype, shape and bytes). One flipped bit, a dtype changed or an array stored twice fails it."""
    from conversion.keras_files import _check_weights_landed

    model = twins_f32[0]
    loaded = [keras.ops.convert_to_numpy(v) for v in model.weights]
    stored = [array.copy() for array in loaded]
    _check_weights_landed(loaded, stored, tmp_path / "m.keras")  # the same arrays, in any order
    _check_weights_landed(loaded, stored[::-1], tmp_path / "m.keras")
    flipped = stored[5].copy()
    flipped.view(np.uint32).flat[0] ^= 1
    for broken in (
        [*stored[:5], flipped, *stored[6:]],
        [*stored[:5], stored[5].astype(np.float64), *stored[6:]],
        [*stored[:5], stored[4], *stored[6:]],
    ):
        with pytest.raises(WeightFileError, match="do not hold the file's"):
            _check_weights_landed(loaded, broken, tmp_path / "m.keras")


def test_safetensors_records_the_head_and_pt_takes_it_from_the_caller(tmp_path, twins_f32):
    _, torch_model = twins_f32
    safetensors = files.save_torch(torch_model, tmp_path / "m.safetensors")
    pt = files.save_torch(torch_model, tmp_path / "m.pt")
    assert files.load_torch(safetensors).classifier.activation.keras_name == "linear"  # metadata wins
    assert files.load_torch(pt).classifier.activation.keras_name == "softmax"  # the documented default
    assert files.load_torch(pt, classifier_activation=None).classifier.activation.keras_name == "linear"


# --- failures leave nothing behind ----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_files(tmp_path_factory, twins_f32) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("small")
    return {"pt": files.save_torch(twins_f32[1], folder / "good.pt")}


def _assert_one_line_error(capsys, code: int, *phrases: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("resnet34-parity convert: error: "), err
    for phrase in phrases:
        assert phrase in err, err


def test_destination_in_a_missing_folder_writes_nothing(capsys, tmp_path, small_files):
    dst = tmp_path / "missing" / "out.safetensors"
    code = main(["convert", str(small_files["pt"]), str(dst)])
    _assert_one_line_error(capsys, code, "out.safetensors", "does not exist")
    assert not (tmp_path / "missing").exists()


def _truncated(source: Path) -> bytes:
    return source.read_bytes()[: source.stat().st_size // 2]


@pytest.mark.parametrize(
    ("name", "content", "destination", "phrase"),
    [
        ("corrupt.pt", b"\x00not a pickle\xff" * 64, "out.keras", "state_dict"),
        ("truncated.keras", "truncated-float32-keras", "out.pt", "not a .keras archive"),
        ("truncated.safetensors", "truncated-float64-safetensors", "out.weights.h5", "not a readable .safetensors"),
        ("garbage.weights.h5", b"GARBAGE" * 100, "out.safetensors", "not ResNet-34 .weights.h5 weights"),
        ("empty.pt", b"", "out.safetensors", "state_dict"),
    ],
    ids=["corrupt-pt", "truncated-keras", "truncated-safetensors", "garbage-weights-h5", "empty-pt"],
)
def test_corrupt_source_writes_nothing(capsys, tmp_path, sources, name, content, destination, phrase):
    if content == "truncated-float32-keras":
        content = _truncated(sources["float32"])
    elif content == "truncated-float64-safetensors":
        content = _truncated(sources["float64"])
    src = tmp_path / name
    src.write_bytes(content)
    code = main(["convert", str(src), str(tmp_path / destination)])
    _assert_one_line_error(capsys, code, name, phrase)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no output, no temporary file


def test_unknown_extension_is_refused(capsys, tmp_path, small_files):
    code = main(["convert", str(small_files["pt"]), str(tmp_path / "out.onnx")])
    _assert_one_line_error(capsys, code, "out.onnx: unknown extension")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.weights.h5"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), files.atomic_output(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".weights.h5")  # Keras checks the suffix
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]


def test_writer_failing_midway_in_a_conversion_leaves_nothing(capsys, tmp_path, small_files, monkeypatch):
    def half_write(state, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", half_write)
    code = main(["convert", str(small_files["pt"]), str(tmp_path / "out.safetensors")])
    _assert_one_line_error(capsys, code, "No space left on device")
    assert list(tmp_path.iterdir()) == []


# --- pickles are never run -------------------------------------------------------------------------


class _CreatesFile:
    """Unpickling this calls open(path, "w"): if the marker file exists, pickled code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_without_running_it(capsys, tmp_path, monkeypatch):
    # Control: the payload is live, unpickling it unsafely does create its marker.
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_CreatesFile(control))).close()
    assert control.exists()

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"stem_conv.weight": _CreatesFile(marker)}, evil)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    out = tmp_path / "out.keras"
    code = main(["convert", str(evil), str(out)])
    _assert_one_line_error(capsys, code, "evil.pt")
    assert calls == [True]  # torch.load(weights_only=True), and only that
    assert not marker.exists(), "pickled code ran"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control-marker", "evil.pt"]
    with pytest.raises(WeightFileError, match=r"evil\.pt"):
        files.load_torch(evil)
    assert not marker.exists()
