"""torchvision's and timm's resnet34, run through their OWN forward (code nobody here wrote), become Keras
ResNet-34s with the same logits, and come back bit for bit.

Their convention is "torchvision": symmetric padding, BatchNorm epsilon 1e-5, momentum 0.1. Hostile
BatchNorm statistics are set in torch (a quarter of the variances in [5e-4, 2e-3], as conversion.hostile
does for Keras). Tolerances: float32 1e-5, float64 1e-10 of the logits' scale (conversion.arrays.TOLERANCE);
measured errors are in the docstrings.
"""

from __future__ import annotations

# isort: split
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
import torch
from torch_peers import hostile_, own_logits

import conversion
from conversion import files
from conversion.arrays import TOLERANCE, max_rel_err, seeded_images
from conversion.cli import main
from conversion.onnx_export import export_onnx, run_onnx

ROOT = Path(__file__).resolve().parents[1]
CASES = [(1, 224, 224), (2, 97, 131)]
CASE_IDS = ["1x224x224", "2x97x131-odd-non-square"]


@pytest.fixture(scope="module")
def peers(torchvision, timm) -> dict[str, torch.nn.Module]:
    """torchvision's and timm's resnet34 (10 classes, random weights: no download), hostile BatchNorms."""
    torch.manual_seed(0)
    return {
        "torchvision": hostile_(torchvision.models.resnet34(num_classes=10), seed=1),
        "timm": hostile_(timm.create_model("resnet34", pretrained=False, num_classes=10), seed=2),
    }


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("peer", ["torchvision", "timm"])
def test_peer_becomes_a_keras_model_with_the_same_logits(peers, peer, dtype):
    """Measured (hostile BatchNorms; 1x224x224 and 2x97x131): torchvision float32 8.6e-7 and 1.4e-6, float64
    1.1e-15 and 2.4e-15; timm float32 2.7e-7 and 8.5e-7, float64 7.9e-16 and 1.9e-15."""
    model = peers[peer].to(getattr(torch, dtype))
    keras_model = conversion.torch_to_keras(model, (None, None, 3))
    assert type(keras_model.get_layer("stem_conv")).__name__ == "SymmetricPaddingConv2D"
    for batch, height, width in CASES:
        images = seeded_images(batch, height, width, seed=3, dtype=dtype)
        logits = keras.ops.convert_to_numpy(keras_model(images))
        assert logits.dtype == np.dtype(dtype)
        assert max_rel_err(logits, own_logits(model, images)) <= TOLERANCE[dtype], (peer, height, width)
    peers[peer].float()


@pytest.mark.parametrize("peer", ["torchvision", "timm"])
def test_round_trip_is_bit_exact_and_loads_strictly_into_torchvision(peers, torchvision, tmp_path, peer):
    source = peers[peer]
    keras_model = conversion.torch_to_keras(source, (None, None, 3))
    path = files.save_torch(conversion.keras_to_torch(keras_model), tmp_path / "back.pth")
    state = torch.load(path, weights_only=True)
    fresh = torchvision.models.resnet34(num_classes=10)
    fresh.load_state_dict(state, strict=True)  # torchvision's own key names, nothing missing or extra
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):  # a counter Keras does not keep
            assert torch.equal(state[key], value), key


def test_readme_python_api_snippet_runs_as_written(torchvision):
    """The README's Python API snippet, as written: the round trips it shows are bit for bit."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (snippet,) = [block for block in blocks if "conversion.keras_to_torch(model)" in block]
    namespace: dict = {}
    exec(snippet, namespace)  # the README's own code, nothing else; it ends in a strict load_state_dict
    model, back = namespace["model"], namespace["back"]
    for mine, returned in zip(model.weights, back.weights, strict=True):
        assert np.array_equal(keras.ops.convert_to_numpy(mine), keras.ops.convert_to_numpy(returned)), mine.path
    images = seeded_images(1, 33, 29, seed=9)
    keras_logits = keras.ops.convert_to_numpy(model(images, training=False))
    assert max_rel_err(own_logits(namespace["twin"], images), keras_logits) <= TOLERANCE["float32"]


@pytest.fixture(scope="module")
def torchvision_files(peers, tmp_path_factory) -> dict[str, Path]:
    """A torchvision checkpoint as users hold it (.pth, 1000 classes) and as timm's hub files (.safetensors)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("peers")
    torch.manual_seed(1)
    import torchvision as tv

    wide = hostile_(tv.models.resnet34(), seed=4)  # 1000 classes, as ImageNet checkpoints
    torch.save(wide.state_dict(), folder / "resnet34-imagenet.pth")
    save_file(peers["timm"].state_dict(), str(folder / "timm-resnet34.safetensors"))
    return {"pth": folder / "resnet34-imagenet.pth", "safetensors": folder / "timm-resnet34.safetensors", "wide": wide}


