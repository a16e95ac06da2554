"""Golden logits: a committed file of reference outputs, so a framework upgrade that changes the numbers
is detected. Regenerate ONLY deliberately, after reading why they changed:

    RESNET34_PARITY_REGEN_GOLDEN=1 python3 -m pytest tests/test_golden.py
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
import pytest
import torch

from conversion.arrays import TOLERANCE, max_rel_err, nhwc_to_nchw, seeded_images
from conversion.files import atomic_output

GOLDEN = Path(__file__).parent / "golden" / "resnet34_seed0_logits.npz"
REGENERATE = os.environ.get("RESNET34_PARITY_REGEN_GOLDEN") == "1"
# Non-square, even in one dimension and odd in the other, batch 2; the weights are conftest's seed 0.
IMAGE_SEED, BATCH, HEIGHT, WIDTH = 123, 2, 48, 57


def _logits(twins) -> dict[str, np.ndarray]:
    keras_model, torch_model = twins
    dtype = keras.backend.standardize_dtype(keras_model.get_layer("stem_conv").kernel.dtype)
    images = seeded_images(BATCH, HEIGHT, WIDTH, seed=IMAGE_SEED, dtype=dtype)
    with torch.no_grad():
        torch_logits = torch_model(torch.from_numpy(nhwc_to_nchw(images))).numpy()
    return {f"keras_{dtype}": np.asarray(keras_model(images)), f"torch_{dtype}": torch_logits}


def test_golden_logits(twins_f32, twins_f64):
    current = {**_logits(twins_f32), **_logits(twins_f64)}
    if REGENERATE:
        GOLDEN.parent.mkdir(exist_ok=True)
        with atomic_output(GOLDEN) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **current)
        pytest.fail(f"regenerated {GOLDEN}: review and commit it, then run without RESNET34_PARITY_REGEN_GOLDEN")
    assert GOLDEN.exists(), f"{GOLDEN} is missing; create it with RESNET34_PARITY_REGEN_GOLDEN=1 (see docstring)"
    golden = np.load(GOLDEN, allow_pickle=False)
    assert sorted(golden.files) == sorted(current)
    for name, logits in current.items():
        # float64 must reproduce to ~1e-15 (summation order may change, the function may not); float32 gets
        # the parity tolerance, since a new release may pick other conv algorithms.
        tolerance = 1e-12 if name.endswith("float64") else TOLERANCE["float32"]
        assert max_rel_err(logits, golden[name]) <= tolerance, name
