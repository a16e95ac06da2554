"""Framework-free pieces shared by the benchmark parent, its workers and the peer comparisons.

Nothing here imports TensorFlow, torch, JAX or onnxruntime: each worker imports only its own framework.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# The checkout's root: the workers' cwd and PYTHONPATH, git's working tree, the default results folder.
REPO = Path(__file__).resolve().parents[1]

# ResNet-34 at 224x224: 3.67 GMACs = 7.34 GFLOP per image (the 10-class head is noise).
GFLOP_PER_IMAGE_224 = 7.34
IMAGE_SIZE = (224, 224)
NUM_CLASSES = 10
# Distinct seeded images behind every batch: batch b holds images[i % REFERENCE_IMAGES] for i < b, so the
# Keras float32 reference is computed once, on CPU, for these only.
REFERENCE_IMAGES = 8

# Largest max_rel_err (vs Keras float32 on CPU, logits) accepted per compute dtype. float32: the twins agree
# to ~1e-6; 1e-4 leaves room for other conv algorithms (Winograd, oneDNN, cuDNN).
# The reduced-precision bounds are 5-10x the errors measured on CPU by ``python -m benchmarks.precision``
# (emulated TF32 5e-4, float16 9e-4, bfloat16 5e-3; Keras mixed_bfloat16 on JAX 7e-3).
# int8 (QDQ, per-channel weights, conversion.deploy): 5x the worst of the three calibration methods measured with
# python -m benchmarks.deployment on the hostile model at 224x224 (minmax 0.027, percentile 0.022, entropy 0.10); the
# rows' top-1 agreement column is the test that matters for a quantized model.
TOLERANCE = {"float32": 1e-4, "tf32": 5e-3, "float16": 1e-2, "bfloat16": 5e-2, "int8": 0.5}

# Dense (no sparsity) peak FLOP rates in TFLOP/s, from NVIDIA's data sheets; matched on the GPU's name.
# Unknown hardware (every CPU here) gets no "% of peak".
PEAK_TFLOPS = {
    "H100 PCIe": {"float32": 51.0, "tf32": 378.0, "bfloat16": 756.0, "float16": 756.0},
    "H100": {"float32": 67.0, "tf32": 495.0, "bfloat16": 989.0, "float16": 989.0},  # SXM5 (H100 80GB HBM3)
    "H200": {"float32": 67.0, "tf32": 495.0, "bfloat16": 989.0, "float16": 989.0},
    "A100": {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0, "float16": 312.0},
}

PROGRESS_PREFIX = "@@bench-progress "


class SkipError(Exception):
    """A runtime, mode or provider that cannot run here; its message becomes the row's "skipped: <reason>"."""


class Runner(Protocol):
    """One runtime in one mode, ready to run; ``__call__`` returns only when the result is ready."""

    def load(self, images: np.ndarray) -> Any:
        """Host NHWC float32 images -> the runtime's input (its layout, dtype and device)."""

    def __call__(self, inputs: Any) -> Any:
        """One inference on inputs already in place, synchronised with the device."""

    def fetch(self, outputs: Any) -> np.ndarray:
        """The runtime's outputs -> host float32 logits (N, classes)."""


@dataclass
class TimingConfig:
    """Warm-up and measurement budget of one (runtime, mode, batch)."""

    min_warmup: int = 2  # at least twice, so graph capture and lazy compilation are behind us
    max_warmup: int = 50
    warmup_s: float = 10.0  # give up waiting for stability after this long
    iters: int = 30  # at least this many timed calls ...
    min_time_s: float = 3.0  # ... and at least this long ...
    max_time_s: float = 60.0  # ... but stop here once MIN_ITERS calls are in
    e2e_iters: int = 10  # host-to-host calls, timed apart


