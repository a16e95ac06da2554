"""The checkpoints people really have, each written by the library that writes it, convert with the logits of the
source's own forward: DataParallel and Lightning containers, Hugging Face transformers folders, keras-hub models,
Keras 2 (tf_keras) files, compiled and trained Keras 3 weights. What must stay refused names what does not fit.

Tolerances: float32 1e-5 and float64 1e-10 of the logits' scale (conversion.arrays.TOLERANCE), at 1x224x224 and
2x97x131; logits, not the softmax the book's head applies. Measured errors are in the docstrings.
"""

from __future__ import annotations

import keras_impl  # noqa: F401  (first: TensorFlow then loads locally and quietly, docs/pitfalls.md)

# isort: split
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from book import build_book_model
from conftest import import_peer
from logits import book_logits, twin_logits
from torch_peers import hostile_, own_logits

import conversion
from conversion import files
from conversion.arrays import TOLERANCE, max_rel_err, nhwc_to_nchw, seeded_images
from conversion.cli import main
from conversion.errors import ConversionError, WeightFileError
from conversion.hostile import randomize_weights
from conversion.keras_hub_models import build_keras_hub_resnet34

CASES = [(1, 224, 224), (2, 97, 131)]
DTYPES = ["float32", "float64"]


def assert_same_logits(ours, reference, dtype: str, float32_images: bool = False) -> list[float]:
    """``ours(images)`` against ``reference(images)`` at every case; returns the errors measured."""
    errors = []
    for batch, height, width in CASES:
        images = seeded_images(batch, height, width, seed=5, dtype="float32" if float32_images else dtype)
        images = images.astype(dtype)
        error = max_rel_err(ours(images), reference(images))
        print(f"measured: {dtype} {batch}x{height}x{width} max rel err {error:.2g}")  # `pytest -s` shows them
        assert error <= TOLERANCE[dtype], (dtype, height, width, error)
        errors.append(error)
    return errors


def _bits(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in state.items() if not k.endswith("num_batches_tracked")}


# --- torch containers: DataParallel, Lightning, a whole pickled model ----------------------------------------


@pytest.fixture(scope="module")
def torchvision_model() -> torch.nn.Module:
    torchvision = import_peer("torchvision")
    torch.manual_seed(0)
    return hostile_(torchvision.models.resnet34(num_classes=10), seed=11)


@pytest.fixture(scope="module")
def containers(torchvision_model, tmp_path_factory) -> dict[str, Path]:
    """The same weights as users save them: DataParallel's state dict, a Lightning checkpoint, a pickled model."""
    folder = tmp_path_factory.mktemp("containers")
    torch.save(torch.nn.DataParallel(torchvision_model).state_dict(), folder / "data-parallel.pth")
    lightning = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.5.0",
        "state_dict": {f"model.{k}": v for k, v in torchvision_model.state_dict().items()},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}],
        "hyper_parameters": {"lr": 0.1},
    }
    torch.save(lightning, folder / "epoch=3-step=120.ckpt")
    torch.save(torchvision_model, folder / "whole-model.pt")
    return {
        "data-parallel": folder / "data-parallel.pth",
        "lightning": folder / "epoch=3-step=120.ckpt",
        "pickled": folder / "whole-model.pt",
    }


@pytest.mark.parametrize(("container", "prefix"), [("data-parallel", "module."), ("lightning", "model.")])
def test_containers_read_the_weights_bit_for_bit_and_say_which_prefix_was_stripped(
    containers, torchvision_model, container, prefix
):
    """The same bits as torchvision's own state dict, so the same function as test_torchvision_timm's; its logits
    checked here at 2x97x131 against torchvision's forward (measured 0: the same torch operations)."""
    notes: list[str] = []
    twin = files.load_torch(containers[container], notes=notes)
    assert twin.convention == "torchvision" and twin.classifier_activation is None  # torchvision computes logits
    assert any(f"stripped the prefix '{prefix}'" in note for note in notes), notes
    plain = conversion.state_dicts.read_state_dict(torchvision_model.state_dict(), "plain")
    assert _bits(twin.state_dict()) == _bits(conversion.state_dicts.twin_from_state_dict(plain).state_dict())
    images = seeded_images(2, 97, 131, seed=5)
    error = max_rel_err(twin_logits(twin, images), own_logits(torchvision_model, images))
    print(f"measured: {container} 2x97x131 max rel err {error:.2g}")
    assert error <= TOLERANCE["float32"]


