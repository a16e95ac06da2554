"""The book's own ResNet-34 (tests/book/chapter14.py: the chapter's code as a reader types it) converts,
verifies and reloads: in memory, as .keras, as a legacy full-model .h5 and as .weights.h5.

Logits are compared, not the softmax the book's head applies (saturated probabilities agree when networks
do not). Tolerances: float32 1e-5 and float64 1e-10 of the logits' scale (conversion.arrays.TOLERANCE); the
measured errors are in the docstrings. Weights are hostile (conversion.hostile: BatchNorm variances down to
5e-4).
"""

from __future__ import annotations

import keras_impl  # first: TensorFlow then loads locally and quietly (docs/pitfalls.md)

# isort: split
import json
import re
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from book import build_book_model
from logits import book_logits, twin_logits

import conversion
from conversion import files
from conversion.arrays import TOLERANCE, max_rel_err, seeded_images
from conversion.cli import main
from conversion.errors import ConversionError, WeightFileError
from conversion.hostile import randomize_weights

CASES = [(1, 224, 224), (2, 97, 131)]
CASE_IDS = ["1x224x224", "2x97x131-odd-non-square"]


@pytest.fixture(scope="module")
def book_models() -> dict[str, keras.Model]:
    """The book's model in float32 and float64, any input size, hostile weights."""
    models = {}
    for dtype in ("float32", "float64"):
        models[dtype] = build_book_model((None, None, 3), dtype=dtype)
        randomize_weights(models[dtype], seed=0)
    return models


def test_the_book_model_is_the_books(book_models):
    """Auto-named layers, the activation FUNCTION in main_layers, 21,306,826 parameters: what readers hold."""
    model = book_models["float32"]
    names = [re.sub(r"_\d+$", "", layer.name) for layer in model.layers]  # Keras numbers them per process
    assert names[:5] == ["conv2d", "batch_normalization", "activation", "max_pooling2d", "residual_unit"]
    assert names[-3:] == ["global_average_pooling2d", "flatten", "dense"]
    assert callable(model.layers[4].main_layers[2]) and not isinstance(model.layers[4].main_layers[2], keras.Layer)
    assert model.count_params() == 21_306_826


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("batch", "height", "width"), CASES, ids=CASE_IDS)
def test_book_model_in_memory_converts_and_matches_its_own_forward(book_models, batch, height, width, dtype):
    """Measured (hostile weights, seed 5 images): float32 3.4e-7 (1x224x224) and 4.4e-7 (2x97x131); float64
    5.2e-16 and 8.1e-16. The README tolerance table lists them."""
    model = book_models[dtype]
    twin = conversion.keras_to_torch(model)
    assert twin.convention == "book" and twin.classifier_activation == "softmax"
    images = seeded_images(batch, height, width, seed=5, dtype=dtype)
    assert max_rel_err(twin_logits(twin, images), book_logits(model, images)) <= TOLERANCE[dtype]
    back = conversion.torch_to_keras(twin, (None, None, 3))  # our layout, the book's weights, bit for bit
    for theirs, ours in zip(model.weights, back.weights, strict=True):
        assert np.array_equal(keras.ops.convert_to_numpy(theirs), keras.ops.convert_to_numpy(ours))


def test_a_functional_chain_of_the_books_layers_converts_and_a_branching_graph_is_refused(book_models):
    model = book_models["float32"]
    inputs = keras.Input((None, None, 3))
    outputs = inputs
    for layer in model.layers:
        outputs = layer(outputs)
    functional = keras.Model(inputs, outputs)
    images = seeded_images(1, 64, 48, seed=2)
    assert max_rel_err(twin_logits(conversion.keras_to_torch(functional), images), book_logits(model, images)) <= 1e-5
    branch = keras.layers.Conv2D(3, 1, name="side_branch")(inputs)
    two_paths = keras.Model(inputs, [outputs, branch])
    with pytest.raises(ConversionError, match="expected a model of one input and one output"):
        conversion.keras_to_torch(two_paths)