MIN_ITERS = 5
STABLE_WINDOW = 3
STABLE_SPREAD = 1.10  # the last STABLE_WINDOW warm-up calls within 10% of each other


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def warm_up(call: Callable[[], Any], config: TimingConfig) -> tuple[int, bool]:
    """Call until the last few latencies agree (or the budget runs out); (calls made, whether stable)."""
    times: list[float] = []
    start = time.perf_counter()
    while True:
        times.append(timed(call)[0])
        recent = times[-STABLE_WINDOW:]
        stable = len(recent) == STABLE_WINDOW and max(recent) <= STABLE_SPREAD * min(recent)
        if len(times) >= config.min_warmup and stable:
            return len(times), True
        out_of_budget = time.perf_counter() - start >= config.warmup_s
        if len(times) >= config.max_warmup or (out_of_budget and len(times) >= config.min_warmup):
            return len(times), False


def measure(call: Callable[[], Any], config: TimingConfig) -> list[float]:
    """Per-call latencies in seconds: at least ``iters`` calls and ``min_time_s``, at most ``max_time_s``."""
    times: list[float] = []
    start = time.perf_counter()
    while True:
        times.append(timed(call)[0])
        elapsed = time.perf_counter() - start
        if len(times) >= config.iters and elapsed >= config.min_time_s:
            return times
        if elapsed >= config.max_time_s and len(times) >= MIN_ITERS:
            return times


def summarize(times_s: list[float], batch: int) -> dict[str, float]:
    """p50/p90/p99/mean/std in ms and images/s (at the median) of per-call latencies."""
    ms = np.asarray(times_s) * 1e3
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return {
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        "img_per_s": batch / (p50 / 1e3),
        "iters": int(ms.size),
    }


def peak_tflops(gpu_name: str | None, dtype: str) -> float | None:
    """The dense peak for this GPU and compute dtype, or None where unknown (CPUs, other GPUs)."""
    if not gpu_name:
        return None
    for key, peaks in PEAK_TFLOPS.items():  # ordered: "H100 PCIe" before "H100"
        if all(part in gpu_name for part in key.split()):
            return peaks.get(dtype)
    return None


def pct_of_peak(img_per_s: float, peak: float | None, size: tuple[int, int] = IMAGE_SIZE) -> float | None:
    """Achieved share of the peak FLOP rate, in percent (None when the peak is unknown)."""
    if peak is None:
        return None
    gflop = GFLOP_PER_IMAGE_224 * size[0] * size[1] / (224 * 224)
    return 100.0 * img_per_s * gflop * 1e9 / (peak * 1e12)


def batch_images(images: np.ndarray, batch: int) -> np.ndarray:
    """A batch of ``batch`` images cycling through the reference images (contiguous NHWC float32)."""
    return np.ascontiguousarray(images[np.arange(batch) % len(images)])


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make committed results private
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_json(path: Path, obj: object) -> Path:
    """Atomic, indented JSON (NaN and inf written as null)."""
    return atomic_write(path, json.dumps(_finite(obj), indent=2) + "\n")


def _finite(obj: object) -> object:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def median(values: list[float]) -> float:
    """statistics.median, typed."""
    return float(statistics.median(values))


def round_ratio_text(ratio: dict, digits: int) -> str:
    """An ``interleave`` ratio's per-round median and range: "1.018 (1.000-1.029)"."""
    low, high = ratio["round_ratio_range"]
    return f"{ratio['round_ratio_median']:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def interleave(calls: dict[str, Callable[[], object]], rounds: int, per_round: int, warmup: int) -> dict:
    """Time each call ``per_round`` times per round, reversing the order every other round.

    The last call is the baseline: each other one gets the ratio of medians and the median of its
    per-round ratios (which cancels drift between rounds; the figure to quote).
    """
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    round_medians: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            batch = [timed(calls[name])[0] for _ in range(per_round)]
            times[name] += batch
            round_medians[name].append(median(batch))
    baseline = names[-1]
    ratios = {}
    for name in names[:-1]:
        per_round = [a / b for a, b in zip(round_medians[name], round_medians[baseline], strict=True)]
        ratios[name] = {
            "ratio_of_medians": median(times[name]) / median(times[baseline]),
            "round_ratio_median": median(per_round),
            "round_ratio_range": [min(per_round), max(per_round)],
        }
    return {
        "baseline": baseline,
        "median_ms": {name: 1e3 * median(values) for name, values in times.items()},
        "min_ms": {name: 1e3 * min(values) for name, values in times.items()},
        "calls": {name: len(values) for name, values in times.items()},
        "ratios": ratios,
    }
