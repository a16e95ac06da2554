"""What a benchmark ran on: the machine, the packages, the git commit and the workers' pinned environment.

Framework-free, like ``benchmarks.common``: it reads versions from package metadata, never by importing.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import re
import subprocess
import time
from pathlib import Path

from benchmarks.common import REFERENCE_IMAGES, REPO, TOLERANCE, TimingConfig

# Packages whose versions go into results.json (None where not installed).
PACKAGES = (
    "numpy",
    "keras",
    "tensorflow",
    "tensorflow-cpu",
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "jax-cuda13-plugin",
    "torch",
    "torchvision",
    "triton",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "tf2onnx",
    "onnxscript",
)
# The thread settings of a worker's environment recorded in results.json.
THREAD_ENV = ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "XLA_FLAGS")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_flags() -> dict[str, object]:
    """lscpu's model name and the flags the kernels pick their code by (AVX2, FMA, F16C, AVX-512, VNNI, AMX)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        return {"lscpu": f"unavailable ({error})"}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = [f for f in flags if f.startswith(("avx512", "avx_vnni", "amx")) or f in ("avx2", "fma", "f16c")]
    return {"model": fields.get("Model name", "").strip(), "flags": sorted(wanted)}


def nvidia_smi() -> list[dict[str, str]]:
    """Name, driver and memory of each NVIDIA GPU (empty without nvidia-smi)."""
    fields = ("name", "driver_version", "memory.total")
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [dict(zip(fields, (v.strip() for v in line.split(",")), strict=False)) for line in out.splitlines() if line]


def _slug(text: str) -> str:
    """Lower-case letters and digits, every other run of characters one dash."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_folder(device: str, gpus: list[dict[str, str]]) -> str:
    """results/<this>: the GPU's name on cuda, the CPU model and core count on cpu."""
    if device == "cuda" and gpus:
        return "gpu-" + _slug(gpus[0]["name"].removeprefix("NVIDIA "))
    return f"cpu-{_slug(cpu_model())}-{cpu_count()}core"


def _version(package: str) -> str | None:
    """The installed version of ``package`` (None where it is not installed)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git() -> str:
    """The checkout's short commit, marked when the tree has uncommitted changes ("unknown" without git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return commit + (" (uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def worker_env(runtime: str, device: str, threads: int, compile_cache: Path | None = None) -> dict[str, str]:
    """The environment of a worker: threads pinned, the right Keras backend, the device made explicit."""
    env = dict(os.environ)
    if compile_cache is not None:  # torch.compile's caches: a fresh folder makes compile_s a cold compile
        env["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache / "inductor")
        env["TRITON_CACHE_DIR"] = str(compile_cache / "triton")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        env[name] = str(threads)
    env["TF_NUM_INTEROP_THREADS"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if runtime.startswith("keras-"):
        env["KERAS_BACKEND"] = {"keras-tf": "tensorflow", "keras-jax": "jax"}[runtime]
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # nothing may slip onto a GPU
        env["JAX_PLATFORMS"] = "cpu"
        flags = f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
        env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), flags]))
    else:
        if env.get("JAX_PLATFORMS") == "cpu":  # set by prepare.py for the parent's own reference run
            del env["JAX_PLATFORMS"]
    return env


def environment(
    *,
    command: str,
    device: str,
    threads: int,
    batch_sizes: list[int],
    seed: int,
    gpus: list[dict[str, str]],
    config: TimingConfig,
) -> dict:
    """The environment block of results.json (the worker-side details are added as workers finish)."""
    example = worker_env("keras-jax", device, threads)
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "git": _git(),
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": cpu_count(),
        "gpus": gpus,
        "gpu_name": gpus[0]["name"] if gpus else None,
        "packages": {name: _version(name) for name in PACKAGES},
        "threads": {
            "intra_op": threads,
            "inter_op": 1,
            "env": {k: example[k] for k in THREAD_ENV if k in example},
        },
        "load_avg_start": list(os.getloadavg()),
        "timing": dataclasses.asdict(config),
        "batch_sizes": batch_sizes,
        "seed": seed,
        "reference_images": REFERENCE_IMAGES,
        "tolerance": TOLERANCE,
        "workers": {},
    }
