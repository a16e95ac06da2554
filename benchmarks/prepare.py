"""The benchmark's shared inputs, built once by the parent: weights, images, Keras float32 reference, ONNX files.

Workers read these files and need only their own framework. The Keras backend here is TensorFlow where
it is installed; elsewhere (the GPU machine: JAX, no TensorFlow) JAX pinned to the CPU, so the reference
is always Keras float32 computed on a CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import IMAGE_SIZE, NUM_CLASSES, REFERENCE_IMAGES, write_json

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: the deployment-precision files (fp16, int8 per calibration method)


def choose_keras_backend() -> str:
    """Set KERAS_BACKEND for this process (TensorFlow if installed, else JAX on CPU, else torch); return it."""
    if "KERAS_BACKEND" not in os.environ:
        for backend, module in (("tensorflow", "tensorflow"), ("jax", "jax"), ("torch", "torch")):
            if importlib.util.find_spec(module) is not None:
                os.environ["KERAS_BACKEND"] = backend
                break
    if os.environ.get("KERAS_BACKEND") == "jax":
        os.environ["JAX_PLATFORMS"] = "cpu"  # the reference is computed on the CPU, in full float32
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def load_manifest(folder: Path, seed: int) -> dict | None:
    """The manifest of an earlier preparation in ``folder`` with the same seed, or None."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("seed") != seed:
        return None
    if not all((folder / manifest[key]).is_file() for key in ("images", "reference", "keras_weights", "torch_weights")):
        return None
    return manifest


def prepare(folder: Path, *, seed: int, onnx: bool, log: Callable[[str], None] = print) -> dict:
    """Build the hostile-weight model once and write everything the workers read; return the manifest."""
    backend = choose_keras_backend()
    import keras_impl  # first: TensorFlow then loads locally and quietly (docs/pitfalls.md)

    # isort: split
    import keras

    from conversion import keras_to_torch
    from conversion.arrays import seeded_images
    from conversion.files import save_keras, save_torch
    from conversion.hostile import randomize_weights

    if backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = keras_impl.build_resnet34(NUM_CLASSES, (*IMAGE_SIZE, 3), classifier_activation=None, dtype="float32")
    randomize_weights(model, seed)
    save_keras(model, folder / "model.weights.h5")
    save_torch(keras_to_torch(model), folder / "model.pt")
    images = seeded_images(REFERENCE_IMAGES, *IMAGE_SIZE, seed=seed)
    reference = keras.ops.convert_to_numpy(model(images, training=False)).astype(np.float32)
    np.save(folder / "images.npy", images)
    np.save(folder / "reference.npy", reference)
    manifest: dict = {
        "version": MANIFEST_VERSION,
        "seed": seed,
        "images": "images.npy",
        "reference": "reference.npy",
        "keras_weights": "model.weights.h5",
        "torch_weights": "model.pt",
        "reference_by": f"keras {keras.__version__} on {backend}, CPU, float32, classifier_activation=None",
        "build_s": time.perf_counter() - start,
        "onnx": {},
    }
    log(f"built the model, weights and reference logits in {manifest['build_s']:.1f} s")
    if onnx:
        manifest["onnx"] = export_onnx_files(model, keras_to_torch(model), folder, backend, log)
    write_json(folder / MANIFEST, manifest)
    return manifest


def export_onnx_files(keras_model, torch_model, folder: Path, backend: str, log: Callable[[str], None]) -> dict:
    """Export the Keras model (NHWC) and its torch twin (NCHW) once; a reason instead of a path on failure."""
    entries: dict[str, dict] = {}
    try:
        from conversion.onnx_export import export_onnx, export_torch_onnx
    except ImportError as error:
        reason = f"conversion.onnx_export is not available ({error})"
        return {"keras": {"skip": reason}, "torch": {"skip": reason}}
    jobs = {
        "keras": lambda path: export_onnx(keras_model, path),
        "torch": lambda path: export_torch_onnx(torch_model, path, size=IMAGE_SIZE),
    }
    for name, export in jobs.items():
        if name == "keras" and backend != "tensorflow":
            entries[name] = {"skip": f"the Keras ONNX export needs TensorFlow (Keras backend here: {backend})"}
            continue
        path = folder / f"{name}.onnx"
        start = time.perf_counter()
        try:
            export(path)
        except Exception as error:  # a failed export is a skipped row, not a crashed benchmark
            entries[name] = {"skip": f"{name} ONNX export failed: {type(error).__name__}: {str(error)[:200]}"}
            continue
        entries[name] = {"path": path.name, "export_s": time.perf_counter() - start}
        log(f"exported {path.name} in {entries[name]['export_s']:.1f} s")
    if "path" in entries.get("keras", {}):
        entries.update(deployed_onnx_files(folder, entries["keras"], log))
    return entries


# Deployment precision (conversion.deploy): the Keras export lowered to these, int8 calibrated on seeded images.
DEPLOYED = {
    "keras-fp16": ("fp16", "minmax"),
    "keras-int8-minmax": ("int8", "minmax"),
    "keras-int8-entropy": ("int8", "entropy"),
    "keras-int8-percentile": ("int8", "percentile"),
}
CALIBRATION_IMAGES, CALIBRATION_SEED = 16, 100  # 16: what entropy and percentile need (conversion.deploy.lower)


def deployed_onnx_files(folder: Path, keras_entry: dict, log: Callable[[str], None]) -> dict:
    """The lowered files; a reason instead of a path where one fails."""
    from conversion.arrays import seeded_images
    from conversion.deploy.lower import lower_onnx

    calibration = seeded_images(CALIBRATION_IMAGES, *IMAGE_SIZE, seed=CALIBRATION_SEED)
    entries: dict[str, dict] = {}
    for name, (precision, method) in DEPLOYED.items():
        start = time.perf_counter()
        try:
            lower_onnx(
                folder / keras_entry["path"],
                folder / f"{name}.onnx",
                precision,
                calibration=calibration if precision == "int8" else None,
                method=method,
            )
        except Exception as error:  # a failed lowering is a skipped row, not a crashed benchmark
            entries[name] = {"skip": f"{name} lowering failed: {type(error).__name__}: {str(error)[:200]}"}
            continue
        # The export counts as compilation, as for the float32 file, plus the lowering (calibration included).
        entries[name] = {"path": f"{name}.onnx", "export_s": keras_entry["export_s"] + time.perf_counter() - start}
        log(f"lowered {name}.onnx in {time.perf_counter() - start:.1f} s")
    return entries