def test_a_torchvision_checkpoint_becomes_a_keras_file_that_reloads_with_only_keras_impl(torchvision_files, tmp_path):
    """`convert resnet34-imagenet.pth model.keras`, then a fresh process: `import keras_impl` and
    `keras.models.load_model(path)` only; its logits are torchvision's (1000 classes, 97x131)."""
    keras_path = tmp_path / "resnet34.keras"
    assert main(["convert", str(torchvision_files["pth"]), str(keras_path)]) == 0
    images = seeded_images(1, 97, 131, seed=8)
    np.save(tmp_path / "images.npy", images)
    script = (
        "import sys, numpy as np, keras_impl, keras\n"
        "model = keras.models.load_model(sys.argv[1])\n"
        "np.save(sys.argv[3], keras.ops.convert_to_numpy(model(np.load(sys.argv[2]))))\n"
    )
    out = tmp_path / "logits.npy"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run(
        [sys.executable, "-c", script, str(keras_path), str(tmp_path / "images.npy"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    logits = np.load(out)
    assert logits.shape == (1, 1000)
    assert max_rel_err(logits, own_logits(torchvision_files["wide"], images)) <= 1e-5


def test_timm_safetensors_verifies(torchvision_files, capsys):
    code = main(["verify", "--torch", str(torchvision_files["safetensors"]), "--size", "45", "38", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["agree"], report["diagnosis"]
    assert report["training_check"]["ok"]


def test_changing_the_convention_keeps_the_weights_and_says_how_much_the_function_moved(
    torchvision_files, tmp_path, capsys
):
    """torchvision -> book: the same weights in TF padding and epsilon 1e-3 compute another network."""
    dst = tmp_path / "as-book.pt"
    code = main(
        ["convert", str(torchvision_files["pth"]), str(dst), "--convention", "book", "--input-size", "64", "64"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    match = re.search(r"convention torchvision -> book: .*logits max rel err ([\d.e+-]+), top-1 agreement (\d+)%", out)
    assert match, out
    assert float(match.group(1)) > 1e-3  # a different function, by far more than any tolerance
    twin = files.load_torch(dst)
    assert twin.convention == "book" and "stem_conv.weight" in twin.state_dict()
    wide = torchvision_files["wide"].state_dict()
    assert torch.equal(twin.stem_conv.weight, wide["conv1.weight"])
    assert torch.equal(twin.unit_15.main_layers[4].running_var, wide["layer4.2.bn2.running_var"])


def test_a_torchvision_convention_model_exports_to_onnx_with_symmetric_pads(peers, tmp_path):
    """Measured: ONNX Runtime against torchvision's own forward, ~6e-7 (97x131, float32)."""
    keras_model = conversion.torch_to_keras(peers["torchvision"], (97, 131, 3))
    path = export_onnx(keras_model, tmp_path / "tv.onnx")
    graph = onnx.load(path).graph
    pads = [
        list(attribute.ints)
        for node in graph.node
        if node.op_type in ("Conv", "MaxPool")
        for attribute in node.attribute
        if attribute.name == "pads"
    ]
    # The max-pool's -inf border stays a Pad node (tf2onnx does not fold it into MaxPool): symmetric as well.
    initializers = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in graph.initializer}
    pads += [list(initializers[node.input[1]]) for node in graph.node if node.op_type == "Pad"]
    assert pads and all(p[: len(p) // 2] == p[len(p) // 2 :] for p in pads)  # begin == end on every axis
    images = seeded_images(2, 97, 131, seed=9)
    assert max_rel_err(run_onnx(path, images), own_logits(peers["torchvision"], images)) <= 1e-5
    assert (
        onnx.load(path).metadata_props
        and dict((p.key, p.value) for p in onnx.load(path).metadata_props)["convention"] == "torchvision"
    )