@pytest.fixture(scope="module")
def book_files(book_models, tmp_path_factory) -> dict[str, Path]:
    """The float32 book model saved the three ways a reader saves it."""
    folder = tmp_path_factory.mktemp("book")
    model = book_models["float32"]
    model.save(folder / "book.keras")
    model.save(folder / "book.h5")  # Keras 3 still writes the legacy full-model HDF5
    model.save_weights(folder / "book.weights.h5")
    return {suffix: folder / f"book{suffix}" for suffix in (".keras", ".h5", ".weights.h5")}


@pytest.mark.parametrize("suffix", [".keras", ".h5", ".weights.h5"])
def test_book_files_convert_to_torch_and_match_the_books_forward(book_files, book_models, tmp_path, capsys, suffix):
    """`resnet34-parity convert book.<suffix> book.pt`; the .pt's twin against the book's own forward."""
    assert main(["convert", str(book_files[suffix]), str(tmp_path / "book.pt")]) == 0
    twin = files.load_torch(tmp_path / "book.pt")
    images = seeded_images(1, 64, 48, seed=7)
    assert max_rel_err(twin_logits(twin, images), book_logits(book_models["float32"], images)) <= 1e-5


@pytest.mark.parametrize("suffix", [".keras", ".h5", ".weights.h5"])
def test_verify_takes_book_files(book_files, capsys, suffix):
    code = main(["verify", "--keras", str(book_files[suffix]), "--size", "45", "38", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["agree"], report["diagnosis"]
    assert report["source_check"]["ok"] and report["source_check"]["max_rel"] <= 1e-6


def test_book_keras_file_loads_with_safe_mode_and_every_weight_lands(book_files, book_models):
    loaded = files.load_keras(book_files[".keras"])
    assert isinstance(loaded.layers[4], keras_impl.ResidualUnit)  # the project's layer of the same design
    for theirs, ours in zip(book_models["float32"].weights, loaded.weights, strict=True):
        assert np.array_equal(keras.ops.convert_to_numpy(theirs), keras.ops.convert_to_numpy(ours)), theirs.path


def _rewrite_config(source: Path, target: Path, change) -> Path:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                change(config["config"]["layers"])
                data = json.dumps(config).encode()
            new.writestr(item, data)
    return target


def _add_unit_argument(layers):
    layers[5]["config"]["dropout"] = 0.5


def _add_lambda(layers):
    layers.insert(1, {"module": "keras.layers", "class_name": "Lambda", "config": {"name": "evil"}})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_add_unit_argument, "not the book's ResidualUnit(filters, strides, activation); refused without running"),
        (_add_lambda, "layer 'evil': class Lambda is not part of a ResNet-34; refused without running it"),
    ],
    ids=["a-unit-with-another-signature", "a-lambda-layer"],
)
def test_foreign_keras_files_are_refused_in_one_line(book_files, tmp_path, capsys, change, message):
    doctored = _rewrite_config(book_files[".keras"], tmp_path / "doctored.keras", change)
    assert main(["convert", str(doctored), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out.pt").exists()


def test_a_model_that_is_not_the_books_design_is_refused_naming_the_layer():
    model = build_book_model((None, None, 3))
    del model.layers[6].main_layers[1]  # residual_unit_2 loses its first BatchNorm
    # Keras numbers auto-named layers per process: residual_unit_2 here, another number after other tests.
    message = (
        re.escape("expected a BatchNorm of 64 features (ResNet-34 layer unit_2.main_layers.1), found ")
        + r"'residual_unit_\d+\.main_layers\[1\]' \(activation 'relu'\)"
    )
    with pytest.raises(ConversionError, match=message):
        conversion.keras_to_torch(model)


def test_an_hdf5_file_of_weights_alone_named_h5_is_refused(book_files, tmp_path):
    plain = tmp_path / "weights-only.h5"
    plain.write_bytes(book_files[".weights.h5"].read_bytes())
    with pytest.raises(WeightFileError, match="an HDF5 file without a model config"):
        files.load_keras(plain)