def test_a_whole_pickled_model_is_refused_with_the_line_that_gets_its_state_dict(containers, capsys):
    code = main(["convert", str(containers["pickled"]), str(containers["pickled"].with_suffix(".keras"))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "a whole pickled torchvision.models.resnet.ResNet" in err and "nothing in it was run" in err, err
    assert "torch.save(torch.load(" in err and ".state_dict()" in err, err
    assert not containers["pickled"].with_suffix(".keras").exists()


def test_a_deep_stem_resnet34d_is_refused_naming_its_stem(tmp_path):
    from safetensors.torch import save_file

    timm = import_peer("timm")
    path = tmp_path / "resnet34d.safetensors"
    save_file(timm.create_model("resnet34d", pretrained=False, num_classes=10).state_dict(), str(path))
    with pytest.raises(WeightFileError) as refusal:
        files.load_torch(path)
    message = str(refusal.value)
    assert "the first key that is not ResNet-34's is 'conv1.0.weight' [32, 3, 3, 3]" in message, message
    assert "3-conv deep stem (conv1.0, conv1.3, conv1.6" in message, message


def test_classifier_activation_applies_to_torch_files(containers, tmp_path, capsys):
    """`convert x.pth y.safetensors --classifier-activation softmax` records softmax (torchvision's default: none)."""
    destination = tmp_path / "softmax.safetensors"
    argv = ["convert", str(containers["data-parallel"]), str(destination), "--classifier-activation", "softmax"]
    assert main(argv) == 0, capsys.readouterr().err
    assert files.load_torch(destination).classifier_activation == "softmax"
    assert files.load_torch(containers["data-parallel"]).classifier_activation is None


# --- Hugging Face transformers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers():
    return import_peer("transformers")


@pytest.fixture(scope="module")
def huggingface(transformers, tmp_path_factory) -> dict[str, object]:
    """transformers' ResNetForImageClassification of a ResNet-34 (microsoft/resnet-34's config, 10 labels),
    hostile, as `save_pretrained` writes it (model.safetensors) and as older releases did (pytorch_model.bin)."""
    config = transformers.ResNetConfig(
        embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[3, 4, 6, 3], layer_type="basic", num_labels=10
    )
    torch.manual_seed(0)
    model = hostile_(transformers.ResNetForImageClassification(config), seed=12)
    folder = tmp_path_factory.mktemp("huggingface")
    model.save_pretrained(folder / "safetensors")
    (folder / "bin").mkdir()
    (folder / "bin" / "config.json").write_text((folder / "safetensors" / "config.json").read_text())
    torch.save(model.state_dict(), folder / "bin" / "pytorch_model.bin")
    return {"model": model, "safetensors": folder / "safetensors", "bin": folder / "bin"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_huggingface_folder_becomes_keras_with_transformers_logits(huggingface, dtype):
    """Measured: float32 3.6e-7 (224x224) and 4.7e-7 (97x131); float64 1.1e-15 and 1.7e-15."""
    model = huggingface["model"].to(getattr(torch, dtype))
    notes: list[str] = []
    twin = files.load_torch(huggingface["safetensors"], notes=notes).to(getattr(torch, dtype))
    assert twin.convention == "torchvision" and "transformers" in " ".join(notes), notes
    keras_model = conversion.torch_to_keras(twin, (None, None, 3))

    def keras_logits(images):
        return keras.ops.convert_to_numpy(keras_model(images, training=False))

    assert_same_logits(keras_logits, lambda images: own_logits(model, images), dtype)
    huggingface["model"].float()


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_huggingface_round_trip_is_bit_exact_and_loads_with_from_pretrained(
    huggingface, transformers, tmp_path, capsys, weights
):
    """HF folder -> .keras -> HF folder: every tensor bit for bit, and `from_pretrained` loads the result."""
    source = huggingface[weights]
    keras_path, back = tmp_path / "hf.keras", tmp_path / "back"
    for src, dst in ((source, keras_path), (keras_path, back)):
        assert main(["convert", str(src), str(dst)]) == 0, capsys.readouterr().err
    reloaded = transformers.ResNetForImageClassification.from_pretrained(back).eval()
    original = huggingface["model"].state_dict()
    assert _bits(reloaded.state_dict()) == _bits(original)
    # Same bits, yet from_pretrained's models compute up to 7e-7 apart depending on the file they were read from
    # (.bin or .safetensors; measured here, transformers 5.24): logits are held to the float32 tolerance.
    images = seeded_images(1, 61, 47, seed=5)
    original_reloaded = transformers.ResNetForImageClassification.from_pretrained(source).eval()
    assert max_rel_err(own_logits(reloaded, images), own_logits(original_reloaded, images)) <= TOLERANCE["float32"]


def test_the_books_convention_is_not_written_as_a_huggingface_folder(twins_f32, tmp_path):
    """Our twin (the book's convention) is another function in transformers' padding: refused, nothing written."""
    with pytest.raises(ConversionError, match="this model computes the book one"):
        files.save_huggingface(twins_f32[1], tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


# --- keras-hub -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_hub():
    return import_peer("keras_hub")


@pytest.fixture(scope="module")
def hub_models(keras_hub) -> dict[str, keras.Model]:
    """keras-hub's own ResNetImageClassifier of a ResNet-34 (built offline), hostile, in both dtypes."""
    models = {}
    for dtype in DTYPES:
        models[dtype] = build_keras_hub_resnet34(10, (None, None, 3), None, dtype)
        randomize_weights(models[dtype], seed=13)
    return models


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_keras_hub_classifier_in_memory_becomes_a_twin_with_its_logits(hub_models, dtype):
    """Read by structure (ZeroPadding2D + valid conv, Add): the torchvision convention. keras-hub's Input is
    float32 whatever the model's dtype, so float64 is checked on float32-exact images. Measured: float32 2.2e-7
    (224x224) and 7.6e-7 (97x131); float64 3.4e-16 and 1.1e-15."""
    model = hub_models[dtype]
    twin = conversion.keras_to_torch(model)
    assert twin.convention == "torchvision"

    def hub_logits(images):
        return keras.ops.convert_to_numpy(model(images, training=False))

    assert_same_logits(lambda images: twin_logits(twin, images), hub_logits, dtype, float32_images=True)
    back = conversion.weights.torch_to_keras_hub(twin, (None, None, 3))
    for ours, theirs in zip(back.weights, model.weights, strict=True):  # the round trip, bit for bit
        assert np.array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs)), theirs.path


def test_keras_hub_files_convert_both_ways_and_load_with_keras_hub(hub_models, keras_hub, tmp_path, capsys):
    """keras-hub .keras -> .safetensors -> keras-hub .keras (`--keras-hub`): the same bits, and the file loads
    with `keras.models.load_model` once keras_hub is imported. The backbone alone converts as a trunk (its
    feature map, measured 1.7e-6 at 97x131)."""
    model = hub_models["float32"]
    model.save(tmp_path / "hub.keras")
    model.backbone.save(tmp_path / "backbone.keras")
    for argv in (
        ["convert", str(tmp_path / "hub.keras"), str(tmp_path / "hub.safetensors")],
        ["convert", str(tmp_path / "hub.safetensors"), str(tmp_path / "back.keras"), "--keras-hub"],
        ["convert", str(tmp_path / "backbone.keras"), str(tmp_path / "trunk.safetensors")],
    ):
        assert main(argv) == 0, capsys.readouterr().err
    assert "no classifier: read as ResNet-34's trunk alone" in capsys.readouterr().out
    back = keras.models.load_model(tmp_path / "back.keras")
    assert type(back).__name__ == "ResNetImageClassifier"
    for ours, theirs in zip(back.weights, model.weights, strict=True):
        assert np.array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs)), theirs.path
    trunk = files.load_torch(tmp_path / "trunk.safetensors")
    assert trunk.num_classes == 0
    images = seeded_images(1, 97, 131, seed=5)
    with torch.no_grad():
        features = trunk.forward_features(torch.from_numpy(nhwc_to_nchw(images))).numpy().transpose(0, 2, 3, 1)
    reference = keras.ops.convert_to_numpy(model.backbone(images, training=False))
    error = max_rel_err(features, reference)
    print(f"measured: trunk 1x97x131 max rel err {error:.2g}")
    assert error <= TOLERANCE["float32"]


