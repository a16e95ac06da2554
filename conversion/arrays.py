"""Images, layouts and error metrics shared by verify, the tests and the benchmarks."""

from __future__ import annotations

import hashlib

import numpy as np

from conversion.errors import ConversionError, InputError

# float32 twins agree to ~5e-7 and float64 twins to ~1e-15 relative to the output scale on hostile
# weights (measured: tests/test_model_parity.py, `resnet34-parity verify --json`); these bounds leave
# a margin of ~20x and ~1e4x, while every planted porting bug gives errors over 1e-3
# (asserted by tests/test_mutations.py).
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def hash_array(digest: hashlib._Hash, array: np.ndarray, label: str = "") -> None:
    """Feed an array's dtype, shape and bytes to `digest` (hashlib reads the buffer: no copy of a 170 MB model).

    `label` goes before the header (a weight's index, say), so that equal arrays in different places differ.
    """
    array = np.ascontiguousarray(array)
    digest.update(f"{label}{array.dtype.str}:{array.shape};".encode())
    digest.update(array)


def array_sha256(array: np.ndarray) -> str:
    """sha256 over an array's dtype, shape and bytes."""
    digest = hashlib.sha256()
    hash_array(digest, array)
    return digest.hexdigest()


def max_rel_err(actual: np.ndarray, reference: np.ndarray) -> float:
    """max |actual - reference| / max |reference|: the error relative to the output's scale (NaN -> inf)."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    if actual.shape != reference.shape:
        raise InputError(f"cannot compare shapes {actual.shape} and {reference.shape}")
    if not (np.all(np.isfinite(actual)) and np.all(np.isfinite(reference))):
        return float("inf")
    scale = np.abs(reference).max()
    return float(np.abs(actual - reference).max() / (scale if scale > 0 else 1.0))


def max_abs_err(actual: np.ndarray, reference: np.ndarray) -> float:
    """max |actual - reference| (NaN -> inf)."""
    diff = np.abs(np.asarray(actual, np.float64) - np.asarray(reference, np.float64))
    return float(diff.max()) if np.all(np.isfinite(diff)) else float("inf")


def cosine_similarity(actual: np.ndarray, reference: np.ndarray) -> float:
    """Cosine of the angle between the two flattened arrays (NaN when either is not finite)."""
    a, b = np.asarray(actual, np.float64).ravel(), np.asarray(reference, np.float64).ravel()
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm > 0 else float(np.array_equal(a, b))


def nhwc_to_nchw(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> (N, C, H, W), contiguous."""
    return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2))


def nchw_to_nhwc(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, H, W, C), contiguous."""
    return np.ascontiguousarray(np.asarray(images).transpose(0, 2, 3, 1))


def reversed_axes(array: np.ndarray, tile: int = 64) -> np.ndarray:
    """``np.ascontiguousarray(array.transpose(2, 1, 0))`` of a 3-D array, copied tile by tile.

    A conv kernel's layout change is this with its two spatial axes as one. In a single pass, a 512-channel kernel
    is walked with a power-of-two stride that thrashes the cache; tiles that fit in it make the copy 2-3x faster
    (float64 (3, 3, 512, 512) here: 20.6 ms -> 7.8 ms). The same values, moved: exact."""
    out = np.empty(array.shape[::-1], array.dtype)
    n0, n1, n2 = array.shape
    for i0 in range(0, n0, tile):
        for i1 in range(0, n1, tile):
            for i2 in range(0, n2, tile):
                block = array[i0 : i0 + tile, i1 : i1 + tile, i2 : i2 + tile]
                out[i2 : i2 + tile, i1 : i1 + tile, i0 : i0 + tile] = block.transpose(2, 1, 0)
    return out


def hwio_to_oihw(kernel: np.ndarray) -> np.ndarray:
    """A Keras Conv2D kernel (kh, kw, in, out) as torch's Conv2d weight (out, in, kh, kw), contiguous."""
    height, width, inputs, outputs = kernel.shape
    return reversed_axes(kernel.reshape(height * width, inputs, outputs)).reshape(outputs, inputs, height, width)


def oihw_to_hwio(weight: np.ndarray) -> np.ndarray:
    """A torch Conv2d weight (out, in, kh, kw) as Keras's Conv2D kernel (kh, kw, in, out), contiguous."""
    outputs, inputs, height, width = weight.shape
    return reversed_axes(weight.reshape(outputs, inputs, height * width)).reshape(height, width, inputs, outputs)


def seeded_images(
    batch: int, height: int, width: int, channels: int = 3, seed: int = 0, dtype: str = "float32"
) -> np.ndarray:
    """Standard-normal NHWC images from a seed (the twins compare numbers, not pictures)."""
    return np.random.default_rng(seed).standard_normal((batch, height, width, channels)).astype(dtype)


def check_images(images: object, channels: int = 3, dtype: str | None = None, min_size: int = 1) -> np.ndarray:
    """Return ``images`` as an (N, H, W, C) float array, or raise InputError saying what was expected."""
    if not isinstance(images, np.ndarray):
        raise InputError(f"expected images as a numpy array (N, H, W, {channels}); received {type(images).__name__}")
    if images.ndim != 4:
        raise InputError(f"expected images of rank 4 (N, H, W, {channels}); received shape {images.shape}")
    if images.shape[-1] != channels:
        raise InputError(
            f"expected NHWC images with {channels} channels (N, H, W, {channels}); received shape {images.shape}"
            + (" (this looks like NCHW)" if images.shape[1] == channels else "")
        )
    if min(images.shape[:3]) < min_size:
        raise InputError(f"expected at least 1 image of at least {min_size}x{min_size}; received shape {images.shape}")
    if images.dtype not in (np.float32, np.float64):
        raise InputError(f"expected float32 or float64 images; received {images.dtype}")
    if dtype is not None and images.dtype != dtype:
        raise InputError(f"expected {dtype} images for a {dtype} model; received {images.dtype}")
    if not np.all(np.isfinite(images)):
        raise InputError(f"expected finite images; received {int((~np.isfinite(images)).sum())} NaN/Inf values")
    return images


def single_dtype(dtypes: set[str]) -> str:
    """The one dtype of a model's weights; a ConversionError when they mix dtypes."""
    if len(dtypes) != 1:
        raise ConversionError(f"expected weights of one dtype. Received: {sorted(dtypes)}")
    return next(iter(dtypes))