def test_timm_to_keras_meets_keras_hubs_own_timm_converter(keras_hub, tmp_path):
    """timm's resnet34 saved as the Hub holds it (config.json + model.safetensors); keras-hub's `from_preset`
    converts it with its own code, ours through the twin: the same weights bit for bit and the same logits
    against timm's own forward (measured: both 1.4e-6 at 224x224 and 1.2e-6 at 97x131)."""
    timm = import_peer("timm")
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    source = hostile_(timm.create_model("resnet34", pretrained=False, num_classes=10), seed=14)
    save_for_hf(source, str(tmp_path / "timm"), model_config={"num_classes": 10}, safe_serialization=True)
    theirs = keras_hub.models.ResNetImageClassifier.from_preset(str(tmp_path / "timm"))
    twin = files.load_torch(tmp_path / "timm" / "model.safetensors")
    ours = conversion.torch_to_keras(twin, (None, None, 3))
    as_hub = conversion.weights.torch_to_keras_hub(twin, (None, None, 3))
    for mine, hubs in zip(as_hub.weights, theirs.weights, strict=True):
        assert np.array_equal(keras.ops.convert_to_numpy(mine), keras.ops.convert_to_numpy(hubs)), hubs.path
    for batch, height, width in CASES:
        images = seeded_images(batch, height, width, seed=5)
        reference = own_logits(source, images)
        for model in (ours, theirs):
            error = max_rel_err(keras.ops.convert_to_numpy(model(images, training=False)), reference)
            print(f"measured: {type(model).__name__} {batch}x{height}x{width} max rel err {error:.2g}")
            assert error <= TOLERANCE["float32"], (type(model).__name__, height, width)


# --- Keras files: Keras 2 (tf_keras) and compiled or trained Keras 3 -------------------------------------------


@pytest.fixture(scope="module")
def tf_keras():
    return import_peer("tf_keras")


def _hostile_tf_keras(model, seed: int) -> None:
    """Hostile BatchNorm statistics and head bias in a tf_keras model (conversion.hostile's draws)."""
    import tf_keras

    rng = np.random.default_rng(seed)
    for layer in model.submodules:
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            variance = np.exp(rng.uniform(np.log(0.05), np.log(20.0), n))
            low = rng.permutation(n)[: n // 4]
            variance[low] = rng.uniform(5e-4, 2e-3, low.size)
            mean = rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 2.0, n)
            gamma = rng.uniform(0.3, 1.2, n) * np.sqrt(variance + 1e-3)
            layer.set_weights([gamma, rng.normal(0.0, 0.5, n), mean, variance])
        elif isinstance(layer, tf_keras.layers.Dense):
            layer.set_weights([layer.kernel.numpy(), rng.normal(0.0, 0.1, layer.bias.shape)])


def _keras2_logits(model, images: np.ndarray) -> np.ndarray:
    """A tf_keras book model's own forward, up to (not through) its softmax head."""
    features = images
    for layer in model.layers[:-1]:
        features = layer(features, training=False)
    head = model.layers[-1]
    return (features @ head.kernel + head.bias).numpy()


@pytest.fixture(scope="module")
def keras2_files(tf_keras, tmp_path_factory) -> dict[str, object]:
    """The book's model as a Keras 2 reader runs it (tests/book/chapter14_keras2.py), in both dtypes: the whole
    model (`model.save("x.h5")`), its weights (`save_weights("x.h5")`), and after compile("nadam") and one fit
    step, the model with its optimizer (`save("x.h5")`) and its weights (`save_weights("x.weights.h5")`)."""
    from book.chapter14_keras2 import build_book_model as build_keras2_model

    folder = tmp_path_factory.mktemp("keras2")
    out: dict[str, object] = {}
    for dtype in DTYPES:
        model = build_keras2_model((None, None, 3), dtype=dtype)
        _hostile_tf_keras(model, seed=15)
        model.save(folder / f"{dtype}-model.h5")
        model.save_weights(folder / f"{dtype}-weights.h5")
        out[dtype] = model
    trained = build_keras2_model((None, None, 3))
    _hostile_tf_keras(trained, seed=16)
    # run_eagerly: one step does not repay tracing the train step (~10 s)
    trained.compile(optimizer="nadam", loss="sparse_categorical_crossentropy", metrics=["accuracy"], run_eagerly=True)
    trained.fit(seeded_images(2, 32, 32, seed=1), np.arange(2), epochs=1, verbose=0)
    trained.save(folder / "trained.h5")
    trained.save_weights(folder / "trained.weights.h5")
    out["trained"] = trained
    out["folder"] = folder
    return out


def _twin_bits(model: keras.Model) -> dict[str, bytes]:
    return _bits(conversion.keras_to_torch(model).state_dict())


@pytest.mark.parametrize("dtype", DTYPES)
def test_keras2_files_convert_with_the_keras2_models_logits(keras2_files, dtype):
    """tf_keras's `model.save("x.h5")` against the Keras 2 model's own forward (measured: float32 7.9e-7 at
    224x224, 5.1e-7 at 97x131; float64 3.3e-16 and 5.5e-16); its `save_weights("x.h5")`, read by layer groups
    in order, holds the same bits."""
    folder = keras2_files["folder"]
    whole = files.load_keras(folder / f"{dtype}-model.h5")
    twin = conversion.keras_to_torch(whole)
    assert_same_logits(lambda x: twin_logits(twin, x), lambda x: _keras2_logits(keras2_files[dtype], x), dtype)
    notes: list[str] = []
    weights = files.load_keras(folder / f"{dtype}-weights.h5", notes=notes)
    assert any("Keras 2" in note for note in notes), notes
    assert _twin_bits(weights) == _bits(twin.state_dict())


def test_a_trained_keras2_models_files_convert_and_set_its_optimizer_aside(keras2_files):
    """After compile("nadam") and fit: `save("x.h5")` and `save_weights("x.weights.h5")` hold the optimizer's
    state too; it is named and set aside, and both give the trained model's logits (measured 4.6e-7 at 224x224,
    2.7e-7 at 97x131)."""
    folder = keras2_files["folder"]
    notes: list[str] = []
    twin = conversion.keras_to_torch(files.load_keras(folder / "trained.weights.h5", notes=notes))
    assert any("optimizer" in note for note in notes), notes
    assert _twin_bits(files.load_keras(folder / "trained.h5")) == _bits(twin.state_dict())
    assert_same_logits(lambda x: twin_logits(twin, x), lambda x: _keras2_logits(keras2_files["trained"], x), "float32")


@pytest.fixture(scope="module")
def keras3_trained(tmp_path_factory) -> dict[str, object]:
    """The book's model in Keras 3 compiled with "nadam" as the chapter does, saved compiled, then after one fit
    step (.weights.h5 and .keras), in both dtypes."""
    folder = tmp_path_factory.mktemp("keras3")
    out: dict[str, object] = {"folder": folder}
    for dtype in DTYPES:
        model = build_book_model((None, None, 3), dtype=dtype)
        randomize_weights(model, seed=17)
        # run_eagerly: one step does not repay tracing the train step (~10 s)
        model.compile(optimizer="nadam", loss="sparse_categorical_crossentropy", metrics=["accuracy"], run_eagerly=True)
        model.save_weights(folder / f"{dtype}-compiled.weights.h5")
        compiled = conversion.keras_to_torch(model)
        model.fit(seeded_images(2, 32, 32, seed=1, dtype=dtype), np.arange(2), epochs=1, verbose=0)
        model.save_weights(folder / f"{dtype}-fit.weights.h5")
        if dtype == "float32":
            model.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"])  # as the reader saves it
            model.save(folder / "fit.keras")
        out[dtype] = model, compiled
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_and_trained_keras3_weights_convert_and_name_what_was_set_aside(keras3_trained, dtype):
    """184 arrays after compile, 405 after fit (the model's 182, the optimizer's and the metrics'): the model's
    weights are taken, the rest named. The trained file against the trained model's own forward (measured:
    float32 6.0e-7 at 224x224 and 5.5e-7 at 97x131, float64 7.4e-16 and 1.9e-15); the compiled one holds the
    untrained model's bits."""
    model, compiled = keras3_trained[dtype]
    twins = {}
    for stage in ("compiled", "fit"):
        notes: list[str] = []
        loaded = files.load_keras(keras3_trained["folder"] / f"{dtype}-{stage}.weights.h5", notes=notes)
        assert any("optimizer" in note and "set aside" in note for note in notes), (stage, notes)
        twins[stage] = conversion.keras_to_torch(loaded)
    assert _bits(twins["compiled"].state_dict()) == _bits(compiled.state_dict())
    assert_same_logits(lambda x: twin_logits(twins["fit"], x), lambda x: book_logits(model, x), dtype)


def test_verify_train_runs_the_books_compiled_nadam_model(keras3_trained, capsys):
    """The chapter compiles with "nadam": `verify --train` takes the file's own optimizer and loss."""
    path = keras3_trained["folder"] / "fit.keras"
    argv = ["verify", "--train", "--keras", str(path), "--steps", "1", "--batch", "2", "--size", "33", "29", "--json"]
    code = main(argv)
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["agree"], report.get("diagnosis")
    assert report["keras_optimizer"].startswith("Keras Nadam("), report["keras_optimizer"]
